//! Fault tests of the Valkey engine against real processes: Valkey killed
//! mid-traffic and restarted from its AOF, a crm-chat node killed with
//! SIGKILL, and a node's pub/sub connection cut.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant},
};

use common::{Client, Server, is_presence, start_nodes, unique, valkey::Valkey};
use serde_json::{Value, json};

async fn ready(s: &Server) -> u16 {
    s.http.get(s.url("/readyz")).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

async fn wait_ready(s: &Server, want: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while ready(s).await != want {
        assert!(Instant::now() < deadline, "/readyz never answered {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Collects a client's `message` frames of `conv` by seq until it holds 1..=n.
async fn collect_until(c: &mut Client, conv: &str, n: u64, within: Duration) -> BTreeMap<u64, Value> {
    let mut got = BTreeMap::new();
    let deadline = Instant::now() + within;
    while (got.len() as u64) < n {
        assert!(Instant::now() < deadline, "{conv}: got {} of {n} messages: missing {:?}", got.len(), {
            (1..=n).filter(|s| !got.contains_key(s)).take(20).collect::<Vec<_>>()
        });
        for f in c.drain(Duration::from_millis(200)).await {
            if f["type"] == "message" && f["conversation"] == conv {
                got.insert(f["seq"].as_u64().unwrap(), f);
            }
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_killed_mid_traffic_and_restarted_from_aof_loses_no_acked_message() {
    let mut v = Valkey::start_aof().await;
    let nodes = start_nodes(2, &v.url(), false, &[("CHAT_VALKEY__COMMAND_TIMEOUT_MS", "1000")]).await;
    let conv = unique("deal");
    nodes[0].put_group(&conv, &["sender", "watcher"]).await;
    let mut sender = nodes[0].client("sender").await;
    let mut watcher = nodes[1].client("watcher").await;

    const N: usize = 150;
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut unavailable = 0;
    let (mut killed, mut restarted) = (None::<Instant>, false);
    let mut i = 0;
    while i < N {
        if i == 50 && killed.is_none() {
            v.kill().await;
            killed = Some(Instant::now());
            // Storage down: not ready, but open sockets stay open.
            wait_ready(&nodes[0], 503, Duration::from_secs(10)).await;
            wait_ready(&nodes[1], 503, Duration::from_secs(10)).await;
        }
        if !restarted && killed.is_some_and(|t| t.elapsed() > Duration::from_secs(3)) {
            v.restart().await;
            restarted = true;
        }
        let cmid = format!("m{i}");
        let r = sender
            .request(json!({"type":"send","conversation":conv,"client_msg_id":cmid,"body":format!("message {i}")}))
            .await;
        match r["type"].as_str() {
            Some("ack") => {
                let seq = r["seq"].as_u64().unwrap();
                if let Some(before) = acked.insert(cmid.clone(), seq) {
                    panic!("{cmid} acked twice ({before}, {seq})");
                }
                i += 1;
            }
            Some("error") => {
                // Nothing stored, nothing acked: retry later with the same id.
                assert_eq!(r["code"], "unavailable", "{r}");
                assert!(killed.is_some(), "unavailable while Valkey was up: {r}");
                unavailable += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => panic!("unexpected reply {r}"),
        }
    }
    assert!(unavailable > 0, "the outage was noticed");
    // Both nodes recovered by themselves.
    wait_ready(&nodes[0], 200, Duration::from_secs(15)).await;
    wait_ready(&nodes[1], 200, Duration::from_secs(15)).await;

    // Every acked message is stored once, under the seq it was acked with,
    // and the seqs have no gaps.
    let all = nodes[1].stored(&conv).await;
    let seqs: Vec<u64> = all.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "gap-free");
    let mut by_cmid: HashMap<String, u64> = HashMap::new();
    for m in &all {
        let cmid = m["client_msg_id"].as_str().unwrap().to_string();
        assert!(by_cmid.insert(cmid.clone(), m["seq"].as_u64().unwrap()).is_none(), "{cmid} stored twice");
    }
    assert_eq!(by_cmid, acked, "exactly the acked messages, under their acked seqs");
    assert_eq!(all.len(), N);

    // The watcher on the other node, connected throughout, ends up with every
    // message: live, or re-sent by its node after pub/sub came back.
    let got = collect_until(&mut watcher, &conv, N as u64, Duration::from_secs(20)).await;
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), (1..=N as u64).collect::<Vec<_>>());
    watcher.barrier().await;
    sender.barrier().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_with_sigkill_its_users_go_offline_after_the_lease() {
    let v = Valkey::start().await;
    let lease = 3;
    let nodes = start_nodes(2, &v.url(), false, &[("CHAT_VALKEY__NODE_LEASE_S", "3")]).await;
    let conv = unique("deal");
    nodes[0].put_group(&conv, &["alice", "bob"]).await;
    let mut alice = nodes[0].client("alice").await;
    let _bob = nodes[1].client("bob").await;
    alice.expect("bob online", |f| is_presence(f) && f["conversation"] == conv.as_str() && f["online"] == true).await;
    let r = alice.request(json!({"type":"presence","conversation":conv})).await;
    assert_eq!(r["online"], json!(["alice", "bob"]));
    let killed = Instant::now();
    nodes[1].signal("KILL");
    let off = alice
        .expect("bob offline", |f| is_presence(f) && f["conversation"] == conv.as_str() && f["user"] == "bob")
        .await;
    assert_eq!(off["online"], false);
    let took = killed.elapsed();
    assert!(took <= Duration::from_secs(lease + 2), "offline after {took:?}, lease {lease}s");
    let r = alice.request(json!({"type":"presence","conversation":conv})).await;
    assert_eq!(r["online"], json!(["alice"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_connection_cut_leaves_no_silent_gap() {
    let v = Valkey::start().await;
    let nodes = start_nodes(2, &v.url(), false, &[]).await;
    let conv = unique("deal");
    nodes[0].put_group(&conv, &["alice", "bob"]).await;
    let mut alice = nodes[0].client("alice").await;
    let mut bob = nodes[1].client("bob").await;
    let mut sent = BTreeSet::new();
    for round in 0..3 {
        // Cut every subscriber connection (both nodes'), then send at once.
        v.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).await.expect("client kill");
        for k in 0..20 {
            let r = alice.say(&conv, &format!("r{round} m{k}")).await;
            assert_eq!(r["type"], "ack", "{r}");
            sent.insert(r["seq"].as_u64().unwrap());
        }
    }
    let n = sent.len() as u64;
    assert_eq!(sent, (1..=n).collect());
    let got = collect_until(&mut bob, &conv, n, Duration::from_secs(20)).await;
    assert_eq!(got.len() as u64, n);
    // In order of seq, bodies as sent.
    assert_eq!(got[&1]["body"], "r0 m0");
    assert_eq!(got[&n]["body"], "r2 m19");
    assert!(nodes[1].logs().contains("recovery done") || nodes[0].logs().contains("recovery done"), "recovery ran");
    // Operators see it in /metrics.
    let m = nodes[1].metrics().await;
    assert!(m.lines().any(|l| l.starts_with("chat_pubsub_reconnects_total") && !l.ends_with(" 0")), "{m}");
    let m = nodes[0].metrics().await;
    assert!(m.contains("chat_valkey_command_seconds_bucket{") && m.contains("script=\"append\""), "{m}");
}

/// Issue 22, finding 3: Valkey full (`maxmemory` reached, `noeviction`: every
/// write answers OOM). Connecting still works (`welcome`), reads and history
/// work, sends answer `unavailable` and store nothing; once memory is freed,
/// sends work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_valkey_still_lets_users_connect_and_read() {
    let valkey = Valkey::start_with(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--maxmemory",
        "32mb",
        "--maxmemory-policy",
        "noeviction",
    ])
    .await;
    let nodes = start_nodes(1, &valkey.url(), false, &[]).await;
    let s = &nodes[0];
    let room = unique("room");
    let (a, b) = (unique("a"), unique("b"));
    s.put_group(&room, &[&a, &b]).await;
    let mut alice = s.client(&a).await;
    let ack = alice.say(&room, "before the memory ran out").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    // One write pushes used memory past maxmemory: a 40 MB string.
    valkey.cli(&["SETRANGE", "filler", "40000000", "x"]).await.expect("the filler");
    let refused = valkey.cli(&["SET", "probe", "1"]).await.unwrap_or_default();
    assert!(refused.contains("OOM"), "Valkey refuses writes now: {refused}");

    // A new connection: welcome, with the group and its counters.
    let mut bob = s.client(&b).await;
    let listed = bob.welcome["conversations"].as_array().unwrap();
    assert!(listed.iter().any(|c| c["id"] == room.as_str() && c["last_seq"] == 1), "{}", bob.welcome);
    let page = bob.request(json!({"type":"history","conversation":room,"limit":10})).await;
    assert_eq!(page["type"], "history", "{page}");
    assert_eq!(page["messages"][0]["body"], "before the memory ran out");
    let send = bob.request(json!({"type":"send","conversation":room,"client_msg_id":"full-1","body":"no room"})).await;
    assert_eq!((send["type"].as_str(), send["code"].as_str()), (Some("error"), Some("unavailable")), "{send}");
    let send =
        alice.request(json!({"type":"send","conversation":room,"client_msg_id":"full-2","body":"no room"})).await;
    assert_eq!(send["code"], "unavailable", "{send}");
    let p = bob.request(json!({"type":"presence","conversation":room})).await;
    assert_eq!(p["type"], "presence", "{p}");
    bob.close().await;

    // Memory freed: sends work again, and nothing refused was stored.
    valkey.cli(&["DEL", "filler"]).await.expect("free the filler");
    let ack =
        alice.request(json!({"type":"send","conversation":room,"client_msg_id":"full-2","body":"room again"})).await;
    assert_eq!(
        (ack["type"].as_str(), ack["seq"].as_u64(), ack["duplicate"].as_bool()),
        (Some("ack"), Some(2), Some(false))
    );
    let all = s.stored(&room).await;
    assert_eq!(all.len(), 2, "{all:?}");
}
