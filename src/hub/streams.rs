//! HTTP streaming sessions open on this node, by session id: where
//! `POST /stream/chat/<session>` (received here, or forwarded from another
//! node through the engine) hands its client frames.
//!
//! Each session has an [`Inbox`] bounded in frames and bytes; a POST that
//! does not fit whole is refused (429), never split, and nothing is
//! allocated for an id that names no open session.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::protocol::Text;

/// Frames one inbox holds at most (two full POSTs).
pub const INBOX_FRAMES: usize = 200;
/// How long a client whose POST did not fit is asked to wait.
pub const INBOX_RETRY_MS: u64 = 250;

/// What became of the frames of one POST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued to the session, whole (202).
    Accepted,
    /// No open session has this id (404).
    Unknown,
    /// The session's inbox is full: retry after this many ms (429).
    Full(u64),
}

/// Client frames waiting for one session, bounded in frames and bytes.
#[derive(Debug)]
pub struct Inbox {
    queue: Mutex<(VecDeque<Text>, usize)>,
    notify: Notify,
    max_bytes: usize,
}

impl Inbox {
    pub fn new(max_bytes: usize) -> Arc<Inbox> {
        Arc::new(Inbox { queue: Mutex::default(), notify: Notify::new(), max_bytes })
    }

    /// Queues every frame or none.
    fn offer(&self, frames: Vec<Text>) -> Offer {
        let bytes: usize = frames.iter().map(|f| f.len()).sum();
        {
            let mut q = self.queue.lock();
            if q.0.len() + frames.len() > INBOX_FRAMES || q.1 + bytes > self.max_bytes {
                return Offer::Full(INBOX_RETRY_MS);
            }
            q.1 += bytes;
            q.0.extend(frames);
        }
        self.notify.notify_one();
        Offer::Accepted
    }

    fn pop(&self) -> Option<Text> {
        let mut q = self.queue.lock();
        let f = q.0.pop_front()?;
        q.1 -= f.len();
        if q.0.is_empty() {
            // An idle session keeps no buffer.
            q.0 = VecDeque::new();
        }
        Some(f)
    }

    /// The next frame. Cancel-safe: a frame is taken only when returned, and
    /// a wake-up that comes while nobody waits is kept for the next call.
    pub async fn recv(&self) -> Text {
        loop {
            if let Some(f) = self.pop() {
                return f;
            }
            self.notify.notified().await;
        }
    }
}

/// Open HTTP streaming sessions of this node.
#[derive(Debug, Default)]
pub struct Streams {
    open: Mutex<HashMap<Arc<str>, Arc<Inbox>>>,
}

impl Streams {
    pub fn insert(&self, id: Arc<str>, inbox: Arc<Inbox>) {
        self.open.lock().insert(id, inbox);
    }

    pub fn remove(&self, id: &str) {
        self.open.lock().remove(id);
    }

    /// Hands the frames of one POST to session `id`.
    pub fn offer(&self, id: &str, frames: Vec<Text>) -> Offer {
        let inbox = self.open.lock().get(id).cloned();
        match inbox {
            Some(inbox) => inbox.offer(frames),
            None => Offer::Unknown,
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.open.lock().contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.open.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Text {
        Text::from(s.to_string())
    }

    #[tokio::test]
    async fn a_post_fits_whole_or_not_at_all() {
        let streams = Streams::default();
        assert_eq!(streams.offer("nope", vec![t("x")]), Offer::Unknown);
        let inbox = Inbox::new(10);
        streams.insert("s".into(), inbox.clone());
        assert_eq!(streams.offer("s", vec![t("12345"), t("678")]), Offer::Accepted);
        assert_eq!(streams.offer("s", vec![t("9"), t("abc")]), Offer::Full(INBOX_RETRY_MS), "11 bytes > 10");
        assert_eq!(inbox.recv().await, t("12345"));
        assert_eq!(streams.offer("s", vec![t("9"), t("abc")]), Offer::Accepted);
        let many = vec![t(""); INBOX_FRAMES];
        assert_eq!(streams.offer("s", many), Offer::Full(INBOX_RETRY_MS), "frames bound");
        assert_eq!(inbox.recv().await, t("678"));
        assert_eq!(inbox.recv().await, t("9"));
        assert_eq!(inbox.recv().await, t("abc"));
        streams.remove("s");
        assert_eq!(streams.offer("s", vec![t("x")]), Offer::Unknown);
    }
}
