//! A history that went back: after a failover to a replica that missed
//! writes (`valkey.ack_replicas` 0, or writes that were stored but never
//! confirmed), a conversation's `last` can fall below a seq this node
//! already delivered, and new messages would reuse those seqs under the same
//! epoch. Clients dedupe by seq, so that would be a silent gap. Found when
//! the subscriber reconnects (missed-traffic recovery): the conversation gets
//! a new epoch (`regress.lua`, keeping the old one as `prev`), and every
//! local connection that follows it is closed with 1012, so its client
//! reconnects and its `sync` with the old epoch answers `reset: true`.

use std::sync::Arc;

use super::Inner;
use crate::{error::EngineResult, hub::Topic, protocol::close};

/// The conversation's stored state as recovery reads it.
pub(super) struct Meta {
    pub epoch: Arc<str>,
    pub last: u64,
    /// The epoch a history regression replaced, if any.
    pub prev: Option<String>,
}

/// Whether `conv`'s history went back from what this node delivered on
/// `topic` (`mark`: epoch and seq). If so it is announced (see the module
/// docs) and the caller re-sends nothing.
pub(super) async fn regressed(
    inner: &Inner,
    topic: &Topic,
    conv: &Arc<str>,
    meta: &Meta,
    mark: Option<&(Arc<str>, u64)>,
) -> EngineResult<bool> {
    let Some((epoch, seq)) = mark else { return Ok(false) };
    let went_back = if *epoch == meta.epoch {
        if meta.last >= *seq {
            return Ok(false);
        }
        let keys = vec![inner.keys.conv(conv, "meta")];
        let fresh = crate::engine::new_epoch();
        let args = vec![epoch.to_string(), seq.to_string(), fresh.clone()];
        let r: Vec<String> = inner.scripts.regress.run(&inner.pool, keys, args).await?.convert().map_err(super::err)?;
        let (now, prev) = (r.first().map_or("", |s| s.as_str()), r.get(1).map_or("", |s| s.as_str()));
        // Ours, or another node's announcement of the same regression; not
        // when the script found `last` caught up after all.
        now == fresh || (now != &**epoch && prev == &**epoch)
    } else {
        // Another node announced it first.
        meta.prev.as_deref() == Some(&**epoch)
    };
    if !went_back {
        return Ok(false);
    }
    tracing::warn!(conversation = %conv, delivered = seq, stored = meta.last,
        "history went back after a failover: new epoch, followers reconnect");
    inner.delivered.lock().remove(&(topic.clone(), conv.clone()));
    for c in inner.hub.connections() {
        let follows = match topic {
            Topic::User(u) => c.user == *u,
            Topic::Conv(v) => inner.hub.subscriptions(&c).contains(v),
        };
        if follows {
            c.closer.close(close::RESTART);
        }
    }
    Ok(true)
}
