//! Messages people can change (v1.2) on Valkey: pages read through
//! `page.lua` (history: messages only, through the message-seq index, each
//! with its current state; sync: the stream, messages and updates), and
//! changes stored by `update.lua`.
//!
//! A change is decided here, on the target's state as read, by the rules of
//! [`crate::engine::changes`] (written once for every engine); `update.lua`
//! then stores it only if that state (and the epoch) is still the current
//! one: compare and set, so the decision and the write are one atomic step
//! as far as anyone can observe. On a conflict (another change of the same
//! message came first) it is decided again.

use fred::prelude::*;

use super::{
    ValkeyEngine,
    errors::err,
    payload::{State, StreamEntry, message_of, stored, template, update_of},
};
use crate::{
    engine::{
        Appended, Change, MessagePage, NewUpdate, Page, Refusal, Route, StoredMessage, UpdateOutcome,
        changes::{self, stored_update},
    },
    error::{EngineError, EngineResult},
    hub::{Topic, now_us},
    node::update_frame,
    protocol::{self, ServerFrame},
    telemetry,
};

/// Attempts at storing one change before giving up (`unavailable`): each
/// retry means another change of the same message was stored meanwhile.
const ATTEMPTS: usize = 16;

impl ValkeyEngine {
    pub(super) async fn page(&self, conversation: &str, page: Page) -> EngineResult<MessagePage> {
        let i = &self.inner;
        let k = &i.keys;
        let (mode, bound, limit) = match page {
            Page::Before(before, limit) => ("b", before.map_or_else(|| "+inf".to_string(), |b| b.to_string()), limit),
            Page::After(after, limit) => ("a", after.to_string(), limit),
            Page::Sync(after, limit) => ("s", after.to_string(), limit),
        };
        let keys = vec![k.conv(conversation, "meta"), k.conv(conversation, "msgs"), k.conv(conversation, "mseq")];
        let keys = [keys, vec![k.conv(conversation, "st")]].concat();
        let args = vec![mode.to_string(), bound, (limit as u64 + 1).to_string()];
        let r: Vec<String> = i.scripts.page.run(&i.pool, keys, args).await?.convert().map_err(err)?;
        let Some((epoch, rest)) = r.split_first() else {
            return Err(EngineError::Internal("page returned nothing".into()));
        };
        let mut out = MessagePage { epoch: epoch.as_str().into(), ..MessagePage::default() };
        let entries: Vec<&[String]> = rest.chunks_exact(4).collect();
        out.has_more = entries.len() > limit;
        let (mut messages, mut updates) = (Vec::new(), Vec::new());
        for e in entries.into_iter().take(limit) {
            let ts_ms = e[1].parse().unwrap_or(0);
            if e[3].is_empty() {
                let mut m = message_of(&e[0], ts_ms)?;
                State::apply(&mut m, &e[2])?;
                messages.push(m);
            } else {
                updates.push(update_of(&e[0], ts_ms)?);
            }
        }
        if mode == "b" {
            messages.reverse();
        }
        out.messages = messages;
        out.updates = updates;
        Ok(out)
    }

    pub(super) async fn is_message_at(&self, conversation: &str, seq: u64) -> EngineResult<bool> {
        if seq == 0 {
            return Ok(false);
        }
        let id = format!("{seq}-0");
        let e: Vec<StreamEntry> = self
            .inner
            .pool
            .next()
            .xrange(self.inner.keys.conv(conversation, "msgs"), id.as_str(), id.as_str(), None)
            .await
            .map_err(err)?;
        Ok(e.first().is_some_and(|e| !e.1.contains_key("x")))
    }

    pub(super) async fn store_update(&self, u: NewUpdate, route: &Route) -> EngineResult<UpdateOutcome> {
        for _ in 0..ATTEMPTS {
            if let Some(done) = self.try_update(&u, route).await? {
                return Ok(done);
            }
        }
        Err(EngineError::Unavailable(format!("changes of message {} kept conflicting", u.target)))
    }

    /// One attempt: `None` when the state changed between the read and the write.
    async fn try_update(&self, u: &NewUpdate, route: &Route) -> EngineResult<Option<UpdateOutcome>> {
        let i = &self.inner;
        let k = &i.keys;
        let conv = u.conversation.as_str();
        let id = format!("{}-0", u.target);
        let pipe = i.pool.next().pipeline();
        let _: () = pipe.xrange(k.conv(conv, "msgs"), id.as_str(), id.as_str(), None).await.map_err(err)?;
        let _: () = pipe.hget(k.conv(conv, "st"), u.target).await.map_err(err)?;
        let _: () = pipe.hget(k.conv(conv, "meta"), "epoch").await.map_err(err)?;
        let _: () = pipe.sismember(k.conv(conv, "mem"), u.user.id.as_str()).await.map_err(err)?;
        let (entries, state, epoch, member): (Vec<StreamEntry>, Option<String>, Option<String>, bool) =
            pipe.all().await.map_err(err)?;
        let refused = |r| Ok(Some(UpdateOutcome::Refused(r)));
        if u.require_member && !member {
            return refused(Refusal::NotMember);
        }
        let Some(entry) = entries.first().filter(|e| !e.1.contains_key("x")) else {
            return refused(Refusal::NoTarget);
        };
        let state = state.unwrap_or_default();
        let (mut m, _) = stored(entry)?;
        let last_ts = State::apply(&mut m, &state)?;
        match changes::check(&m, u) {
            Err(r) => return refused(r),
            Ok(false) => {
                let seq = changes::duplicate_seq(&m);
                let ts_ms = if seq == m.seq { m.ts_ms } else { last_ts };
                // A repeat waits too: the first write may not be replicated yet.
                i.replicated(conv).await?;
                return Ok(Some(UpdateOutcome::Applied(Appended { seq, ts_ms, duplicate: true })));
            }
            Ok(true) => {}
        }
        let epoch = epoch.unwrap_or_default();
        let frame = |up: &crate::engine::StoredUpdate| protocol::render(&ServerFrame::Update(update_frame(conv, up)));
        let (head, tail) = template(|seq| frame(&stored_update(u, seq)).to_string())?;
        let (erased_head, erased_tail) = match &u.change {
            Change::Edit(_) => template(|seq| {
                let mut up = stored_update(u, seq);
                up.change = Change::Edit("".into());
                frame(&up).to_string()
            })?,
            _ => (String::new(), String::new()),
        };
        let next = |seq| {
            let mut next: StoredMessage = m.clone();
            changes::apply(&mut next, u, seq);
            serde_json::to_string(&State::of(&next, u.ts_ms)).expect("state serialises")
        };
        let (state_head, state_tail) = template(next)?;
        // As for messages: on Cluster a direct conversation's user channels
        // may live on other slots, so its update is published after the script.
        let direct = route.iter().any(|t| matches!(t, Topic::User(_)));
        let in_script = !(i.cluster && direct);
        let traceparent = telemetry::traceparent().unwrap_or_default();
        let payload_head = format!("u\t\t{}\t{conv}\t{traceparent}\t", now_us());
        let min_ts = if i.retention_age_ms > 0 { u.ts_ms - i.retention_age_ms as i64 } else { 0 };
        let kind = match &u.change {
            Change::Edit(_) => "e",
            Change::Delete => "d",
            Change::Reaction { .. } => "r",
        };
        let mut args = vec![
            u.target.to_string(),
            state,
            epoch.clone(),
            if u.require_member { "1" } else { "0" }.to_string(),
            u.user.id.clone(),
            u.ts_ms.to_string(),
            kind.to_string(),
            head.clone(),
            tail.clone(),
            erased_head,
            erased_tail,
            state_head,
            state_tail,
            i.retention_max.to_string(),
            min_ts.to_string(),
            k.conv(conv, "own:"),
            // The service API's moderation draws nothing from a send budget.
            if u.moderation { "0".to_string() } else { i.send_per_s.to_string() },
            i.send_burst.to_string(),
            if in_script { i.publish_cmd() } else { "n" }.to_string(),
            payload_head.clone(),
        ];
        // An edit's body from the byte bucket, in the same step.
        let bytes = match &u.change {
            Change::Edit(body) if !u.moderation => protocol::json_len(body),
            _ => 0,
        };
        args.extend(i.byte_budget(bytes));
        args.extend(route.iter().map(|t| k.channel(t)));
        let keys = self.write_keys(conv, &u.user.id);
        let r: Vec<i64> = i.scripts.update.run(&i.pool, keys, args).await?.convert().map_err(err)?;
        let seq = match r.as_slice() {
            [-1] => return refused(Refusal::NotMember),
            [-2, wait] => return Err(EngineError::RateLimited((*wait).max(1) as u64)),
            [-5, wait] => return Err(EngineError::BytesLimited((*wait).max(1) as u64)),
            [-3] => return Ok(None),
            [-4] => return refused(Refusal::NoTarget),
            [seq] if *seq > 0 => *seq as u64,
            other => return Err(EngineError::Internal(format!("update returned {other:?}"))),
        };
        if !in_script {
            i.publish_payload(route, format!("{payload_head}{seq}:{epoch}\n{head}{seq}{tail}")).await?;
        }
        i.replicated(conv).await?;
        Ok(Some(UpdateOutcome::Applied(Appended { seq, ts_ms: u.ts_ms, duplicate: false })))
    }
}
