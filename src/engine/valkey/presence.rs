//! Presence: connection counts per user per node, node leases, and the sweep
//! that claims the users of nodes whose lease expired.

use std::{collections::HashMap, sync::atomic::Ordering};

use async_trait::async_trait;
use fred::prelude::*;

use super::{Inner, ValkeyEngine, errors::err};
use crate::{engine::Presence, error::EngineResult};

impl Inner {
    async fn presence(&self, op: &str, users: &[&str]) -> EngineResult<fred::types::Value> {
        let mut args =
            vec![self.keys.node_prefix(), self.node_id.clone(), crate::protocol::now_ms().to_string(), op.into()];
        args.extend(users.iter().map(|u| u.to_string()));
        self.scripts.presence.run(&self.pool, vec![self.keys.nodes()], args).await
    }

    /// Writes this node's lease and, when it was lost, its connection counts.
    pub(super) async fn refresh_lease(&self) -> EngineResult<()> {
        let expiry = crate::protocol::now_ms() + (self.lease.as_millis() as i64) * 2 / 3;
        let client = self.pool.next();
        let added: i64 = client
            .zadd(self.keys.nodes(), None, None, false, false, (expiry as f64, self.node_id.as_str()))
            .await
            .map_err(err)?;
        if added == 1 || self.presence_lost.swap(false, Ordering::AcqRel) {
            // Swept while we were away (or first start): write our users again.
            let mut counts: HashMap<String, i64> = HashMap::new();
            for c in self.hub.connections() {
                *counts.entry(c.user.to_string()).or_default() += 1;
            }
            let key = format!("{}{}", self.keys.node_prefix(), self.node_id);
            let _: () = client.del(&key).await.map_err(err)?;
            if !counts.is_empty() {
                let _: () = client.hset(&key, counts).await.map_err(err)?;
            }
        }
        Ok(())
    }

    /// Claims nodes whose lease expired; returns their users now offline everywhere.
    pub(super) async fn sweep(&self) -> EngineResult<Vec<String>> {
        let now = crate::protocol::now_ms();
        let dead: Vec<String> =
            self.pool.next().zrangebyscore(self.keys.nodes(), "-inf", now as f64, false, None).await.map_err(err)?;
        let mut gone = Vec::new();
        for node in dead {
            if node == self.node_id {
                continue;
            }
            let users: Vec<String> = self
                .scripts
                .sweep
                .run(&self.pool, vec![self.keys.nodes()], vec![self.keys.node_prefix(), node.clone(), now.to_string()])
                .await?
                .convert()
                .map_err(err)?;
            if users.is_empty() {
                continue;
            }
            tracing::warn!(node, users = users.len(), "node lease expired; its users are offline");
            let refs: Vec<&str> = users.iter().map(String::as_str).collect();
            let still: Vec<String> = self.presence("online", &refs).await?.convert().map_err(err)?;
            gone.extend(users.into_iter().filter(|u| !still.contains(u)));
        }
        Ok(gone)
    }
}

#[async_trait]
impl Presence for ValkeyEngine {
    async fn connection_count(&self, user: &str) -> EngineResult<usize> {
        let n: i64 = self.inner.presence("count", &[user]).await?.convert().map_err(err)?;
        Ok(n.max(0) as usize)
    }

    async fn connect_gate(&self, user: &str, per_s: f64, burst: u32) -> EngineResult<()> {
        // The user's own slot (`{u:<id>}`), like the send bucket off Cluster.
        let key = format!("{}:{{u:{user}}}:connects", self.inner.keys.prefix);
        let args = vec![per_s.to_string(), burst.to_string()];
        let wait: i64 =
            self.inner.scripts.connect.run(&self.inner.pool, vec![key], args).await?.convert().map_err(err)?;
        match wait {
            0 => Ok(()),
            ms => Err(crate::error::EngineError::RateLimited(ms.max(1) as u64)),
        }
    }

    async fn presence_up(&self, user: &str) -> EngineResult<bool> {
        let r: i64 = self.inner.presence("up", &[user]).await?.convert().map_err(err)?;
        Ok(r == 1)
    }

    async fn presence_down(&self, user: &str) -> EngineResult<bool> {
        let r: i64 = self.inner.presence("down", &[user]).await?.convert().map_err(err)?;
        Ok(r == 1)
    }

    async fn online(&self, users: Option<&[String]>) -> EngineResult<Vec<String>> {
        let mut v: Vec<String> = match users {
            Some(list) => {
                if list.is_empty() {
                    return Ok(Vec::new());
                }
                let refs: Vec<&str> = list.iter().map(String::as_str).collect();
                self.inner.presence("online", &refs).await?.convert().map_err(err)?
            }
            None => self.inner.presence("all", &[]).await?.convert().map_err(err)?,
        };
        v.sort();
        Ok(v)
    }
}
