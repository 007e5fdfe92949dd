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
    let taken = o.take(10, 0).await.unwrap();
    let ids: Vec<&str> = taken.iter().map(|c| c.envelope.id.as_str()).collect();
    assert_eq!(ids, ["c", "d"]);
    assert_eq!(o.inner.lock().bytes, 2 * w, "being attempted: still counted");
    for c in &taken {
        o.done(c).await.unwrap();
    }
    assert_eq!(o.inner.lock().bytes, 0);
}

#[tokio::test]
async fn an_event_being_attempted_counts_and_stays_dropped_when_the_bound_drops_it() {
    // The webhooks suite saw it: event 15 was being attempted while 16..20
    // were pushed with a bound of 5; its failed attempt put it back as a
    // sixth event, and the oldest survived the bound.
    let o = MemoryOutbox::default();
    o.push(&[env("a", 1)], 2, usize::MAX).await.unwrap();
    let a = o.take(1, 0).await.unwrap().remove(0);
    assert_eq!(o.push(&[env("b", 2)], 2, usize::MAX).await.unwrap(), 0, "a and b: 2");
    assert_eq!(o.push(&[env("c", 3)], 2, usize::MAX).await.unwrap(), 1, "a, being attempted, is the oldest");
    o.retry(&a, 0).await.unwrap();
    let ids: Vec<String> = o.take(10, 0).await.unwrap().into_iter().map(|c| c.envelope.id).collect();
    assert_eq!(ids, ["b", "c"], "a's failed attempt does not bring it back");
    // A settled event no longer counts.
    let o = MemoryOutbox::default();
    o.push(&[env("a", 1), env("b", 2)], 2, usize::MAX).await.unwrap();
    for c in o.take(10, 0).await.unwrap() {
        o.done(&c).await.unwrap();
    }
    assert_eq!(o.push(&[env("c", 3), env("d", 4)], 2, usize::MAX).await.unwrap(), 0);
    let s = o.inner.lock();
    assert_eq!((s.len(), s.in_flight.len()), (2, 0));
}

#[tokio::test]
async fn a_retry_comes_back_when_due_and_not_before() {
    let o = MemoryOutbox::default();
    o.push(&[env("a", 1)], 10, usize::MAX).await.unwrap();
    o.push(&[env("b", 2)], 10, usize::MAX).await.unwrap();
    let a = o.take(1, 0).await.unwrap().remove(0);
    let b = o.take(1, 0).await.unwrap().remove(0);
    assert!(o.take(1, 0).await.unwrap().is_empty(), "taken: not handed out twice");
    o.retry(&a, crate::protocol::now_ms() + 60_000).await.unwrap();
    assert!(o.take(1, 0).await.unwrap().is_empty(), "not due yet");
    o.retry(&b, 0).await.unwrap();
    let again = o.take(5, 0).await.unwrap();
    assert_eq!(again.iter().map(|c| c.envelope.id.as_str()).collect::<Vec<_>>(), ["b"], "the due one comes back");
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
    let by_id: HashMap<&str, serde_json::Value> = all.iter().map(|c| (c.envelope.id.as_str(), body_of(c))).collect();
    for id in ["a", "c", "d"] {
        assert_eq!(by_id[id]["body"], "", "{id}");
        assert_eq!(by_id[id]["deleted"], true, "{id}");
    }
    assert_eq!(by_id["b"]["body"], "secret", "bob's stays");
    assert_eq!(by_id["e"]["body"], "secret", "after the erasure");
    assert!(all.iter().all(|c| !c.envelope.body.contains("secret") || ["b", "e"].contains(&c.envelope.id.as_str())));
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

#[tokio::test]
async fn equal_milliseconds_are_ordered_by_push() {
    // The webhooks suite saw 15 survive and 16 go: both made in the same
    // millisecond, 15 waiting for a retry, 16 ready; the bound dropped the
    // ready one first.
    for attempted in [false, true] {
        let o = MemoryOutbox::default();
        o.push(&[env("a", 7), env("b", 7)], 2, usize::MAX).await.unwrap();
        let a = o.take(1, 0).await.unwrap().remove(0);
        if attempted {
            o.retry(&a, i64::MAX).await.unwrap();
        }
        assert_eq!(o.push(&[env("c", 7)], 2, usize::MAX).await.unwrap(), 1);
        if !attempted {
            o.retry(&a, 0).await.unwrap();
        }
        let ids: Vec<String> = o.take(10, 0).await.unwrap().into_iter().map(|c| c.envelope.id).collect();
        assert_eq!(ids, ["b", "c"], "a, pushed first, is the oldest (retried: {attempted})");
    }
}
