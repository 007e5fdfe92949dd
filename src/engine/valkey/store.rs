//! Messages, receipts and counters: the append script (seq, idempotency,
//! retention, send bucket and publish in one step), history pages, receipts.

use std::{collections::HashMap, sync::Arc};

use async_trait::async_trait;
use fred::prelude::*;

use super::{
    ValkeyEngine,
    errors::err,
    payload::{message_template, stored},
};
use crate::{
    engine::{
        Appended, Counters, MessagePage, MessageStore, NewMessage, NewUpdate, Page, ReceiptOutcome, ReceiptRow, Route,
        StoredMessage, UpdateOutcome,
    },
    error::{EngineError, EngineResult},
    hub::now_us,
    node::message_frame,
    protocol::{self, ServerFrame},
    telemetry,
};

#[async_trait]
impl MessageStore for ValkeyEngine {
    async fn append(&self, msg: NewMessage, route: &Route) -> EngineResult<Option<Appended>> {
        let i = &self.inner;
        let k = &i.keys;
        let conv = msg.conversation.as_str();
        // The frame is rendered around the seq the script assigns.
        let draft = msg.stored(0);
        let (head, tail) = message_template(conv, &draft)?;
        let min_ts = if i.retention_age_ms > 0 { msg.ts_ms - i.retention_age_ms as i64 } else { 0 };
        // On Cluster a shard channel must hash to the script's slot: direct
        // messages (user channels) are published after the script.
        let in_script = !(i.cluster && msg.participants.is_some());
        let stored_us = now_us();
        let traceparent = telemetry::traceparent().unwrap_or_default();
        let payload_head = format!("m\t\t{stored_us}\t{conv}\t{traceparent}\t");
        let mut args = vec![
            format!("{}\n{}", msg.sender.id, msg.client_msg_id),
            msg.ts_ms.to_string(),
            msg.sender.id.clone(),
            head.clone(),
            tail.clone(),
            i.retention_max.to_string(),
            min_ts.to_string(),
            if msg.require_member { "1" } else { "0" }.to_string(),
            k.conv(conv, "own:"),
            if in_script { i.publish_cmd() } else { "n" }.to_string(),
            payload_head.clone(),
            crate::engine::new_epoch(),
            // The service API does not draw from the sender's send budget.
            if msg.send_budget { i.send_per_s.to_string() } else { "0".to_string() },
            i.send_burst.to_string(),
        ];
        // The body's bytes from the byte bucket, in the same step.
        let bytes = if msg.send_budget { protocol::json_len(&msg.body) } else { 0 };
        args.extend(i.byte_budget(bytes));
        args.extend(route.iter().map(|t| k.channel(t)));
        if let Some(pair) = &msg.participants {
            // Indexed before the write: a crash in between leaves an empty
            // conversation in the index (welcome skips it), never hides one
            // that holds messages.
            self.index(conv, pair, true).await?;
        }
        let keys = self.write_keys(conv, &msg.sender.id);
        let r: Vec<fred::types::Value> = i.scripts.append.run(&i.pool, keys, args).await?.convert().map_err(err)?;
        let int =
            |v: &fred::types::Value| v.as_i64().ok_or_else(|| EngineError::Internal(format!("append returned {r:?}")));
        let (seq, ts_ms, dup, epoch) = match r.as_slice() {
            [code] if int(code)? == -1 => return Ok(None),
            [code, wait] if int(code)? == -2 => return Err(EngineError::RateLimited(int(wait)?.max(1) as u64)),
            [code, wait] if int(code)? == -5 => return Err(EngineError::BytesLimited(int(wait)?.max(1) as u64)),
            [seq, ts, dup, epoch] => (
                int(seq)? as u64,
                int(ts)?,
                int(dup)? == 1,
                epoch.as_string().ok_or_else(|| EngineError::Internal("append returned no epoch".into()))?,
            ),
            other => return Err(EngineError::Internal(format!("append returned {other:?}"))),
        };
        if !in_script && !dup {
            i.publish_payload(route, format!("{payload_head}{seq}:{epoch}\n{head}{seq}{tail}")).await?;
        }
        // A repeat waits too: the first write may not be replicated yet.
        i.replicated(conv).await?;
        Ok(Some(Appended { seq, ts_ms, duplicate: dup }))
    }

    async fn history(&self, conversation: &str, page: Page) -> EngineResult<MessagePage> {
        self.page(conversation, page).await
    }

    async fn update(&self, update: NewUpdate, route: &Route) -> EngineResult<UpdateOutcome> {
        self.store_update(update, route).await
    }

    async fn is_message(&self, conversation: &str, seq: u64) -> EngineResult<bool> {
        self.is_message_at(conversation, seq).await
    }

    async fn last_seq(&self, conversation: &str) -> EngineResult<u64> {
        let v: Option<u64> =
            self.inner.pool.next().hget(self.inner.keys.conv(conversation, "meta"), "last").await.map_err(err)?;
        Ok(v.unwrap_or(0))
    }

    async fn set_receipt(&self, conversation: &str, user: &str, seq: i64, read: bool) -> EngineResult<ReceiptOutcome> {
        let k = &self.inner.keys;
        let r: Vec<i64> = self
            .inner
            .scripts
            .receipt
            .run(
                &self.inner.pool,
                vec![k.conv(conversation, "rcpt"), k.conv(conversation, "meta")],
                vec![user.to_string(), seq.to_string(), if read { "1" } else { "0" }.to_string()],
            )
            .await?
            .convert()
            .map_err(err)?;
        Ok(match r.as_slice() {
            [-1, last] => ReceiptOutcome::OutOfRange { last_seq: *last as u64 },
            [0, ..] => ReceiptOutcome::Unchanged,
            [1, d, r] => ReceiptOutcome::Changed(ReceiptRow {
                user: user.to_string(),
                delivered_seq: *d as u64,
                read_seq: *r as u64,
            }),
            other => return Err(EngineError::Internal(format!("receipt returned {other:?}"))),
        })
    }

    async fn receipts(&self, conversation: &str) -> EngineResult<Vec<ReceiptRow>> {
        let all: HashMap<String, String> =
            self.inner.pool.next().hgetall(self.inner.keys.conv(conversation, "rcpt")).await.map_err(err)?;
        let mut rows: Vec<ReceiptRow> = all
            .into_iter()
            .filter_map(|(user, v)| {
                let (d, r) = v.split_once(':')?;
                Some(ReceiptRow { user, delivered_seq: d.parse().ok()?, read_seq: r.parse().ok()? })
            })
            .collect();
        rows.sort_by(|a, b| a.user.cmp(&b.user));
        Ok(rows)
    }

    async fn user_conversations(&self, user: &str) -> EngineResult<Vec<String>> {
        let mut v: Vec<String> =
            self.inner.pool.next().smembers(self.inner.keys.user_convs(user)).await.map_err(err)?;
        v.sort();
        Ok(v)
    }

    async fn erase_sender(&self, user: &str) -> EngineResult<u64> {
        let mut erased = 0;
        for conv in self.sent_in(user).await? {
            erased += self.erase_in(&conv, user).await?;
        }
        if erased > 0 {
            tracing::info!(user, erased, "message bodies erased");
        }
        Ok(erased)
    }

    async fn counters(&self, user: &str, conversations: &[String]) -> EngineResult<Vec<Counters>> {
        if conversations.is_empty() {
            return Ok(Vec::new());
        }
        let k = &self.inner.keys;
        let client = self.inner.pool.next();
        let pipe = client.pipeline();
        for c in conversations {
            let _: () = pipe.hget(k.conv(c, "meta"), "last").await.map_err(err)?;
            let _: () = pipe.hget(k.conv(c, "meta"), "epoch").await.map_err(err)?;
            let _: () = pipe.hget(k.conv(c, "rcpt"), user).await.map_err(err)?;
        }
        let first: Vec<Option<String>> = pipe.all().await.map_err(err)?;
        let mut base = Vec::with_capacity(conversations.len());
        let mut epochs = Vec::with_capacity(conversations.len());
        for triple in first.chunks(3) {
            let last: u64 = triple[0].as_deref().and_then(|s| s.parse().ok()).unwrap_or(0);
            let read: u64 =
                triple[2].as_deref().and_then(|s| s.split_once(':')).and_then(|(_, r)| r.parse().ok()).unwrap_or(0);
            base.push((last, read));
            epochs.push(Arc::<str>::from(triple[1].as_deref().unwrap_or_default()));
        }
        // Unread: messages above read_seq (the message-seq index: updates
        // never count) less the user's own.
        let pipe = client.pipeline();
        for (c, (_, read)) in conversations.iter().zip(&base) {
            let own = format!("{}{user}", k.conv(c, "own:"));
            let _: () = pipe.zcount(k.conv(c, "mseq"), (*read + 1) as f64, f64::INFINITY).await.map_err(err)?;
            let _: () = pipe.zcount(own, (*read + 1) as f64, f64::INFINITY).await.map_err(err)?;
        }
        let counts: Vec<u64> = pipe.all().await.map_err(err)?;
        Ok(base
            .into_iter()
            .zip(counts.chunks(2))
            .zip(epochs)
            .map(|(((last_seq, read_seq), n), epoch)| Counters {
                last_seq,
                read_seq,
                unread: n[0].saturating_sub(n[1]),
                epoch,
            })
            .collect())
    }
}

/// `*`, `?`, `[`, `]` and `\\` escaped for a SCAN pattern.
pub(super) fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

impl ValkeyEngine {
    /// The keys of a write to a conversation (`append.lua`, `update.lua`):
    /// meta, events, idempotency, members, the user's send bucket, the
    /// message-seq index, the current states.
    pub(super) fn write_keys(&self, conv: &str, user: &str) -> Vec<String> {
        let k = &self.inner.keys;
        vec![
            k.conv(conv, "meta"),
            k.conv(conv, "msgs"),
            k.conv(conv, "idem"),
            k.conv(conv, "mem"),
            self.bucket(conv, user),
            k.conv(conv, "mseq"),
            k.conv(conv, "st"),
            format!("{}:b", self.bucket(conv, user)),
        ]
    }

    /// The user's send bucket (messages and changes draw from it; its byte
    /// bucket is the same key with `:b`): the
    /// user's own slot where keys may span slots; on Cluster the script's
    /// keys share the conversation's slot, so the bucket is per user and
    /// conversation there (the node-local limiter still bounds a user across
    /// conversations on each node).
    pub(super) fn bucket(&self, conv: &str, user: &str) -> String {
        let k = &self.inner.keys;
        if self.inner.cluster {
            format!("{}:{user}", k.conv(conv, "rate"))
        } else {
            format!("{}:{{u:{user}}}:rate", k.prefix)
        }
    }

    /// Every conversation where `user` has a retained message: the
    /// conversations holding the user's own-seqs set
    /// (`<p>:{c:<id>}:own:<user>`), found by SCAN over the whole keyspace
    /// (every primary on Cluster). Linear in the number of keys: erasure is
    /// a rare admin operation, and an index could not be kept in the append
    /// script's slot.
    async fn sent_in(&self, user: &str) -> EngineResult<Vec<String>> {
        use futures_util::StreamExt;
        let k = &self.inner.keys;
        let head = format!("{}:{{c:", k.prefix);
        let tail = format!("}}:own:{user}");
        let pattern = format!("{}*{}", glob_escape(&head), glob_escape(&tail));
        let client = self.inner.pool.next();
        let mut keys = if self.inner.cluster {
            client.scan_cluster_buffered(pattern, Some(1000), None).boxed()
        } else {
            client.scan_buffered(pattern, Some(1000), None).boxed()
        };
        let mut convs = std::collections::BTreeSet::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(err)?;
            if let Some(conv) = key.as_str().and_then(|s| s.strip_prefix(head.as_str())?.strip_suffix(tail.as_str()))
                && crate::ids::valid_conversation_id(conv)
            {
                convs.insert(conv.to_string());
            }
        }
        Ok(convs.into_iter().collect())
    }

    /// Erases `user`'s messages in one conversation, starting again (a few
    /// times) when a group delete overlapped it.
    async fn erase_in(&self, conv: &str, user: &str) -> EngineResult<u64> {
        for _ in 0..3 {
            if let Some(n) = self.try_erase_in(conv, user).await? {
                return Ok(n);
            }
        }
        Err(EngineError::Unavailable(format!("erasure in '{conv}' kept being interrupted")))
    }

    /// One erasure of `user`'s messages in `conv`: reads them (by the user's
    /// own seqs), renders each one's erased frame, and has `erase.lua` copy
    /// the stream with them, [`ERASE_CHUNK`] seqs per call, and swap the copy
    /// in. `None` when the lock was lost (a group delete): start again.
    async fn try_erase_in(&self, conv: &str, user: &str) -> EngineResult<Option<u64>> {
        let i = &self.inner;
        let k = &i.keys;
        let client = i.pool.next();
        let own = format!("{}{user}", k.conv(conv, "own:"));
        let seqs: Vec<u64> = client.zrange(&own, 0, -1, None, false, None, false).await.map_err(err)?;
        if seqs.is_empty() {
            return Ok(Some(0));
        }
        let msgs = k.conv(conv, "msgs");
        let pipe = client.pipeline();
        for seq in &seqs {
            let id = format!("{seq}-0");
            let _: () = pipe.xrange(&msgs, id.as_str(), id.as_str(), None).await.map_err(err)?;
        }
        // One reply per command, whatever their number.
        let replies = pipe.try_all::<fred::types::Value>().await;
        let mut erased: Vec<(u64, String)> = Vec::new();
        for r in replies {
            // Each reply: an array of `[id, [field, value, ...]]`.
            for entry in r.map_err(err)?.into_array() {
                let mut parts = entry.into_array().into_iter();
                let (Some(id), Some(fields)) = (parts.next(), parts.next()) else { continue };
                let id: String = id.convert().map_err(err)?;
                let fields: Vec<String> = fields.convert().map_err(err)?;
                let map = fields.chunks_exact(2).map(|p| (p[0].clone(), p[1].clone())).collect();
                let (m, _) = stored(&(id, map))?;
                if m.deleted || &*m.sender_id != user {
                    continue;
                }
                let m = StoredMessage { body: "".into(), deleted: true, ..m };
                // The stream keeps the message as sent: its erased frame too.
                erased.push((m.seq, protocol::render(&ServerFrame::Message(message_frame(conv, &m))).as_str().into()));
            }
        }
        if erased.is_empty() {
            return Ok(Some(0));
        }
        erased.sort_by_key(|e| e.0);

        let keys = vec![msgs, k.conv(conv, "msgs-erasing"), k.conv(conv, "erasing"), k.conv(conv, "st")];
        let token = crate::engine::new_epoch();
        let ttl = ERASE_LOCK_MS.to_string();
        let all: Vec<String> = erased.iter().map(|e| e.0.to_string()).collect();
        let step = |name: &str, from: u64, to: u64, pairs: &[(u64, String)]| {
            let mut args = vec![name.to_string(), token.clone(), user.to_string(), ttl.clone()];
            // "finish": how many ARGV are pairs, then every erased seq (their
            // current state is emptied in the same step as the swap).
            let to = if name == "finish" { 2 * pairs.len() as u64 } else { to };
            args.extend([from.to_string(), to.to_string()]);
            for (seq, frame) in pairs {
                args.extend([seq.to_string(), frame.clone()]);
            }
            if name == "finish" {
                args.extend(all.iter().cloned());
            }
            i.scripts.erase.run(&i.pool, keys.clone(), args)
        };
        // The lock: one erasure per conversation at a time.
        let started = std::time::Instant::now();
        let (first, last) = loop {
            let r: Vec<u64> = step("begin", 0, 0, &[]).await?.convert().map_err(err)?;
            match r.as_slice() {
                [1, first, last] => break (*first, *last),
                _ if started.elapsed() < std::time::Duration::from_millis(ERASE_LOCK_MS) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                _ => return Err(EngineError::Unavailable(format!("another erasure in '{conv}' holds its lock"))),
            }
        };
        let steps = async {
            let mut n = 0u64;
            let mut from = first.saturating_sub(1);
            while from < last {
                let to = (from + ERASE_CHUNK).min(last);
                let lo = erased.partition_point(|e| e.0 <= from);
                let hi = erased.partition_point(|e| e.0 <= to);
                let r: i64 = step("copy", from, to, &erased[lo..hi]).await?.convert().map_err(err)?;
                if r < 0 {
                    return Ok(None);
                }
                n += r as u64;
                from = to;
            }
            let lo = erased.partition_point(|e| e.0 <= from);
            let r: i64 = step("finish", from, 0, &erased[lo..]).await?.convert().map_err(err)?;
            Ok((r >= 0).then(|| n + r as u64))
        };
        let done: EngineResult<Option<u64>> = steps.await;
        if done.is_err() {
            // Best effort: free the lock and the scratch for the next try.
            let _ = step("abort", 0, 0, &[]).await;
        }
        done
    }
}

/// Seqs copied per `erase.lua` call: each call blocks Valkey for about this
/// many entries' copy.
const ERASE_CHUNK: u64 = 1000;
/// How long an erasure's lock outlives its last step (a node that died while
/// erasing leaves it, and its scratch stream, for this long).
const ERASE_LOCK_MS: u64 = 30_000;
