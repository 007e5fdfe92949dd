use super::*;

fn frame(s: &str) -> Text {
    Text::from(s.to_string())
}

/// A connection of `user` (a queue of `frames`, 1 MiB), registered and
/// subscribed to the conversation `conv`.
fn member(hub: &Hub, id: u64, user: &str, frames: usize, conv: &str) -> (Arc<Conn>, Receiver) {
    let (c, rx) = Conn::new(id, user.into(), frames, 1 << 20);
    hub.register(&c);
    hub.subscribe(&c, [conv.into()]);
    (c, rx)
}

#[test]
fn conv_fanout_excludes_and_counts() {
    let hub = Hub::new();
    let (a, ra) = member(&hub, 1, "alice", 8, "g");
    let (b, rb) = member(&hub, 2, "bob", 8, "g");
    let topic = Topic::Conv("g".into());
    assert_eq!(hub.dispatch(&topic, &Event::new(EventKind::Message, frame("m"))), 2);
    assert_eq!(hub.dispatch(&topic, &Event::new(EventKind::Typing, frame("t")).excluding("alice")), 1);
    assert_eq!(ra.try_recv().unwrap().to_text(), "m");
    assert!(ra.try_recv().is_none());
    assert_eq!(rb.try_recv().unwrap().to_text(), "m");
    assert_eq!(rb.try_recv().unwrap().to_text(), "t");
    assert_eq!(hub.unregister(&a), 0);
    assert_eq!(hub.dispatch(&topic, &Event::new(EventKind::Message, frame("m2"))), 1);
    assert!(hub.wants(&topic));
    hub.unregister(&b);
    assert!(!hub.wants(&topic));
    assert!(hub.topics().is_empty());
}

#[test]
fn deferred_fanout_queues_a_run_and_wakes_each_writer_once_when_flushed() {
    use queue::tests::Wakeups;
    let hub = Hub::new();
    let (_a, ra) = member(&hub, 1, "alice", 8, "g");
    let (_b, rb) = member(&hub, 2, "bob", 8, "g");
    // Both writers wait for a frame.
    let wakeups: Vec<Arc<Wakeups>> = (0..2).map(|_| Arc::default()).collect();
    let mut waits: Vec<_> = [&ra, &rb].into_iter().map(|r| Box::pin(r.recv())).collect();
    for (w, n) in waits.iter_mut().zip(&wakeups) {
        assert!(n.poll(w.as_mut()).is_pending());
    }
    let topic = Topic::Conv("g".into());
    let mut wakes = Wakes::default();
    for m in ["m1", "m2", "m3"] {
        assert_eq!(hub.dispatch_deferred(&topic, &Event::new(EventKind::Message, frame(m)), &mut wakes), 2);
    }
    assert!(wakeups.iter().all(|n| n.count() == 0), "no writer woken before the flush");
    wakes.flush();
    assert!(wakeups.iter().all(|n| n.count() == 1), "each writer woken once for the run");
    drop(waits);
    for r in [&ra, &rb] {
        let got: Vec<String> = std::iter::from_fn(|| r.try_recv()).map(|f| f.to_text().to_string()).collect();
        assert_eq!(got, ["m1", "m2", "m3"]);
    }
    // Dropping a run that was not flushed wakes its writers too.
    let wakeup = Arc::new(Wakeups::default());
    let mut wait = Box::pin(ra.recv());
    assert!(wakeup.poll(wait.as_mut()).is_pending());
    let mut wakes = Wakes::default();
    hub.dispatch_deferred(&topic, &Event::new(EventKind::Message, frame("m4")), &mut wakes);
    assert_eq!(wakeup.count(), 0);
    drop(wakes);
    assert_eq!(wakeup.count(), 1);
}

#[test]
fn full_queue_closes_1013_without_blocking_others() {
    let hub = Hub::new();
    let (slow, _rs) = member(&hub, 1, "slow", 8, "g");
    let (_fast, rf) = member(&hub, 2, "fast", 64, "g");
    for _ in 0..20 {
        hub.dispatch(&Topic::Conv("g".into()), &Event::new(EventKind::Message, frame("m")));
    }
    assert_eq!(slow.closer.code(), Some(1013));
    let mut got = 0;
    while rf.try_recv().is_some() {
        got += 1;
    }
    assert_eq!(got, 20);
}

#[test]
fn byte_budget_closes_1013_and_frees_on_take() {
    let (c, rx) = Conn::new(1, "u".into(), 64, 100);
    assert!(c.push(frame(&"a".repeat(60))));
    // 60 + 60 > 100: refused, and the connection is a slow consumer.
    assert!(!c.push(frame(&"b".repeat(60))));
    assert_eq!(c.closer.code(), Some(1013));
    assert_eq!(rx.bytes(), 60);
    rx.try_recv().unwrap();
    assert_eq!(rx.bytes(), 0);
}

#[test]
fn batches_carry_the_latest_state_per_user_once_per_flush() {
    let hub = Hub::new();
    let (_a, ra) = member(&hub, 1, "alice", 64, "general");
    let (_b, rb) = member(&hub, 2, "bob", 64, "general");
    let topic = Topic::Conv("general".into());
    let presence = |user: &str, online: bool| {
        let f = render(&crate::protocol::ServerFrame::PresenceChange(crate::protocol::PresenceChange {
            conversation: "general",
            user,
            online,
        }));
        Event::new(EventKind::Presence, f).excluding(user).batched(true)
    };
    let receipt = |user: &str, d: u64, r: u64| {
        let f = render(&crate::protocol::ServerFrame::Receipt(crate::protocol::Receipt {
            conversation: "general",
            user,
            delivered_seq: d,
            read_seq: r,
        }));
        Event::new(EventKind::Receipt, f).batched(true)
    };
    for e in [presence("carol", true), presence("carol", false), presence("alice", true), presence("dave", true)] {
        assert_eq!(hub.dispatch(&topic, &e), 0, "collected, not sent");
    }
    hub.dispatch(&topic, &receipt("carol", 3, 1));
    hub.dispatch(&topic, &receipt("carol", 5, 2));
    assert!(ra.try_recv().is_none(), "nothing before the flush");
    hub.flush_batches();
    let all = |rx: &Receiver| -> Vec<serde_json::Value> {
        std::iter::from_fn(|| rx.try_recv()).map(|f| serde_json::from_str(&f.to_text()).unwrap()).collect()
    };
    let got_b = all(&rb);
    assert_eq!(got_b.len(), 2, "one receipt and one presence frame: {got_b:?}");
    assert_eq!(got_b[0]["receipts"], serde_json::json!([{"user":"carol","delivered_seq":5,"read_seq":2}]));
    assert_eq!(
        got_b[1]["changes"],
        serde_json::json!([
            {"user":"alice","online":true},{"user":"carol","online":false},{"user":"dave","online":true}
        ])
    );
    // Alice does not hear her own presence.
    let got_a = all(&ra);
    assert_eq!(got_a[1]["changes"], serde_json::json!([{"user":"carol","online":false},{"user":"dave","online":true}]));
    hub.flush_batches();
    assert!(rb.try_recv().is_none(), "a flush with nothing new sends nothing");
    // A conversation nobody here follows collects nothing.
    hub.dispatch(&Topic::Conv("elsewhere".into()), &presence("x", true));
    assert!(hub.batches.lock().is_empty());
}

#[test]
fn disconnect_closes_every_connection_of_the_user_4001() {
    let hub = Hub::new();
    let (a1, r1) = Conn::new(1, "alice".into(), 8, 1 << 20);
    let (a2, _r2) = Conn::new(2, "alice".into(), 8, 1 << 20);
    let (b, _rb) = Conn::new(3, "bob".into(), 8, 1 << 20);
    for c in [&a1, &a2, &b] {
        hub.register(c);
    }
    hub.dispatch(&Topic::User("alice".into()), &Event::new(EventKind::Disconnect, frame("bye")));
    assert_eq!((a1.closer.code(), a2.closer.code(), b.closer.code()), (Some(4001), Some(4001), None));
    assert_eq!(r1.try_recv().unwrap().to_text(), "bye");
}

#[test]
fn membership_event_moves_subscriptions() {
    let hub = Hub::new();
    let (c, rx) = Conn::new(1, "carol".into(), 8, 1 << 20);
    hub.register(&c);
    let conv: Arc<str> = "deal".into();
    let user = Topic::User("carol".into());
    let join = Event::new(EventKind::Membership { conversation: conv.clone(), member: true }, frame("joined"));
    hub.dispatch(&user, &join);
    assert_eq!(hub.dispatch(&Topic::Conv(conv.clone()), &Event::new(EventKind::Message, frame("m"))), 1);
    let leave = Event::new(EventKind::Membership { conversation: conv.clone(), member: false }, frame("left"));
    hub.dispatch(&user, &leave);
    assert_eq!(hub.dispatch(&Topic::Conv(conv), &Event::new(EventKind::Message, frame("m"))), 0);
    let got: Vec<String> = std::iter::from_fn(|| rx.try_recv()).map(|f| f.to_text().to_string()).collect();
    assert_eq!(got, ["joined", "m", "left"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_before_or_during_the_wait_ends_it_and_the_first_code_wins() {
    let early = Closer::default();
    assert!(early.close(4008));
    assert!(!early.close(1000), "the first code wins");
    early.closed().await;
    assert_eq!(early.code(), Some(4008));
    for _ in 0..200 {
        let c = Arc::new(Closer::default());
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.closed().await }
        });
        tokio::task::yield_now().await;
        c.close(1013);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("a waiting close ends when the connection is closed")
            .unwrap();
    }
}
