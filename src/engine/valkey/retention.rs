//! Age retention on a timer (`valkey.retention_max_age_s`): the append
//! script trims old messages only when a conversation is written, so
//! [`Engine::maintain`](crate::engine::Engine::maintain) also walks every
//! conversation's stream (SCAN for `<p>:{c:*}:msgs`, every primary on
//! Cluster) and has `lua/retain.lua` drop what is older than the limit. One
//! node per period does it (a lock key with the period as its expiry).

use std::{sync::atomic::Ordering, time::Duration};

use fred::prelude::*;
use futures_util::StreamExt;

use super::{Inner, errors::err, store::glob_escape};
use crate::error::EngineResult;

/// Entries dropped per script call (each call blocks Valkey for about this
/// many deletions).
const CHUNK: usize = 64;
/// Longest time between two retention walks.
const EVERY_MAX: Duration = Duration::from_secs(60);

impl Inner {
    /// How often the walk runs: a quarter of the age limit, between 1 s and
    /// [`EVERY_MAX`] (and no more often than the maintenance timer).
    pub(super) fn retention_every(&self) -> Duration {
        Duration::from_millis(self.retention_age_ms / 4).clamp(Duration::from_secs(1), EVERY_MAX)
    }

    /// Drops messages older than `valkey.retention_max_age_s` in every
    /// conversation, when the period has passed and no other node holds the
    /// period's lock. Returns how many messages went.
    pub(super) async fn retain(&self) -> EngineResult<u64> {
        if self.retention_age_ms == 0 {
            return Ok(0);
        }
        let now = crate::protocol::now_ms();
        let every = self.retention_every();
        let last = self.retention_walk_ms.load(Ordering::Relaxed);
        if now - last < every.as_millis() as i64 {
            return Ok(0);
        }
        self.retention_walk_ms.store(now, Ordering::Relaxed);
        let k = &self.keys;
        let client = self.pool.next();
        let lock = format!("{}:{{retention}}:lock", k.prefix);
        let won: Option<String> = client
            .set(
                &lock,
                self.node_id.as_str(),
                Some(Expiration::PX(every.as_millis() as i64)),
                Some(SetOptions::NX),
                false,
            )
            .await
            .map_err(err)?;
        if won.is_none() {
            return Ok(0);
        }
        let head = format!("{}:{{c:", k.prefix);
        let tail = "}:msgs";
        let pattern = format!("{}*{}", glob_escape(&head), glob_escape(tail));
        let mut keys = if self.cluster {
            client.scan_cluster_buffered(pattern, Some(1000), None).boxed()
        } else {
            client.scan_buffered(pattern, Some(1000), None).boxed()
        };
        let min_ts = now.saturating_sub(self.retention_age_ms as i64);
        let mut dropped = 0u64;
        while let Some(key) = keys.next().await {
            let key = key.map_err(err)?;
            let Some(conv) = key.as_str().and_then(|s| s.strip_prefix(head.as_str())?.strip_suffix(tail)) else {
                continue;
            };
            if !crate::ids::valid_conversation_id(conv) {
                continue;
            }
            loop {
                let n: u64 = self
                    .scripts
                    .retain
                    .run(
                        &self.pool,
                        vec![k.conv(conv, "msgs"), k.conv(conv, "idem"), k.conv(conv, "mseq"), k.conv(conv, "st")],
                        vec![min_ts.to_string(), k.conv(conv, "own:")],
                    )
                    .await?
                    .convert()
                    .map_err(err)?;
                dropped += n;
                if n < CHUNK as u64 {
                    break;
                }
            }
        }
        if dropped > 0 {
            tracing::debug!(dropped, "messages older than valkey.retention_max_age_s dropped");
        }
        Ok(dropped)
    }
}
