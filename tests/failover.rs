//! Sentinel failover for real: a primary, a replica and three Sentinels
//! (`valkey-server --sentinel`, down-after 1 s), two crm-chat nodes in
//! Sentinel mode, and the primary SIGKILLed during traffic.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use common::{
    Client, Server, unique,
    valkey::{Sentinel, Valkey},
};
use reqwest::Method;
use serde_json::{Value, json};

const NAME: &str = "chat-primary";
const DOWN_AFTER_MS: u64 = 1000;

struct Ha {
    primary: Valkey,
    replica: Valkey,
    sentinels: Vec<Sentinel>,
}

impl Ha {
    /// A primary, its replica and three Sentinels that all see both and each other.
    async fn start() -> Ha {
        let primary = Valkey::start().await;
        let replica = Valkey::start_replica_of(&primary).await;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(Sentinel::start(primary.port, NAME, DOWN_AFTER_MS).await);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut all = true;
            for s in &sentinels {
                all &= s.sees(NAME, 1, 2).await;
            }
            if all {
                break;
            }
            assert!(Instant::now() < deadline, "sentinels never saw the replica and each other");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ha { primary, replica, sentinels }
    }

    fn sentinels_env(&self) -> String {
        let addrs: Vec<String> = self.sentinels.iter().map(|s| format!("\"{}\"", s.addr())).collect();
        format!("[{}]", addrs.join(","))
    }

    async fn nodes(&self, n: usize, env: &[(&str, &str)]) -> Vec<Server> {
        let sentinels = self.sentinels_env();
        let mut out = Vec::new();
        for i in 0..n {
            let id = format!("node{i}");
            let mut e: Vec<(&str, &str)> = vec![
                ("CHAT_VALKEY__SENTINELS", &sentinels),
                ("CHAT_VALKEY__SERVICE_NAME", NAME),
                ("CHAT_SERVER__NODE_ID", &id),
                ("CHAT_VALKEY__NODE_LEASE_S", "5"),
                ("CHAT_VALKEY__COMMAND_TIMEOUT_MS", "1000"),
                ("CHAT_LIMITS__SEND_BURST", "10000"),
                ("CHAT_LIMITS__SEND_PER_S", "10000"),
            ];
            e.extend_from_slice(env);
            out.push(Server::start(&e).await);
        }
        out
    }
}

async fn ready(s: &Server) -> u16 {
    s.http.get(s.url("/readyz")).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// A watcher's live `message` frames of `conv`, by seq (a repeat must be identical).
fn take_messages(c: &mut Vec<Value>, conv: &str, got: &mut BTreeMap<u64, String>) {
    for f in c.drain(..) {
        if f["type"] == "message" && f["conversation"] == conv {
            let seq = f["seq"].as_u64().unwrap();
            let cmid = f["client_msg_id"].as_str().unwrap().to_string();
            if let Some(prev) = got.insert(seq, cmid.clone()) {
                assert_eq!(prev, cmid, "seq {seq} delivered as two different messages");
            }
        }
    }
}

async fn watch(c: &mut Client, conv: &str, got: &mut BTreeMap<u64, String>, d: Duration) {
    let mut frames = c.drain(d).await;
    take_messages(&mut frames, conv, got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_with_ack_replicas_1_loses_no_acked_message() {
    let mut ha = Ha::start().await;
    let nodes = ha.nodes(2, &[("CHAT_VALKEY__ACK_REPLICAS", "1"), ("CHAT_VALKEY__ACK_TIMEOUT_MS", "500")]).await;
    let conv = unique("deal");
    nodes[0].put_group(&conv, &["sender", "w0", "w1"]).await;
    let mut sender = nodes[0].client("sender").await;
    let mut watchers = [nodes[0].client("w0").await, nodes[1].client("w1").await];
    let mut seen = [BTreeMap::new(), BTreeMap::new()];

    const N: usize = 120;
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut killed: Option<Instant> = None;
    let mut restarted = false;
    let mut refused_while_alone = 0;
    let mut first_ack_after_restart: Option<Duration> = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut i = 0;
    while i < N {
        assert!(Instant::now() < deadline, "traffic did not finish: {} of {N} acked", acked.len());
        if i == 40 && killed.is_none() {
            // The first Sentinel the nodes know is down too: they ask the others.
            ha.sentinels[0].kill().await;
            ha.primary.kill().await;
            killed = Some(Instant::now());
        }
        let cmid = format!("m{i}");
        let r = sender
            .try_request(json!({"type":"send","conversation":conv,"client_msg_id":cmid,"body":format!("body {i}")}))
            .await
            .expect("the session survives a failover");
        match r["type"].as_str() {
            Some("ack") => {
                let seq = r["seq"].as_u64().unwrap();
                if let Some(prev) = acked.insert(cmid.clone(), seq) {
                    assert_eq!(prev, seq, "{cmid} acked under two seqs");
                }
                if restarted && first_ack_after_restart.is_none() {
                    first_ack_after_restart = Some(killed.unwrap().elapsed());
                }
                i += 1;
            }
            _ => {
                assert_eq!(r["code"], "unavailable", "{r}");
                if killed.is_some() && !restarted {
                    refused_while_alone += 1;
                }
                // The promoted replica has no replica of its own: nothing can
                // be acked until one attaches. The old primary comes back (as
                // an orchestrator would restart it) and Sentinel makes it one.
                // Only once Sentinel promoted the replica: the old primary
                // comes back empty, and back before the failover it would
                // still be the primary, and the replica would copy its empty
                // data set.
                if let Some(k) = killed
                    && !restarted
                    && k.elapsed() > Duration::from_millis(DOWN_AFTER_MS + 3000)
                    && ha.sentinels[1].primary_port(NAME).await == Some(ha.replica.port)
                {
                    ha.primary.restart().await;
                    restarted = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for (w, s) in watchers.iter_mut().zip(seen.iter_mut()) {
            watch(w, &conv, s, Duration::from_millis(1)).await;
        }
    }
    let resumed = first_ack_after_restart.expect("acks resumed");
    eprintln!(
        "failover: acks resumed {resumed:?} after the kill (old primary restarted after at least {} ms, once the replica was promoted); \
         {refused_while_alone} sends refused while no replica could confirm",
        DOWN_AFTER_MS + 3000
    );
    assert!(refused_while_alone > 0, "a send was acked while no replica confirmed");
    let new_primary = ha.sentinels[1].primary_port(NAME).await;
    assert_eq!(new_primary, Some(ha.replica.port), "Sentinel promoted the replica");

    // Every acked message is stored once, under its seq; seqs have no gap.
    let all = nodes[1].stored(&conv).await;
    let by_cmid: HashMap<String, u64> =
        all.iter().map(|m| (m["client_msg_id"].as_str().unwrap().to_string(), m["seq"].as_u64().unwrap())).collect();
    assert_eq!(by_cmid.len(), all.len(), "a client_msg_id stored twice");
    for (cmid, seq) in &acked {
        assert_eq!(by_cmid.get(cmid), Some(seq), "acked {cmid} as seq {seq}");
    }
    let seqs: Vec<u64> = all.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=all.len() as u64).collect::<Vec<_>>());

    // Live delivery on both nodes: a fresh message arrives within seconds,
    // and each watcher holds every message once, matching storage.
    let r = sender.say(&conv, "after the failover").await;
    assert_eq!(r["type"], "ack", "{r}");
    let last = r["seq"].as_u64().unwrap();
    for (w, s) in watchers.iter_mut().zip(seen.iter_mut()) {
        let until = Instant::now() + Duration::from_secs(5);
        while !s.contains_key(&last) {
            assert!(Instant::now() < until, "live delivery did not resume on {}", w.node);
            watch(w, &conv, s, Duration::from_millis(200)).await;
        }
        for (seq, cmid) in s.iter() {
            if let Some(m) = all.get(*seq as usize - 1) {
                assert_eq!(m["client_msg_id"].as_str(), Some(cmid.as_str()), "seq {seq} delivered differently");
            }
        }
    }
    for n in &nodes {
        assert_eq!(ready(n).await, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_every_sentinel_makes_the_node_unready_and_it_recovers_alone() {
    let mut ha = Ha::start().await;
    let nodes = ha.nodes(1, &[]).await;
    let node = &nodes[0];
    let mut c = node.client("alice").await;
    assert_eq!(c.say("general", "before").await["type"], "ack");
    // Sentinels down, then the primary restarts: the node cannot find it.
    for s in &mut ha.sentinels {
        s.kill().await;
    }
    ha.primary.kill().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while ready(node).await == 200 {
        assert!(Instant::now() < deadline, "/readyz kept answering 200 without a primary");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(r) = c.try_request(json!({"type":"send","conversation":"general","client_msg_id":"x","body":"x"})).await
    {
        assert_eq!(r["code"], "unavailable", "{r}");
    }
    // Everything back on the same ports: the node finds its way alone.
    ha.primary.restart().await;
    let ports: Vec<u16> = ha.sentinels.iter().map(|s| s.port).collect();
    ha.sentinels.clear();
    for p in ports {
        ha.sentinels.push(Sentinel::start_on(Some(p), ha.primary.port, NAME, DOWN_AFTER_MS).await);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready(node).await != 200 {
        assert!(Instant::now() < deadline, "the node did not recover:\n{}", node.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = c.try_request(json!({"type":"send","conversation":"general","client_msg_id":"y","body":"y"})).await;
    let r = match r {
        Some(r) => r,
        None => {
            c = node.client("alice").await;
            c.say("general", "after").await
        }
    };
    assert_eq!(r["type"], "ack", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_a_replica_that_missed_writes_is_announced_with_ack_replicas_0() {
    let mut ha = Ha::start().await;
    let nodes = ha.nodes(2, &[]).await;
    let conv = unique("deal");
    nodes[0].put_group(&conv, &["sender", "w0", "w1"]).await;
    let mut sender = nodes[0].client("sender").await;
    let mut watchers = vec![nodes[0].client("w0").await, nodes[1].client("w1").await];
    for i in 1..=10 {
        assert_eq!(sender.say(&conv, &format!("replicated {i}")).await["type"], "ack");
    }
    let h = sender.request(json!({"type":"history","conversation":conv,"limit":1})).await;
    let epoch = h["epoch"].as_str().expect("history carries the epoch").to_string();
    // The replica stops and its link is cut: what follows reaches the primary only.
    ha.replica.signal("STOP");
    ha.primary.cli(&["CLIENT", "KILL", "TYPE", "replica"]).await.expect("client kill");
    let mut acked = Vec::new();
    for i in 11..=20 {
        let r = sender.say(&conv, &format!("primary only {i}")).await;
        assert_eq!(r["type"], "ack", "{r}");
        acked.push(r["seq"].as_u64().unwrap());
    }
    for w in &mut watchers {
        let mut got = BTreeMap::new();
        let until = Instant::now() + Duration::from_secs(5);
        while !got.contains_key(&20) {
            assert!(Instant::now() < until, "live delivery before the failover");
            watch(w, &conv, &mut got, Duration::from_millis(100)).await;
        }
    }
    ha.primary.kill().await;
    ha.replica.signal("CONT");
    let until = Instant::now() + Duration::from_secs(30);
    while ha.sentinels[0].primary_port(NAME).await != Some(ha.replica.port) {
        assert!(Instant::now() < until, "no failover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The nodes follow the new primary (they may not have yet).
    let until = Instant::now() + Duration::from_secs(15);
    let path = format!("/api/v1/conversations/{conv}/messages?limit=100");
    let kept = loop {
        let (status, v) = nodes[1].api(Method::GET, &path, None).await;
        if status == 200 {
            break v["messages"].as_array().unwrap().len() as u64;
        }
        assert!(Instant::now() < until, "the node never followed the new primary: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("the promoted replica holds {kept} of 20 messages");
    if kept >= 20 {
        return; // Nothing was lost.
    }
    // Lost: every client that saw the lost seqs is told. Its connection is
    // closed (1012), and after reconnecting its sync answers reset.
    for (i, mut w) in watchers.into_iter().enumerate() {
        let (_, end) = w.until_closed(Duration::from_secs(20)).await;
        assert_eq!(end, common::Ended::Close(1012), "watcher {i}");
        let mut again = nodes[i].client(&format!("w{i}")).await;
        let entry = again.conversation(&conv).expect("listed").clone();
        assert_ne!(entry["epoch"].as_str(), Some(epoch.as_str()), "a new epoch: {entry}");
        let r = again.request(json!({"type":"sync","conversation":conv,"after":20,"limit":100,"epoch":epoch})).await;
        assert_eq!(r["reset"], true, "{r}");
    }
    // New messages get seqs the clients hold no stale copy of.
    let mut sender = nodes[0].client("sender").await;
    let r = sender.say(&conv, "after the loss").await;
    assert_eq!(r["type"], "ack", "{r}");
}
