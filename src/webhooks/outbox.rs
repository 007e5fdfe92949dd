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
///   (their JSON envelopes, [`Envelope::weight`]) waiting, ready and
///   scheduled for retry together; past either the oldest are dropped, and
///   their number is returned.
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
    ready: VecDeque<Envelope>,
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
    /// [`Envelope::weight`] of every event in `ready` and `waiting`.
    bytes: usize,
}

/// (created ms, a sequence number that keeps equal times apart).
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
        self.ready.len() + self.waiting.len()
    }

    /// Drops the oldest events (by creation) until at most `max` events and
    /// `max_bytes` bytes wait, each in O(log n): a long outage does not make
    /// every push slower.
    fn trim(&mut self, max: usize, max_bytes: usize) -> u64 {
        let mut dropped = 0;
        while self.len() > max || self.bytes > max_bytes {
            // The oldest ready event, or the oldest waiting for a retry (its
            // entry in `retries` is skipped when it comes due).
            let oldest_waiting = self.waiting.first_key_value().map(|(k, _)| *k);
            let gone = match (self.ready.front().map(|e| e.created_ms), oldest_waiting) {
                (Some(r), Some(k)) if k.0 < r => self.waiting.remove(&k).map(|(_, e)| e),
                (Some(_), _) => self.ready.pop_front(),
                (None, Some(k)) => self.waiting.remove(&k).map(|(_, e)| e),
                (None, None) => break,
            };
            self.bytes = self.bytes.saturating_sub(gone.map_or(0, |e| e.weight()));
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
            s.ready.push_back(e);
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
            // Gone when it was trimmed meanwhile.
            if let Some((_, e)) = s.waiting.remove(&k) {
                s.bytes = s.bytes.saturating_sub(e.weight());
                out.push(Claimed { envelope: e, handle: String::new() });
            }
        }
        while out.len() < max {
            let Some(e) = s.ready.pop_front() else { break };
            s.bytes = s.bytes.saturating_sub(e.weight());
            out.push(Claimed { envelope: e, handle: String::new() });
        }
        Ok(out)
    }

    async fn done(&self, _event: &Claimed) -> EngineResult<()> {
        Ok(())
    }

    async fn retry(&self, event: &Claimed, due_ms: i64) -> EngineResult<()> {
        let mut s = self.inner.lock();
        let k = (event.envelope.created_ms, s.next);
        s.next += 1;
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
        for e in state.ready.iter_mut().chain(state.waiting.values_mut().map(|(_, e)| e)) {
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
mod tests {
    use serde_json::json;

    use super::*;

    fn env(id: &str, created_ms: i64) -> Envelope {
        Envelope { erasable: None, id: id.into(), created_ms, attempt: 0, body: "{}".into(), trace: None }
    }

    #[tokio::test]
    async fn the_oldest_events_are_dropped_past_the_bound() {
        let o = MemoryOutbox::default();
        assert_eq!(o.push(&[env("a", 1), env("b", 2)], 3, usize::MAX).await.unwrap(), 0);
        let a = o.take(1, 0).await.unwrap().remove(0);
        assert_eq!(a.envelope.id, "a");
        // "a" waits for a retry far away: it still counts toward the bound.
        o.retry(&a, i64::MAX).await.unwrap();
        assert_eq!(o.push(&[env("c", 3), env("d", 4)], 3, usize::MAX).await.unwrap(), 1, "a, the oldest, goes");
        let ids: Vec<String> = o.take(10, 0).await.unwrap().into_iter().map(|c| c.envelope.id).collect();
        assert_eq!(ids, ["b", "c", "d"]);
    }

    #[tokio::test]
    async fn a_long_outage_keeps_memory_bounded() {
        // Every event fails and waits for a retry far away; the bound drops
        // the oldest. What is kept, heap entries included, stays near `max`.
        let o = MemoryOutbox::default();
        for i in 0..10_000 {
            o.push(&[env(&format!("e{i}"), i)], 100, usize::MAX).await.unwrap();
            for c in o.take(10, 0).await.unwrap() {
                o.retry(&c, i64::MAX).await.unwrap();
            }
        }
        let s = o.inner.lock();
        assert_eq!(s.len(), 100);
        assert!(s.retries.len() <= 2 * 100 + 64 + 1, "heap entries: {}", s.retries.len());
        assert_eq!(s.waiting.first_key_value().map(|(k, _)| k.0), Some(9_900), "the newest 100 are kept");
    }

    #[tokio::test]
    async fn the_oldest_events_are_dropped_past_the_byte_bound() {
        let o = MemoryOutbox::default();
        let big = |id: &str, t: i64| Envelope { body: "x".repeat(1000), ..env(id, t) };
        let w = big("a", 1).weight();
        assert_eq!(o.push(&[big("a", 1), big("b", 2), big("c", 3)], 100, 2 * w).await.unwrap(), 1);
        let a = o.take(1, 0).await.unwrap().remove(0);
        assert_eq!(a.envelope.id, "b");
        o.retry(&a, i64::MAX).await.unwrap();
        assert_eq!(o.inner.lock().bytes, 2 * w, "b waiting, c ready");
        assert_eq!(o.push(&[big("d", 4)], 100, 2 * w).await.unwrap(), 1, "b, the oldest, goes");
        let ids: Vec<String> = o.take(10, 0).await.unwrap().into_iter().map(|c| c.envelope.id).collect();
        assert_eq!(ids, ["c", "d"]);
        assert_eq!(o.inner.lock().bytes, 0);
    }

    #[tokio::test]
    async fn a_retry_comes_back_when_due_and_not_before() {
        let o = MemoryOutbox::default();
        o.push(&[env("a", 1)], 10, usize::MAX).await.unwrap();
        let a = o.take(1, 0).await.unwrap().remove(0);
        assert!(o.take(1, 0).await.unwrap().is_empty(), "taken: not handed out twice");
        o.retry(&a, crate::protocol::now_ms() + 60_000).await.unwrap();
        assert!(o.take(1, 0).await.unwrap().is_empty(), "not due yet");
        let b = o.take(1, 0).await.unwrap();
        assert!(b.is_empty());
        o.retry(&a, 0).await.unwrap();
        assert_eq!(o.take(5, 0).await.unwrap().len(), 1, "the due copy comes back");
    }

    fn created(id: &str, sender: &str, ts_ms: i64) -> Envelope {
        let body = json!({"type":"message.created","timestamp":"t","data":{"sender":{"id":sender},"body":"secret"}});
        Envelope {
            erasable: Some(Erasable { sender: sender.into(), ts_ms }),
            id: id.into(),
            created_ms: ts_ms,
            attempt: 0,
            body: body.to_string(),
            trace: None,
        }
    }

    fn body_of(c: &Claimed) -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&c.envelope.body).unwrap()["data"].clone()
    }

    #[test]
    fn the_erasable_field_leads_the_json() {
        // lua/outbox.lua reads the sender from the start of the envelope.
        let json = serde_json::to_string(&created("e", "alice.b@x-1", 42)).unwrap();
        assert!(json.starts_with(r#"{"erasable":{"sender":"alice.b@x-1","ts_ms":42}"#), "{json}");
        let plain = serde_json::to_string(&env("p", 1)).unwrap();
        assert!(plain.starts_with(r#"{"id":"#), "{plain}");
    }

    #[tokio::test]
    async fn an_erasure_reaches_waiting_retried_and_later_events() {
        let o = MemoryOutbox::default();
        o.push(&[created("a", "alice", 10), created("b", "bob", 11), created("c", "alice", 12)], 100, usize::MAX)
            .await
            .unwrap();
        // "c" is being attempted while the erasure happens.
        let taken = o.take(3, 0).await.unwrap();
        o.push(&[taken[0].envelope.clone(), taken[1].envelope.clone()], 100, usize::MAX).await.unwrap();
        let in_flight = taken[2].clone();
        assert_eq!(o.erase("alice", 100, 60_000).await.unwrap(), 1, "a, waiting");
        o.retry(&in_flight, 0).await.unwrap();
        // A message of alice that arrived before the erasure, pushed after it
        // (it was in a hand-off queue), and one that arrived after it.
        o.push(&[created("d", "alice", 99), created("e", "alice", 101)], 100, usize::MAX).await.unwrap();
        let all = o.take(10, 0).await.unwrap();
        let by_id: HashMap<&str, serde_json::Value> =
            all.iter().map(|c| (c.envelope.id.as_str(), body_of(c))).collect();
        for id in ["a", "c", "d"] {
            assert_eq!(by_id[id]["body"], "", "{id}");
            assert_eq!(by_id[id]["deleted"], true, "{id}");
        }
        assert_eq!(by_id["b"]["body"], "secret", "bob's stays");
        assert_eq!(by_id["e"]["body"], "secret", "after the erasure");
        assert!(
            all.iter().all(|c| !c.envelope.body.contains("secret") || ["b", "e"].contains(&c.envelope.id.as_str()))
        );
    }

    #[tokio::test]
    async fn the_unread_schedule_keeps_the_earliest_time_per_conversation() {
        let o = MemoryOutbox::default();
        o.schedule_unread("c", 200).await.unwrap();
        o.schedule_unread("c", 300).await.unwrap();
        o.schedule_unread("d", 100).await.unwrap();
        o.schedule_unread("c", 150).await.unwrap();
        assert!(o.due_unread(99, 10).await.unwrap().is_empty());
        assert_eq!(o.due_unread(160, 10).await.unwrap(), ["d", "c"]);
        assert!(o.due_unread(1000, 10).await.unwrap().is_empty(), "each is handed out once");
    }
}
