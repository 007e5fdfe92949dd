//! `valkey.ack_replicas`: acks only after replicas confirm (`WAIT`), against
//! a real primary and replica. A stopped replica (SIGSTOP) never confirms.

mod common;

use std::time::{Duration, Instant};

use common::{Server, start_nodes, unique, valkey::Valkey};
use reqwest::Method;
use serde_json::{Value, json};

/// Calls of a command on a server (`INFO commandstats`).
async fn calls(v: &Valkey, cmd: &str) -> u64 {
    let info = v.cli(&["INFO", "commandstats"]).await.unwrap_or_default();
    let prefix = format!("cmdstat_{cmd}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// The messages after seq 190.
async fn stored(s: &Server, conv: &str) -> Vec<Value> {
    let (status, v) = s.api(Method::GET, &format!("/api/v1/conversations/{conv}/messages?after=190"), None).await;
    assert_eq!(status, 200, "{v}");
    v["messages"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_wait_for_a_replica_in_group_commits_and_a_silent_replica_gives_unavailable() {
    let primary = Valkey::start().await;
    let replica = Valkey::start_replica_of(&primary).await;
    let env = [("CHAT_VALKEY__ACK_REPLICAS", "1"), ("CHAT_VALKEY__ACK_TIMEOUT_MS", "500")];
    let nodes = start_nodes(1, &primary.url(), false, &env).await;
    let node = &nodes[0];
    let conv = unique("deal");
    let users: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
    let members: Vec<&str> = users.iter().map(String::as_str).collect();
    node.put_group(&conv, &members).await;

    // Concurrent senders: every send acked, far fewer WAITs than sends.
    let waits_before = calls(&primary, "wait").await;
    let mut tasks = Vec::new();
    for u in &users {
        let mut c = node.client(u).await;
        let conv = conv.clone();
        tasks.push(tokio::spawn(async move {
            let mut futs = Vec::new();
            for i in 0..20 {
                let cmid = format!("{}-{i}", c.user);
                c.send(json!({"type":"send","id":cmid,"conversation":conv,"client_msg_id":cmid,"body":"x"})).await;
                futs.push(cmid);
            }
            let mut acks = 0;
            for cmid in futs {
                let r = c.expect("ack", |v| v["id"] == json!(cmid)).await;
                assert_eq!(r["type"], "ack", "{r}");
                acks += 1;
            }
            (c, acks)
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        let (c, acks) = t.await.unwrap();
        assert_eq!(acks, 20);
        clients.push(c);
    }
    let waits = calls(&primary, "wait").await - waits_before;
    assert!((1..200).contains(&waits), "200 acked sends took {waits} WAITs: no group commit");
    eprintln!("200 concurrent sends: {waits} WAIT rounds");

    // The replica stops confirming: the send is stored on the primary but
    // answered `unavailable` after the timeout, never acked, never hung.
    replica.signal("STOP");
    let mut sender = clients.pop().unwrap();
    let mut reader = clients.pop().unwrap();
    let started = Instant::now();
    let send = json!({"type":"send","conversation":conv,"client_msg_id":"unconfirmed","body":"held"});
    let pending = tokio::spawn(async move {
        let r = sender.request(send).await;
        (sender, r, started.elapsed())
    });
    // Meanwhile unrelated commands are not stuck behind the WAIT.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let h = reader.request(json!({"type":"history","conversation":conv,"limit":5})).await;
    assert_eq!(h["type"], "history", "{h}");
    assert!(t.elapsed() < Duration::from_millis(400), "a read waited {:?} behind a WAIT", t.elapsed());
    let (mut sender, r, took) = pending.await.unwrap();
    assert_eq!(r["code"], "unavailable", "{r}");
    assert!(r["message"].as_str().is_some_and(|m| m.contains("same client_msg_id")), "says it was stored: {r}");
    assert!(took >= Duration::from_millis(450) && took < Duration::from_secs(5), "answered after {took:?}");
    let all = stored(node, &conv).await;
    assert_eq!(all.len(), 11);
    let held = all.iter().find(|m| m["client_msg_id"] == "unconfirmed").expect("stored on the primary");
    let seq = held["seq"].as_u64().unwrap();
    // A repeat while the replica is still silent: unavailable again.
    let r =
        sender.request(json!({"type":"send","conversation":conv,"client_msg_id":"unconfirmed","body":"held"})).await;
    assert_eq!(r["code"], "unavailable", "{r}");

    // Once it confirms, the retry gets the stored seq as a duplicate.
    replica.signal("CONT");
    let deadline = Instant::now() + Duration::from_secs(10);
    let ack = loop {
        let r = sender
            .request(json!({"type":"send","conversation":conv,"client_msg_id":"unconfirmed","body":"held"}))
            .await;
        if r["type"] == "ack" {
            break r;
        }
        assert_eq!(r["code"], "unavailable", "{r}");
        assert!(Instant::now() < deadline, "never confirmed after the replica came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((ack["seq"].as_u64(), ack["duplicate"].as_bool()), (Some(seq), Some(true)), "{ack}");
    assert_eq!(stored(node, &conv).await.len(), 11, "nothing stored twice");

    // The service API's post waits the same way.
    replica.signal("STOP");
    let post = json!({"sender":"u0","body":"from the CRM","client_msg_id":"crm-1"});
    let path = format!("/api/v1/conversations/{conv}/messages");
    let (s, v) = node.api(Method::POST, &path, Some(post.clone())).await;
    assert_eq!((s, v["error"]["code"].as_str()), (503, Some("unavailable")), "{v}");
    replica.signal("CONT");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, v) = node.api(Method::POST, &path, Some(post)).await;
    assert_eq!((s, v["duplicate"].as_bool()), (200, Some(true)), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_any_replica_every_send_is_unavailable_within_the_timeout() {
    let primary = Valkey::start().await;
    let env = [("CHAT_VALKEY__ACK_REPLICAS", "1"), ("CHAT_VALKEY__ACK_TIMEOUT_MS", "200")];
    let nodes = start_nodes(1, &primary.url(), false, &env).await;
    let mut c = nodes[0].client("alice").await;
    let started = Instant::now();
    let r = c.say("general", "nobody replicates this").await;
    assert_eq!(r["code"], "unavailable", "{r}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
}
