//! Client frames of HTTP streaming sessions (`POST /stream/chat/<session>`):
//! to the session on this node, or through the engine to the node that
//! holds it (the session id names it).

use super::*;
use crate::{hub::streams::Offer, session::sse::session_node};

impl Node {
    /// Where session `id` is: `Some(true)` open on this node, `Some(false)`
    /// on another node (as far as its id says), `None` nowhere (not a session
    /// id, or this node's and not open).
    pub fn stream_route(&self, id: &str) -> Option<bool> {
        let node = session_node(id)?;
        if node != self.node_id {
            return Some(false);
        }
        self.hub.streams.contains(id).then_some(true)
    }

    /// Hands the frames of one POST to session `id`, here or on its node.
    pub async fn offer_stream(&self, id: &str, frames: Vec<Text>) -> Result<Offer, ChatError> {
        let Some(node) = session_node(id) else { return Ok(Offer::Unknown) };
        if node == self.node_id {
            return Ok(self.hub.streams.offer(id, frames));
        }
        Ok(self.engine.forward(&node, id, frames).await?)
    }
}
