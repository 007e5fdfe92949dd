//! Cross-node POSTs of HTTP streaming sessions: a node that receives
//! `POST /stream/chat/<session>` for a session another node holds asks that
//! node through its control channel `<p>:{n:<node>}:ctl` and answers the
//! client only once that node queued the frames (or refused them).
//!
//! A session lives as long as its node's lease (`<p>:{presence}:nodes`): a
//! node whose lease expired holds nothing, so its sessions answer 404
//! without a round trip, and an id naming a live node that does not know it
//! answers 404 from there. Nothing is stored per session in Valkey.

use std::{sync::atomic::Ordering, time::Duration};

use fred::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{Inner, ValkeyEngine, errors::err};
use crate::{
    error::{EngineError, EngineResult},
    hub::streams::Offer,
    protocol::Text,
};

/// How long a forwarding node waits for the holding node's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// A control message between nodes.
#[derive(Serialize, Deserialize)]
#[serde(tag = "t")]
enum Control {
    /// Queue `frames` to `session`; answer on `from`'s channel with `id`.
    #[serde(rename = "q")]
    Request { id: u64, from: String, session: String, frames: Vec<String> },
    /// What became of request `id`: 0 accepted, 1 unknown, 2 full (`retry_ms`).
    #[serde(rename = "a")]
    Answer { id: u64, offer: u8, retry_ms: u64 },
}

fn encode_offer(o: Offer) -> (u8, u64) {
    match o {
        Offer::Accepted => (0, 0),
        Offer::Unknown => (1, 0),
        Offer::Full(ms) => (2, ms),
    }
}

fn decode_offer(code: u8, ms: u64) -> Offer {
    match code {
        0 => Offer::Accepted,
        2 => Offer::Full(ms),
        _ => Offer::Unknown,
    }
}

/// Removes a pending request when its waiter gives up.
struct Pending<'a>(&'a Inner, u64);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.pending.lock().remove(&self.1);
    }
}

impl Inner {
    /// This node's control channel.
    pub(super) fn control_channel(&self) -> String {
        self.keys.node_channel(&self.node_id)
    }

    /// Subscribes to this node's control channel (at start, then from
    /// maintenance until it worked).
    pub(super) async fn subscribe_control(&self) -> EngineResult<()> {
        if self.control_on.load(Ordering::Acquire) {
            return Ok(());
        }
        let ch = self.control_channel();
        if self.cluster {
            self.sub.ssubscribe(ch).await.map_err(err)?;
        } else {
            self.sub.subscribe(ch).await.map_err(err)?;
        }
        self.control_on.store(true, Ordering::Release);
        Ok(())
    }

    async fn publish_to(&self, channel: String, payload: String) -> EngineResult<i64> {
        let client = self.pool.next();
        if self.cluster {
            client.spublish(channel, payload).await.map_err(err)
        } else {
            client.publish(channel, payload).await.map_err(err)
        }
    }

    /// A message on this node's control channel.
    pub(super) fn on_control(self: &std::sync::Arc<Self>, payload: &str) {
        let Ok(msg) = serde_json::from_str::<Control>(payload) else {
            tracing::warn!("undecodable control message");
            return;
        };
        match msg {
            Control::Request { id, from, session, frames } => {
                let offer = self.hub.streams.offer(&session, frames.into_iter().map(Text::from).collect());
                let (code, retry_ms) = encode_offer(offer);
                let answer = serde_json::to_string(&Control::Answer { id, offer: code, retry_ms }).unwrap_or_default();
                let inner = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = inner.publish_to(inner.keys.node_channel(&from), answer).await {
                        tracing::debug!(error = %e, node = from, "cannot answer a forwarded POST");
                    }
                });
            }
            Control::Answer { id, offer, retry_ms } => {
                if let Some(tx) = self.pending.lock().remove(&id) {
                    let _ = tx.send(decode_offer(offer, retry_ms));
                }
            }
        }
    }
}

impl ValkeyEngine {
    pub(super) async fn forward_frames(&self, node: &str, session: &str, frames: Vec<Text>) -> EngineResult<Offer> {
        let i = &self.inner;
        let lease: Option<f64> = i.pool.next().zscore(i.keys.nodes(), node).await.map_err(err)?;
        if !lease.is_some_and(|until| until >= crate::protocol::now_ms() as f64) {
            // No such node, or its lease expired: its sessions are gone.
            return Ok(Offer::Unknown);
        }
        let id = i.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        i.pending.lock().insert(id, tx);
        let _pending = Pending(i, id);
        let request = Control::Request {
            id,
            from: i.node_id.clone(),
            session: session.to_string(),
            frames: frames.iter().map(|f| f.as_str().to_string()).collect(),
        };
        let payload = serde_json::to_string(&request).map_err(|e| EngineError::Internal(e.to_string()))?;
        if i.publish_to(i.keys.node_channel(node), payload).await? == 0 {
            // Nobody listens there: the node is gone.
            return Ok(Offer::Unknown);
        }
        match tokio::time::timeout(ANSWER_WITHIN, rx).await {
            Ok(Ok(offer)) => Ok(offer),
            _ => Err(EngineError::Unavailable(format!("node {node} did not answer a forwarded POST"))),
        }
    }
}
