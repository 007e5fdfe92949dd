//! Messages, receipts and counters: the append script (seq, idempotency,
//! retention, send bucket and publish in one step), history pages, receipts.

use std::{collections::HashMap, sync::Arc};

use async_trait::async_trait;
use fred::prelude::*;

use super::{
    ValkeyEngine,
    errors::err,
    payload::{StreamEntry, message_template, stored},
};
use crate::{
    engine::{
        Appended, Counters, MessagePage, MessageStore, NewMessage, Page, ReceiptOutcome, ReceiptRow, Route,
        StoredMessage,
    },
    error::{EngineError, EngineResult},
    hub::now_us,
    telemetry,
};

#[async_trait]
impl MessageStore for ValkeyEngine {
    async fn append(&self, msg: NewMessage, route: &Route) -> EngineResult<Option<Appended>> {
        let i = &self.inner;
        let k = &i.keys;
        let conv = msg.conversation.as_str();
        // The frame is rendered around the seq the script assigns.
        let draft = StoredMessage {
            seq: 0,
            ts_ms: msg.ts_ms,
            sender_id: msg.sender.id.as_str().into(),
            sender_name: msg.sender.name.as_str().into(),
            body: msg.body.as_str().into(),
            client_msg_id: msg.client_msg_id.as_str().into(),
        };
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
            i.send_per_s.to_string(),
            i.send_burst.to_string(),
        ];
        args.extend(route.iter().map(|t| k.channel(t)));
        if let Some(pair) = &msg.participants {
            // Indexed before the write: a crash in between leaves an empty
            // conversation in the index (welcome skips it), never hides one
            // that holds messages.
            self.index(conv, pair, true).await?;
        }
        // The send bucket: the user's own slot where keys may span slots;
        // on Cluster the script's keys share the conversation's slot, so the
        // bucket is per user and conversation there (the node-local limiter
        // still bounds a user across conversations on each node).
        let bucket = if i.cluster {
            format!("{}:{}", k.conv(conv, "rate"), msg.sender.id)
        } else {
            format!("{}:{{u:{}}}:rate", k.prefix, msg.sender.id)
        };
        let keys = vec![k.conv(conv, "meta"), k.conv(conv, "msgs"), k.conv(conv, "idem"), k.conv(conv, "mem"), bucket];
        let r: Vec<fred::types::Value> = i.scripts.append.run(&i.pool, keys, args).await?.convert().map_err(err)?;
        let int =
            |v: &fred::types::Value| v.as_i64().ok_or_else(|| EngineError::Internal(format!("append returned {r:?}")));
        let (seq, ts_ms, dup, epoch) = match r.as_slice() {
            [code] if int(code)? == -1 => return Ok(None),
            [code, wait] if int(code)? == -2 => return Err(EngineError::RateLimited(int(wait)?.max(1) as u64)),
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
        Ok(Some(Appended { seq, ts_ms, duplicate: dup }))
    }

    async fn history(&self, conversation: &str, page: Page) -> EngineResult<MessagePage> {
        let key = self.inner.keys.conv(conversation, "msgs");
        // The page and the epoch in one round trip.
        let pipe = self.inner.pool.next().pipeline();
        let (backwards, limit) = match page {
            Page::Before(before, limit) => {
                let end = match before {
                    Some(0 | 1) => None,
                    Some(b) => Some(format!("{}-0", b - 1)),
                    None => Some("+".into()),
                };
                match end {
                    Some(end) => {
                        let _: () = pipe.xrevrange(&key, end, "-", Some(limit as u64 + 1)).await.map_err(err)?;
                    }
                    // Nothing before seq 1: an empty read keeps the shape.
                    None => {
                        let _: () = pipe.xrange(&key, "0-1", "0-1", Some(1)).await.map_err(err)?;
                    }
                }
                (true, limit)
            }
            Page::After(after, limit) => {
                let start = format!("{}-0", after.saturating_add(1));
                let _: () = pipe.xrange(&key, start, "+", Some(limit as u64 + 1)).await.map_err(err)?;
                (false, limit)
            }
        };
        let _: () = pipe.hget(self.inner.keys.conv(conversation, "meta"), "epoch").await.map_err(err)?;
        let (mut entries, epoch): (Vec<StreamEntry>, Option<String>) = pipe.all().await.map_err(err)?;
        let has_more = entries.len() > limit;
        entries.truncate(limit);
        if backwards {
            entries.reverse();
        }
        let messages = entries.iter().map(|e| stored(e).map(|s| s.0)).collect::<EngineResult<_>>()?;
        Ok(MessagePage { messages, has_more, epoch: epoch.unwrap_or_default().into() })
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
        let pipe = client.pipeline();
        for (c, (_, read)) in conversations.iter().zip(&base) {
            let own = format!("{}{user}", k.conv(c, "own:"));
            let _: () = pipe.zcount(own, (*read + 1) as f64, f64::INFINITY).await.map_err(err)?;
        }
        let own: Vec<u64> = pipe.all().await.map_err(err)?;
        Ok(base
            .into_iter()
            .zip(own)
            .zip(epochs)
            .map(|(((last_seq, read_seq), own), epoch)| Counters {
                last_seq,
                read_seq,
                unread: last_seq.saturating_sub(read_seq).saturating_sub(own),
                epoch,
            })
            .collect())
    }
}
