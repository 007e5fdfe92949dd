//! A connection's outbound queue: bounded in frames and in bytes, and holding
//! no memory while it is empty.
//!
//! Most connections are idle most of the time. A channel that allocates its
//! first block of slots at creation (tokio's `mpsc` allocates 32) costs every
//! idle connection that block; this queue allocates when a frame arrives and
//! gives the memory back when the writer has taken the last one, so an idle
//! connection pays only for the struct itself. One consumer (the connection's
//! writer), any number of producers (fan-out on any thread), never waiting:
//! a full queue refuses the frame and the caller closes the slow consumer.

use std::collections::VecDeque;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::protocol::Outgoing;

/// Why [`Queue::push`] refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Frames,
    Bytes,
}

#[derive(Debug)]
pub struct Queue {
    state: Mutex<State>,
    /// Wakes the consumer; `notify_one` keeps a permit when nobody waits, so
    /// a push between the consumer's check and its wait is not missed.
    ready: Notify,
    max_frames: usize,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Outgoing>,
    /// Payload bytes of `frames`.
    bytes: usize,
}

impl State {
    fn pop(&mut self) -> Option<Outgoing> {
        let f = self.frames.pop_front()?;
        self.bytes -= f.len();
        if self.frames.is_empty() {
            // An empty queue holds no memory (a burst's capacity is not kept).
            self.frames = VecDeque::new();
        }
        Some(f)
    }
}

impl Queue {
    pub fn new(max_frames: usize, max_bytes: usize) -> Queue {
        Queue { state: Mutex::default(), ready: Notify::new(), max_frames, max_bytes }
    }

    /// Queues `frame` unless that would pass either bound; never waits.
    /// Waking the consumer is left to the caller: returns whether it must
    /// [`Queue::wake`] it (the queue was empty, so the consumer may be
    /// waiting). Lets a fan-out of several frames wake each consumer once,
    /// after the last.
    pub fn push_quiet(&self, frame: Outgoing) -> Result<bool, Full> {
        let was_empty = {
            let mut s = self.state.lock();
            if s.frames.len() >= self.max_frames {
                return Err(Full::Frames);
            }
            if s.bytes + frame.len() > self.max_bytes {
                return Err(Full::Bytes);
            }
            s.bytes += frame.len();
            s.frames.push_back(frame);
            s.frames.len() == 1
        };
        Ok(was_empty)
    }

    /// Wakes the consumer (or lets its next wait return at once).
    pub fn wake(&self) {
        self.ready.notify_one();
    }

    /// The next frame, waiting for one. Cancel-safe: a frame is taken only
    /// when this returns it.
    pub async fn recv(&self) -> Outgoing {
        loop {
            if let Some(f) = self.try_recv() {
                return f;
            }
            self.ready.notified().await;
        }
    }

    pub fn try_recv(&self) -> Option<Outgoing> {
        self.state.lock().pop()
    }

    /// Hands frames to `put` while `room` accepts the next one, under one
    /// lock.
    pub fn drain(&self, mut room: impl FnMut(&Outgoing) -> bool, mut put: impl FnMut(Outgoing)) {
        let mut s = self.state.lock();
        while s.frames.front().is_some_and(&mut room) {
            put(s.pop().expect("the front frame"));
        }
    }

    /// Frames waiting.
    pub fn len(&self) -> usize {
        self.state.lock().frames.len()
    }

    /// Payload bytes waiting.
    pub fn bytes(&self) -> usize {
        self.state.lock().bytes
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::{
        pin::{Pin, pin},
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::{Context, Poll, Wake, Waker},
        time::Duration,
    };

    use super::*;
    use crate::protocol::Text;

    fn frame(s: &str) -> Outgoing {
        Outgoing::Whole(Text::from(s.to_string()))
    }

    /// A waker that counts its wake-ups (the hub's tests use it too).
    #[derive(Default)]
    pub(in crate::hub) struct Wakeups(AtomicUsize);

    impl Wake for Wakeups {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Wakeups {
        /// Polls `fut` once with a waker that counts here.
        pub(in crate::hub) fn poll<F: Future>(self: &Arc<Self>, fut: Pin<&mut F>) -> Poll<F::Output> {
            let waker = Waker::from(self.clone());
            fut.poll(&mut Context::from_waker(&waker))
        }

        /// Wake-ups so far.
        pub(in crate::hub) fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn both_bounds_refuse_and_taking_frees_room() {
        let q = Queue::new(2, 10);
        assert_eq!(q.push_quiet(frame("abcd")), Ok(true));
        assert_eq!(q.push_quiet(frame("abcdefg")), Err(Full::Bytes));
        assert_eq!(q.push_quiet(frame("efgh")), Ok(false));
        assert_eq!(q.push_quiet(frame("i")), Err(Full::Frames));
        assert_eq!((q.len(), q.bytes()), (2, 8));
        assert_eq!(q.try_recv().map(|f| f.len()), Some(4));
        assert_eq!(q.push_quiet(frame("ij")), Ok(false));
        assert_eq!((q.len(), q.bytes()), (2, 6));
    }

    #[test]
    fn a_waiting_consumer_is_woken_once_and_only_when_asked() {
        let q = Queue::new(8, 1 << 10);
        let wakeups = Arc::new(Wakeups::default());
        let mut recv = pin!(q.recv());
        assert!(wakeups.poll(recv.as_mut()).is_pending(), "nothing queued yet");
        // The first frame into an empty queue asks for a wake-up; the ones
        // after it do not (the consumer will find them with the first).
        assert_eq!(q.push_quiet(frame("a")), Ok(true));
        assert_eq!(q.push_quiet(frame("b")), Ok(false));
        assert_eq!(wakeups.count(), 0, "a quiet push wakes nobody");
        q.wake();
        assert_eq!(wakeups.count(), 1);
        match wakeups.poll(recv.as_mut()) {
            Poll::Ready(f) => assert_eq!(f.to_text(), "a"),
            Poll::Pending => panic!("woken, the consumer finds the first frame"),
        }
        assert_eq!(q.try_recv().map(|f| f.to_text().to_string()).as_deref(), Some("b"));
    }

    #[test]
    fn frames_come_out_in_order_and_an_empty_queue_holds_no_memory() {
        let q = Queue::new(100, 1 << 20);
        for i in 0..40 {
            q.push_quiet(frame(&i.to_string())).unwrap();
        }
        assert!(q.state.lock().frames.capacity() >= 40);
        let mut first = Vec::new();
        q.drain(|f| f.len() == 1, |f| first.push(f.to_text().to_string()));
        assert_eq!(first, (0..10).map(|i| i.to_string()).collect::<Vec<_>>());
        let rest: Vec<String> = std::iter::from_fn(|| q.try_recv()).map(|f| f.to_text().to_string()).collect();
        assert_eq!(rest, (10..40).map(|i| i.to_string()).collect::<Vec<_>>());
        assert_eq!(q.state.lock().frames.capacity(), 0);
        assert_eq!(q.bytes(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_consumer_gets_every_frame_pushed_from_other_threads() {
        let q = Arc::new(Queue::new(usize::MAX, usize::MAX));
        let producers: Vec<_> = (0..4)
            .map(|p| {
                let q = q.clone();
                tokio::spawn(async move {
                    for i in 0..2_000 {
                        if q.push_quiet(frame(&format!("{p}:{i}"))).unwrap() {
                            q.wake();
                        }
                        if i % 100 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        let mut next = [0usize; 4];
        for _ in 0..8_000 {
            let f = tokio::time::timeout(Duration::from_secs(10), q.recv()).await.expect("a pushed frame is received");
            let text = f.to_text().to_string();
            let (p, i) = text.split_once(':').unwrap();
            let p: usize = p.parse().unwrap();
            // Each producer's frames arrive in its order.
            assert_eq!(i.parse::<usize>().unwrap(), next[p]);
            next[p] += 1;
        }
        for p in producers {
            p.await.unwrap();
        }
        assert_eq!(next, [2_000; 4]);
        assert!(q.try_recv().is_none());
    }
}
