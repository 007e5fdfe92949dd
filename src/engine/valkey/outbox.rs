//! The webhook outbox on Valkey ([`Outbox`]), shared by every node: the
//! stream, consumer group and retry set of `lua/outbox.lua`, the unread
//! schedule of `lua/unread.lua`, all under the hash tag `{wh}`.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
};

use async_trait::async_trait;
use fred::prelude::*;

use super::{Inner, errors::err};
use crate::{
    error::{EngineError, EngineResult},
    webhooks::{Claimed, Envelope, Outbox},
};

/// The consumer group every node reads the stream through.
const GROUP: &str = "delivery";
/// Outbox entries looked at per `find` call of an erasure.
const ERASE_CHUNK: usize = 500;
/// How long a member's unread notice is remembered after the last one.
const NOTIFIED_TTL_MS: i64 = 7 * 86_400_000;

pub(super) struct ValkeyOutbox {
    inner: Arc<Inner>,
    /// When this node last looked for entries left by dead nodes (ms).
    last_claim_ms: AtomicI64,
}

impl ValkeyOutbox {
    pub(super) fn new(inner: Arc<Inner>) -> Self {
        ValkeyOutbox { inner, last_claim_ms: AtomicI64::new(0) }
    }

    fn key(&self, part: &str) -> String {
        format!("{}:{{wh}}:{part}", self.inner.keys.prefix)
    }

    fn outbox_keys(&self) -> Vec<String> {
        vec![
            self.key("out"),
            self.key("retry"),
            self.key("retry:age"),
            self.key("retry:e"),
            self.key("erased"),
            self.key("bytes"),
        ]
    }

    async fn outbox(&self, args: Vec<String>) -> EngineResult<Value> {
        self.inner.scripts.outbox.run(&self.inner.pool, self.outbox_keys(), args).await
    }
}

fn json(e: &Envelope) -> EngineResult<String> {
    serde_json::to_string(e).map_err(|e| EngineError::Internal(format!("webhook envelope: {e}")))
}

#[async_trait]
impl Outbox for ValkeyOutbox {
    async fn push(&self, events: &[Envelope], max: usize, max_bytes: usize) -> EngineResult<u64> {
        let mut args = vec!["push".to_string(), max.to_string(), max_bytes.to_string()];
        for e in events {
            args.push(json(e)?);
        }
        let r: Vec<u64> = self.outbox(args).await?.convert().map_err(err)?;
        let mut dropped = r.first().copied().unwrap_or(0);
        // Refused as erased (an erasure came while they were on their way):
        // their erased form goes instead.
        let erased: Vec<Envelope> =
            r.iter().skip(1).filter_map(|i| events.get((*i as usize).checked_sub(1)?)).map(Envelope::erased).collect();
        if !erased.is_empty() {
            let mut args = vec!["push".to_string(), max.to_string(), max_bytes.to_string()];
            for e in &erased {
                args.push(json(e)?);
            }
            let r: Vec<u64> = self.outbox(args).await?.convert().map_err(err)?;
            dropped += r.first().copied().unwrap_or(0);
        }
        Ok(dropped)
    }

    async fn take(&self, max: usize, claim_idle_ms: u64) -> EngineResult<Vec<Claimed>> {
        let now = crate::protocol::now_ms();
        // Look for a dead node's entries twice per claim period, not every time.
        let last = self.last_claim_ms.load(Ordering::Relaxed);
        let claim = now - last >= (claim_idle_ms / 2) as i64;
        if claim {
            self.last_claim_ms.store(now, Ordering::Relaxed);
        }
        let args = vec![
            "take".to_string(),
            GROUP.to_string(),
            self.inner.node_id.clone(),
            max.to_string(),
            now.to_string(),
            if claim { claim_idle_ms.to_string() } else { "0".to_string() },
        ];
        let flat: Vec<String> = self.outbox(args).await?.convert().map_err(err)?;
        let mut out = Vec::with_capacity(flat.len() / 3);
        for pair in flat.chunks_exact(3) {
            match serde_json::from_str::<Envelope>(&pair[1]) {
                // Erased while it waited (and not rewritten yet): its erased form goes.
                Ok(envelope) if pair[2] == "1" => {
                    out.push(Claimed { envelope: envelope.erased(), handle: pair[0].clone() })
                }
                Ok(envelope) => out.push(Claimed { envelope, handle: pair[0].clone() }),
                Err(e) => {
                    // Not ours to deliver (written by something else): drop it.
                    tracing::warn!(entry = %pair[0], error = %e, "webhook outbox entry unreadable; dropped");
                    let _ = self.outbox(vec!["done".into(), GROUP.into(), pair[0].clone()]).await;
                }
            }
        }
        Ok(out)
    }

    async fn done(&self, event: &Claimed) -> EngineResult<()> {
        self.outbox(vec!["done".into(), GROUP.into(), event.handle.clone()]).await.map(drop)
    }

    async fn retry(&self, event: &Claimed, due_ms: i64) -> EngineResult<()> {
        let args = |e: &Envelope| -> EngineResult<Vec<String>> {
            Ok(vec![
                "retry".into(),
                GROUP.into(),
                event.handle.clone(),
                e.id.clone(),
                due_ms.to_string(),
                e.created_ms.to_string(),
                json(e)?,
            ])
        };
        let r: i64 = self.outbox(args(&event.envelope)?).await?.convert().map_err(err)?;
        if r == -1 {
            // Erased while it was being attempted: only its erased form waits.
            self.outbox(args(&event.envelope.erased())?).await?;
        }
        Ok(())
    }

    async fn schedule_unread(&self, conversation: &str, due_ms: i64) -> EngineResult<()> {
        let args = vec!["schedule".into(), conversation.to_string(), due_ms.to_string()];
        self.inner.scripts.unread.run(&self.inner.pool, vec![self.key("unread")], args).await.map(drop)
    }

    async fn due_unread(&self, now_ms: i64, max: usize) -> EngineResult<Vec<String>> {
        let args = vec!["due".into(), now_ms.to_string(), max.to_string()];
        self.inner.scripts.unread.run(&self.inner.pool, vec![self.key("unread")], args).await?.convert().map_err(err)
    }

    async fn unread_notified(&self, conversation: &str) -> EngineResult<HashMap<String, (u64, i64)>> {
        let raw: HashMap<String, String> =
            self.inner.pool.next().hgetall(self.key(&format!("unread:n:{conversation}"))).await.map_err(err)?;
        Ok(raw
            .into_iter()
            .filter_map(|(user, v)| {
                let (seq, at) = v.split_once(':')?;
                Some((user, (seq.parse().ok()?, at.parse().ok()?)))
            })
            .collect())
    }

    async fn erase(&self, sender: &str, upto_ms: i64, keep_ms: i64) -> EngineResult<u64> {
        let forget_before = crate::protocol::now_ms().saturating_sub(keep_ms);
        self.outbox(vec!["mark".into(), sender.into(), upto_ms.to_string(), forget_before.to_string()]).await?;
        // From now on every push, retry and take sees the erasure; what
        // waits is rewritten here, ERASE_CHUNK entries per call.
        let mut n = 0;
        for (place, start) in [("s", "-"), ("r", "0")] {
            let mut cursor = start.to_string();
            loop {
                let args = vec!["find".into(), place.into(), cursor.clone(), ERASE_CHUNK.to_string()];
                let found: Vec<String> = self.outbox(args).await?.convert().map_err(err)?;
                let Some((next, rest)) = found.split_first() else { break };
                let mut args = vec!["replace".to_string(), place.to_string()];
                for pair in rest.chunks_exact(2) {
                    let Ok(e) = serde_json::from_str::<Envelope>(&pair[1]) else { continue };
                    args.push(pair[0].clone());
                    args.push(json(&e.erased())?);
                }
                if args.len() > 2 {
                    let replaced: u64 = self.outbox(args).await?.convert().map_err(err)?;
                    n += replaced;
                }
                if next.is_empty() {
                    break;
                }
                cursor = next.clone();
            }
        }
        Ok(n)
    }

    async fn set_unread_notified(&self, conversation: &str, user: &str, seq: u64, at_ms: i64) -> EngineResult<()> {
        let key = self.key(&format!("unread:n:{conversation}"));
        let client = self.inner.pool.next();
        let _: () = client.hset(&key, (user, format!("{seq}:{at_ms}"))).await.map_err(err)?;
        let _: () = client.pexpire(&key, NOTIFIED_TTL_MS, None).await.map_err(err)?;
        Ok(())
    }
}
