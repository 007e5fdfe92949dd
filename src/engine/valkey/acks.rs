//! Acks after replication (`valkey.ack_replicas`): a stored write is
//! answered only once `WAIT N` says N replicas have it.
//!
//! # Group commit
//! `WAIT` cannot run inside the append script, and it blocks the connection
//! it runs on; it also counts only the writes of *its own* connection (the
//! client's replication offset). So the writes stay on the command pool, and
//! a dedicated client (one connection per primary) confirms them in rounds:
//! a writer whose write completed registers and waits; a round takes every
//! registered writer, makes one tiny write of its own (`SET <bump> PX`),
//! which moves its connection's offset past every write that completed
//! before it, then runs `WAIT N timeout`. One round confirms everything
//! registered before it began; writers that arrive meanwhile go in the next
//! round. Nothing else runs on that connection, so no unrelated command
//! waits behind a `WAIT`.
//!
//! On Cluster, replication is per shard: rounds run per primary (the server
//! that owns the slot, from the client's routing table), and a round's
//! commands are routed by the slot of one of its writers' conversations.
//!
//! Every wait is bounded: `WAIT` by `valkey.ack_timeout_ms`, the round's
//! commands by that plus `valkey.command_timeout_ms`, and a writer gives up
//! after both even if its round never answers. A writer that gives up, or
//! whose round counts fewer than N replicas, answers `unavailable`; its write
//! stays stored, so the client's retry with the same `client_msg_id` finds
//! it (`duplicate: true`) and waits for a round again.

use std::{collections::HashMap, sync::Arc, time::Duration};

use fred::{
    prelude::*,
    types::{ClusterHash, CustomCommand, cluster::ClusterRouting},
};
use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot};

use crate::error::{EngineError, EngineResult};

/// A writer waiting for a round: the key its round may write (a key in its
/// conversation's slot) and where to say how many replicas confirmed.
type Waiter = (String, oneshot::Sender<Result<i64, String>>);

/// The writers waiting on one primary, and the wake-up of its round task.
#[derive(Default)]
struct Shard {
    waiting: Mutex<Vec<Waiter>>,
    wake: Notify,
}

pub(super) struct Acks {
    replicas: i64,
    timeout_ms: i64,
    /// The longest a writer waits for its round's answer.
    give_up: Duration,
    client: Client,
    cluster: bool,
    /// The key a round writes on standalone and Sentinel.
    bump: String,
    /// Per primary (`""` off Cluster).
    shards: Mutex<HashMap<String, Arc<Shard>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Acks {
    pub(super) fn new(client: Client, replicas: i64, timeout_ms: i64, command_timeout: Duration, bump: String) -> Acks {
        let cluster = client.is_clustered();
        Acks {
            replicas,
            timeout_ms,
            give_up: Duration::from_millis(timeout_ms as u64) + command_timeout * 2,
            client,
            cluster,
            bump,
            shards: Mutex::default(),
            tasks: Mutex::default(),
        }
    }

    /// Returns once `replicas` replicas have every write this node completed
    /// in `slot_key`'s slot before the call; `unavailable` when they did not
    /// confirm within the timeout.
    pub(super) async fn confirm(&self, slot_key: &str) -> EngineResult<()> {
        let shard = self.shard(slot_key);
        let (tx, rx) = oneshot::channel();
        shard.waiting.lock().push((slot_key.to_string(), tx));
        shard.wake.notify_one();
        let unconfirmed = |why: String| EngineError::Unconfirmed(format!("by {} replica(s) ({why})", self.replicas));
        match tokio::time::timeout(self.give_up, rx).await {
            Ok(Ok(Ok(n))) if n >= self.replicas => Ok(()),
            Ok(Ok(Ok(n))) => Err(unconfirmed(format!("{n} within {} ms", self.timeout_ms))),
            Ok(Ok(Err(e))) => Err(unconfirmed(e)),
            Ok(Err(_)) => Err(unconfirmed("shutting down".into())),
            Err(_) => Err(unconfirmed("no answer in time".into())),
        }
    }

    /// The waiting room of the primary that owns `slot_key`'s slot, with its
    /// round task started on first use.
    fn shard(&self, slot_key: &str) -> Arc<Shard> {
        let primary = if self.cluster {
            // Unknown routing: the slot alone (a round never confirms writes
            // of another primary).
            let slot = ClusterRouting::hash_key(slot_key.as_bytes());
            let owner = self.client.cached_cluster_state().and_then(|s| s.get_server(slot).map(|s| s.to_string()));
            owner.unwrap_or_else(|| format!("slot {slot}"))
        } else {
            String::new()
        };
        let mut shards = self.shards.lock();
        if let Some(s) = shards.get(&primary) {
            return s.clone();
        }
        let shard = Arc::new(Shard::default());
        shards.insert(primary, shard.clone());
        let round = Rounds {
            client: self.client.clone(),
            replicas: self.replicas,
            timeout_ms: self.timeout_ms,
            cluster: self.cluster,
            bump: self.bump.clone(),
        };
        self.tasks.lock().push(tokio::spawn(round.run(shard.clone())));
        shard
    }

    pub(super) fn shutdown(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }
}

/// One primary's round task.
struct Rounds {
    client: Client,
    replicas: i64,
    timeout_ms: i64,
    cluster: bool,
    bump: String,
}

impl Rounds {
    async fn run(self, shard: Arc<Shard>) {
        loop {
            shard.wake.notified().await;
            let batch = std::mem::take(&mut *shard.waiting.lock());
            let Some((slot_key, _)) = batch.first() else { continue };
            let started = std::time::Instant::now();
            let counted = self.round(slot_key).await.map_err(|e| e.to_string());
            let confirmed = matches!(counted, Ok(n) if n >= self.replicas);
            crate::metrics::valkey_command("wait", started.elapsed().as_secs_f64(), confirmed);
            if !confirmed {
                tracing::warn!(result = ?counted, writes = batch.len(), "valkey: replicas did not confirm a round");
            }
            for (_, tx) in batch {
                let _ = tx.send(counted.clone());
            }
        }
    }

    /// One round: a write of our own (so `WAIT` covers every write completed
    /// before it), then `WAIT`. Returns how many replicas confirmed.
    async fn round(&self, slot_key: &str) -> Result<i64, fred::error::Error> {
        let expire = Some(fred::types::Expiration::PX(60_000));
        let wait = |hash| CustomCommand::new_static("WAIT", hash, true);
        if self.cluster {
            // A key of the writer's slot: the write and WAIT go to its primary.
            let slot = ClusterRouting::hash_key(slot_key.as_bytes());
            let () = self.client.set(slot_key, 1, expire, None, false).await?;
            self.client.custom(wait(ClusterHash::Custom(slot)), vec![self.replicas, self.timeout_ms]).await
        } else {
            let () = self.client.set(&self.bump, 1, expire, None, false).await?;
            self.client.custom(wait(ClusterHash::Random), vec![self.replicas, self.timeout_ms]).await
        }
    }
}
