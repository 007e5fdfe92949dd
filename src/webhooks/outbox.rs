//! Where events wait for delivery: the [`Outbox`] contract and the embedded
//! engine's in-process outbox. The Valkey engine's (a stream with a consumer
//! group, shared by every node) is in `engine/valkey/outbox.rs`.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque},
    sync::Arc,
};

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::EngineResult;

/// One event on its way to the receiver. `body` is fixed when the event is
/// made: every attempt sends the same bytes under the same `id` — unless an
/// erasure of the sender removes the body first ([`Envelope::erased`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// `message.created` only: whose body the event carries, so an erasure
    /// of that user finds it. Serialised first: the Valkey outbox script
    /// reads it from the start of the JSON (`lua/outbox.lua`, `erased`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erasable: Option<Erasable>,
    /// `webhook-id`: the receiver deduplicates by it.
    pub id: String,
    /// When the event happened (ms since the epoch): its age decides when it
    /// is given up, and delivery latency is measured from it.
    pub created_ms: i64,
    /// Failed attempts so far.
    pub attempt: u32,
    /// The JSON body: `{"type","timestamp","data"}`.
    pub body: String,
    /// The W3C `traceparent` of the action that made the event, so the
    /// delivery span links to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// The author of a body an event carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Erasable {
    pub sender: String,
    /// When the message arrived (its `ts`, ms): an erasure covers the
    /// messages that arrived up to its time.
    pub ts_ms: i64,
}

impl Envelope {
    /// What the event weighs toward `webhooks.outbox_max_bytes`: about its
    /// JSON envelope's length (the body dominates).
    pub fn weight(&self) -> usize {
        self.body.len() + self.id.len() + self.trace.as_ref().map_or(0, String::len) + 64
    }

    /// Whether an erasure of `sender` up to `upto_ms` covers this event.
    pub fn erased_by(&self, sender: &str, upto_ms: i64) -> bool {
        self.erasable.as_ref().is_some_and(|e| e.sender == sender && e.ts_ms <= upto_ms)
    }

    /// The event with its body erased, as history shows an erased message:
    /// the same `id`, type and data, `body` empty and `deleted: true`
    /// (receivers that deduplicate by `webhook-id` and count events still
    /// see it once).
    pub fn erased(&self) -> Envelope {
        let body = match serde_json::from_str::<serde_json::Value>(&self.body) {
            Ok(mut v) => {
                if let Some(d) = v.get_mut("data").and_then(|d| d.as_object_mut()) {
                    d.insert("body".into(), "".into());
                    d.insert("deleted".into(), true.into());
                }
                v.to_string()
            }
            // Never ours; nothing of it leaves.
            Err(_) => r#"{"type":"message.created","data":{"body":"","deleted":true}}"#.to_string(),
        };
        Envelope { erasable: None, body, ..self.clone() }
    }
}

/// An event this node took for delivery. `handle` is the outbox's own
/// reference to it (the stream entry id on Valkey).
#[derive(Debug, Clone)]
pub struct Claimed {
    pub envelope: Envelope,
    pub handle: String,
}

/// Events waiting for delivery, and the `message.unread` schedule.
///
/// # Contract
/// - [`push`](Outbox::push) keeps at most `max` events and `max_bytes` bytes
///   (their JSON envelopes, [`Envelope::weight`]) waiting: ready, scheduled
///   for retry and being attempted together; past either the oldest are
///   dropped, and their number is returned. An event dropped while it is
///   being attempted stays dropped: its [`retry`](Outbox::retry) does
///   nothing (a failed attempt cannot bring it back past the bound).
/// - An event is handed out by [`take`](Outbox::take) to one node at a time.
///   It is handed out again only after [`retry`](Outbox::retry) comes due,
///   or — on an outbox shared by several nodes — when the node that took it
///   left it unfinished for `claim_idle` (the node died): at least once,
///   never lost while the outbox's storage lasts.
/// - [`done`](Outbox::done) forgets an event for good.
/// - The unread schedule keeps one due time per conversation, the earliest
///   asked for; [`due_unread`](Outbox::due_unread) hands each due
///   conversation to one node and forgets it.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Queues events. Returns how many older events were dropped to stay
    /// within `max` events and `max_bytes` bytes.
    async fn push(&self, events: &[Envelope], max: usize, max_bytes: usize) -> EngineResult<u64>;

    /// Up to `max` events for this node to deliver now: due retries, events
    /// left unfinished by a dead node (taken more than `claim_idle_ms` ago),
    /// then new ones.
    async fn take(&self, max: usize, claim_idle_ms: u64) -> EngineResult<Vec<Claimed>>;

    /// Delivered, or given up.
    async fn done(&self, event: &Claimed) -> EngineResult<()>;

    /// Failed: hand it out again at `due_ms` (its `attempt` already raised).
    async fn retry(&self, event: &Claimed, due_ms: i64) -> EngineResult<()>;

    /// Asks for a `message.unread` check of `conversation` at `due_ms` (or
    /// earlier, if one is due earlier already).
    async fn schedule_unread(&self, conversation: &str, due_ms: i64) -> EngineResult<()>;

    /// Conversations whose check is due at `now_ms`, at most `max`; each is
    /// handed to one node and leaves the schedule.
    async fn due_unread(&self, now_ms: i64, max: usize) -> EngineResult<Vec<String>>;

    /// Per member of `conversation`: the last seq they were notified about and when (ms).
    async fn unread_notified(&self, conversation: &str) -> EngineResult<HashMap<String, (u64, i64)>>;

    /// Records that `user` was notified about `conversation` up to `seq` at `at_ms`.
    async fn set_unread_notified(&self, conversation: &str, user: &str, seq: u64, at_ms: i64) -> EngineResult<()>;

    /// An erasure of `sender`'s messages that arrived up to `upto_ms`: every
    /// waiting event carrying such a body gets its [`erased`](Envelope::erased)
    /// form, and so does every such event pushed, retried or handed out
    /// later (events on their way from a node's hand-off queue, or being
    /// attempted right now). The erasure is remembered for `keep_ms`.
    /// Returns how many waiting events were rewritten.
    async fn erase(&self, sender: &str, upto_ms: i64, keep_ms: i64) -> EngineResult<u64>;
}

/// The embedded engine's outbox: in process memory, so events not delivered
/// yet are lost when the process stops (docs/crm-integration.md says so).
#[derive(Default)]
pub struct MemoryOutbox {
    inner: Mutex<MemoryState>,
}

#[derive(Default)]
struct MemoryState {
    /// Events not taken yet, in the order pushed, each under its key.
    ready: VecDeque<(WaitKey, Envelope)>,
    /// Retries by due time: (due ms, key in `waiting`).
    retries: BinaryHeap<Reverse<(i64, WaitKey)>>,
    /// Events waiting for a retry, oldest (by creation) first, with their due time.
    waiting: BTreeMap<WaitKey, (i64, Envelope)>,
    next: u64,
    /// Unread checks: (due, conversation), and conversation -> due.
    unread: BTreeSet<(i64, Arc<str>)>,
    unread_due: HashMap<Arc<str>, i64>,
    notified: HashMap<String, HashMap<String, (u64, i64)>>,
    /// Erasures: sender -> (up to ms, remembered until ms).
    erased: HashMap<String, (i64, i64)>,
    /// Events handed out and not settled yet, by key (their handle), with
    /// their weight: they count toward the bound as on Valkey, where a
    /// taken entry stays in the stream until it is settled.
    in_flight: BTreeMap<WaitKey, usize>,
    /// [`Envelope::weight`] of every event in `ready`, `waiting` and `in_flight`.
    bytes: usize,
}

/// (created ms, the push order): given once, when the event is pushed, and
/// kept through attempts and retries, so "oldest" breaks ties of equal
/// milliseconds by push order (a burst of events shares a millisecond).
type WaitKey = (i64, u64);

impl MemoryState {
    /// `e`, or its erased form when an erasure covers it.
    fn unless_erased(&self, e: &Envelope) -> Envelope {
        match &e.erasable {
            Some(a) if self.erased.get(&a.sender).is_some_and(|(upto, _)| a.ts_ms <= *upto) => e.erased(),
            _ => e.clone(),
        }
    }

    fn len(&self) -> usize {
        self.ready.len() + self.waiting.len() + self.in_flight.len()
    }

    /// Hands `e` out: it stays counted, under its key, until settled.
    fn hand_out(&mut self, k: WaitKey, e: Envelope) -> Claimed {
        self.in_flight.insert(k, e.weight());
        Claimed { envelope: e, handle: format!("{}:{}", k.0, k.1) }
    }

    /// Settles a handed-out event: its key if it was still counted, `None`
    /// when the bound dropped it meanwhile.
    fn settle(&mut self, handle: &str) -> Option<WaitKey> {
        let (t, n) = handle.split_once(':')?;
        let k = (t.parse().ok()?, n.parse().ok()?);
        let w = self.in_flight.remove(&k)?;
        self.bytes = self.bytes.saturating_sub(w);
        Some(k)
    }

    /// Drops the oldest events (by creation) until at most `max` events and
    /// `max_bytes` bytes wait, each in O(log n): a long outage does not make
    /// every push slower.
    fn trim(&mut self, max: usize, max_bytes: usize) -> u64 {
        let mut dropped = 0;
        while self.len() > max || self.bytes > max_bytes {
            // The oldest of: the first ready event, the first waiting for a
            // retry (its entry in `retries` is skipped when it comes due),
            // the first being attempted (its settling finds it gone).
            let ready = self.ready.front().map(|(k, _)| *k);
            let waiting = self.waiting.first_key_value().map(|(k, _)| *k);
            let in_flight = self.in_flight.first_key_value().map(|(k, _)| *k);
            let oldest = [ready, waiting, in_flight].into_iter().flatten().min();
            let gone = match oldest {
                None => break,
                Some(k) if ready == Some(k) => self.ready.pop_front().map(|(_, e)| e.weight()),
                Some(k) if waiting == Some(k) => self.waiting.remove(&k).map(|(_, e)| e.weight()),
                Some(k) => self.in_flight.remove(&k),
            };
            self.bytes = self.bytes.saturating_sub(gone.unwrap_or(0));
            dropped += 1;
        }
        dropped
    }
}

#[async_trait]
impl Outbox for MemoryOutbox {
    async fn push(&self, events: &[Envelope], max: usize, max_bytes: usize) -> EngineResult<u64> {
        let mut s = self.inner.lock();
        for e in events {
            let e = s.unless_erased(e);
            s.bytes += e.weight();
            let k = (e.created_ms, s.next);
            s.next += 1;
            s.ready.push_back((k, e));
        }
        Ok(s.trim(max, max_bytes))
    }

    async fn take(&self, max: usize, _claim_idle_ms: u64) -> EngineResult<Vec<Claimed>> {
        let now = crate::protocol::now_ms();
        let mut s = self.inner.lock();
        let mut out = Vec::new();
        while out.len() < max {
            match s.retries.peek() {
                Some(Reverse((due, _))) if *due <= now => {}
                _ => break,
            }
            let Some(Reverse((_, k))) = s.retries.pop() else { break };
            // Gone when it was trimmed meanwhile. Its weight moves to `in_flight`.
            if let Some((_, e)) = s.waiting.remove(&k) {
                out.push(s.hand_out(k, e));
            }
        }
        while out.len() < max {
            let Some((k, e)) = s.ready.pop_front() else { break };
            out.push(s.hand_out(k, e));
        }
        Ok(out)
    }

    async fn done(&self, event: &Claimed) -> EngineResult<()> {
        self.inner.lock().settle(&event.handle);
        Ok(())
    }

    async fn retry(&self, event: &Claimed, due_ms: i64) -> EngineResult<()> {
        let mut s = self.inner.lock();
        // Dropped past the bound while it was attempted: it stays dropped.
        let Some(k) = s.settle(&event.handle) else { return Ok(()) };
        // An erasure while it was being attempted: only the erased form waits.
        let e = s.unless_erased(&event.envelope);
        s.bytes += e.weight();
        s.waiting.insert(k, (due_ms, e));
        s.retries.push(Reverse((due_ms, k)));
        // Entries of events dropped by the bound linger in the heap until
        // due: rebuild it when they outnumber the live ones.
        if s.retries.len() > 2 * s.waiting.len() + 64 {
            s.retries = s.waiting.iter().map(|(k, (due, _))| Reverse((*due, *k))).collect();
        }
        Ok(())
    }

    async fn schedule_unread(&self, conversation: &str, due_ms: i64) -> EngineResult<()> {
        let mut s = self.inner.lock();
        let key: Arc<str> = conversation.into();
        match s.unread_due.get(&key) {
            Some(&d) if d <= due_ms => {}
            Some(&d) => {
                s.unread.remove(&(d, key.clone()));
                s.unread.insert((due_ms, key.clone()));
                s.unread_due.insert(key, due_ms);
            }
            None => {
                s.unread.insert((due_ms, key.clone()));
                s.unread_due.insert(key, due_ms);
            }
        }
        Ok(())
    }

    async fn due_unread(&self, now_ms: i64, max: usize) -> EngineResult<Vec<String>> {
        let mut s = self.inner.lock();
        let mut out = Vec::new();
        while out.len() < max {
            let Some((due, c)) = s.unread.first().cloned() else { break };
            if due > now_ms {
                break;
            }
            s.unread.pop_first();
            s.unread_due.remove(&c);
            out.push(c.to_string());
        }
        Ok(out)
    }

    async fn unread_notified(&self, conversation: &str) -> EngineResult<HashMap<String, (u64, i64)>> {
        Ok(self.inner.lock().notified.get(conversation).cloned().unwrap_or_default())
    }

    async fn set_unread_notified(&self, conversation: &str, user: &str, seq: u64, at_ms: i64) -> EngineResult<()> {
        self.inner.lock().notified.entry(conversation.to_string()).or_default().insert(user.to_string(), (seq, at_ms));
        Ok(())
    }

    async fn erase(&self, sender: &str, upto_ms: i64, keep_ms: i64) -> EngineResult<u64> {
        let now = crate::protocol::now_ms();
        let mut s = self.inner.lock();
        s.erased.retain(|_, (_, until)| *until > now);
        let e = s.erased.entry(sender.to_string()).or_insert((upto_ms, 0));
        *e = (e.0.max(upto_ms), now.saturating_add(keep_ms));
        let mut n = 0;
        let state = &mut *s;
        for e in state.ready.iter_mut().map(|(_, e)| e).chain(state.waiting.values_mut().map(|(_, e)| e)) {
            if e.erased_by(sender, upto_ms) {
                let erased = e.erased();
                state.bytes = state.bytes.saturating_sub(e.weight()) + erased.weight();
                *e = erased;
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
