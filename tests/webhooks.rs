//! Webhooks (PROTOCOL v1.1, *Webhooks*) against a real HTTP receiver on
//! loopback, on the embedded engine and on two nodes sharing a real Valkey:
//! every event type once per action, signed (checked by an implementation
//! written here from the Standard Webhooks text, and by the reference Python
//! library when `CRM_CHAT_WEBHOOK_PYTHON` names a Python that has it, as
//! `.ci/run` arranges), nothing lost while the receiver is down or when the
//! node that queued the events is killed, each event delivered by one node,
//! and the outbox's bounds.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use common::{Chat, Engine, unique};
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use serde_json::{Value, json};
use sha2::Sha256;

/// 40 bytes: a plain secret is used as its bytes.
const SECRET: &str = "test-webhook-secret-0123456789-abcdefghij";

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Seen {
    id: String,
    timestamp: String,
    signature: String,
    body: String,
    json: Value,
}

#[derive(Default)]
struct ReceiverState {
    seen: Mutex<Vec<Seen>>,
    /// Answer 503 (connections already open when it went down).
    down: AtomicBool,
    /// Answer nothing for a long time (then 503): attempts time out.
    hang: AtomicBool,
    /// Requests answered 503.
    refused: std::sync::atomic::AtomicUsize,
}

/// A real HTTP receiver on 127.0.0.1 that records every request. `down()`
/// stops listening (connections are refused), `up()` listens again on the
/// same port.
struct Receiver {
    addr: SocketAddr,
    state: Arc<ReceiverState>,
    task: Option<tokio::task::JoinHandle<()>>,
}

async fn record(State(s): State<Arc<ReceiverState>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if s.hang.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_secs(60)).await;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    if s.down.load(Ordering::SeqCst) {
        s.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let body = String::from_utf8(body.to_vec()).expect("utf-8 body");
    let json = serde_json::from_str(&body).expect("JSON body");
    s.seen.lock().push(Seen {
        id: h("webhook-id"),
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
        body,
        json,
    });
    StatusCode::NO_CONTENT
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut r = Receiver { addr, state: Arc::default(), task: None };
        r.serve(listener);
        r
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new().route("/hook", post(record)).with_state(self.state.clone());
        self.task = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn down(&mut self) {
        self.state.down.store(true, Ordering::SeqCst);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.expect("the receiver's port again");
        self.serve(listener);
        self.state.down.store(false, Ordering::SeqCst);
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().clone()
    }

    fn of_type(&self, ty: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.json["type"] == ty).collect()
    }

    /// Waits until `pred` holds for what was received, or panics after `within`.
    async fn wait_for(&self, what: &str, within: Duration, pred: impl Fn(&[Seen]) -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let seen = self.seen();
            if pred(&seen) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let types: Vec<String> = seen.iter().map(|s| s.json["type"].to_string()).collect();
                panic!("webhooks: {what} not within {within:?}; received {} events: {types:?}", seen.len());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The signature check, written from the Standard Webhooks text: HMAC-SHA256
/// over `id.timestamp.body`, base64, after `v1,`; the timestamp recent.
fn verify(s: &Seen) -> Result<(), String> {
    let ts: i64 = s.timestamp.parse().map_err(|_| format!("webhook-timestamp '{}' not a number", s.timestamp))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    if (now - ts).abs() > 300 {
        return Err(format!("webhook-timestamp {ts} is {}s off", now - ts));
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{}.{}.{}", s.id, s.timestamp, s.body).as_bytes());
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    if s.signature.split(' ').any(|sig| sig == expected) {
        Ok(())
    } else {
        Err(format!("signature {} != {expected}", s.signature))
    }
}

/// The reference library's verdict on every request (none when it is not installed).
fn verify_with_reference_library(seen: &[Seen]) {
    let Ok(python) = std::env::var("CRM_CHAT_WEBHOOK_PYTHON") else {
        eprintln!("CRM_CHAT_WEBHOOK_PYTHON unset: signatures checked by the in-test implementation only");
        return;
    };
    let items: Vec<Value> = seen
        .iter()
        .map(|s| json!({"id": s.id, "timestamp": s.timestamp, "signature": s.signature, "body": s.body}))
        .collect();
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
wh = Webhook(sys.argv[1].encode())
items = json.load(sys.stdin)
for it in items:
    wh.verify(it["body"], {"webhook-id": it["id"], "webhook-timestamp": it["timestamp"], "webhook-signature": it["signature"]})
print(len(items))
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", script, SECRET])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the reference verifier");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(serde_json::to_string(&items).unwrap().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the standard-webhooks library refused a signature: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), seen.len().to_string());
}

fn hook_env<'a>(receiver: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("CHAT_WEBHOOKS__URL", receiver),
        ("CHAT_WEBHOOKS__SECRET", SECRET),
        ("CHAT_WEBHOOKS__TIMEOUT_MS", "1000"),
        ("CHAT_WEBHOOKS__MAX_BACKOFF_S", "2"),
    ];
    env.extend_from_slice(extra);
    env
}

/// Generates one test per engine: embedded, and two nodes on one Valkey.
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Engine::Memory).await
                }
            )*
        }
        mod valkey_two_nodes {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Engine::Valkey { nodes: 2 }).await
                }
            )*
        }
    };
}

both_engines!(
    every_event_type_arrives_once_per_action_signed,
    the_receiver_down_for_30_s_loses_nothing,
    an_erasure_removes_the_body_from_events_not_delivered_yet,
    the_outbox_is_bounded_in_bytes_too
);

/// Issue 22, finding 3: with the receiver down, 80 events of ~24 KB each
/// (bodies of control characters) exceed `webhooks.outbox_max_bytes` (1 MiB)
/// long before `outbox_max`: the oldest are dropped (counted as
/// `outbox_full`), and what arrives when the receiver is back is the newest.
async fn the_outbox_is_bounded_in_bytes_too(engine: Engine) {
    const N: u64 = 80;
    let mut receiver = Receiver::start().await;
    let url = receiver.url();
    let extra = [
        ("CHAT_WEBHOOKS__OUTBOX_MAX_BYTES", "1048576"),
        ("CHAT_LIMITS__SEND_BYTES_PER_S", "100000000"),
        ("CHAT_LIMITS__SEND_BYTES_BURST", "100000000"),
        ("CHAT_LIMITS__SEND_BURST", "1000"),
    ];
    let chat: Chat = engine.start(&hook_env(&url, &extra)).await;
    let room = unique("room");
    let (a, b) = (unique("a"), unique("b"));
    chat.put_group(&room, &[&a, &b]).await;
    receiver.wait_for("conversation.updated", Duration::from_secs(10), |s| s.len() == 1).await;
    receiver.down();
    let mut sender = chat.client(&a).await;
    let body = "\u{1}".repeat(4000);
    for _ in 0..N {
        let ack = sender.say(&room, &body).await;
        assert_eq!(ack["type"], "ack", "{}", &ack.to_string()[..100.min(ack.to_string().len())]);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut dropped = 0.0;
    for n in &chat.nodes {
        dropped += common::extra::metric_sum(&n.metrics().await, "chat_webhooks_dropped_total").unwrap_or(0.0);
    }
    assert!(dropped >= 20.0, "{N} events of ~24 KB, at most 1 MiB kept: only {dropped} dropped");
    receiver.up().await;
    receiver
        .wait_for("the newest message.created", Duration::from_secs(30), |s| {
            s.iter().any(|e| e.json["type"] == "message.created" && e.json["data"]["seq"] == N)
        })
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got: Vec<u64> =
        receiver.of_type("message.created").iter().map(|s| s.json["data"]["seq"].as_u64().unwrap()).collect();
    got.sort();
    got.dedup();
    // 1 MiB holds ~43 of them; a few more may have been in flight.
    assert!(got.len() <= 60, "{} of {N} delivered: more than the byte bound holds", got.len());
    assert!(got.first().is_some_and(|s| *s > 15), "the oldest were dropped: {got:?}");
    // Valkey: the byte counter follows the outbox back to empty.
    if let Some(v) = &chat.valkey {
        let t0 = std::time::Instant::now();
        loop {
            let bytes = v.cli(&["GET", "chat:{wh}:bytes"]).await.unwrap_or_default();
            if bytes.trim() == "0" {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "outbox bytes after delivery: {bytes}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    receiver.down();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_an_erasure_removes_the_body_from_events_not_delivered_yet() {
    an_erasure_removes_the_body_from_events_not_delivered_yet(Engine::Durable).await
}

/// Issue 22, finding 2: the receiver is down while a user sends; the user is
/// erased; the receiver comes back. Every `message.created` still arrives,
/// once per message, under its `webhook-id`, but with an empty body and
/// `deleted: true` (some waited in the outbox, some for a retry). A message
/// the user sends after the erasure keeps its body.
async fn an_erasure_removes_the_body_from_events_not_delivered_yet(engine: Engine) {
    const N: usize = 20;
    let mut receiver = Receiver::start().await;
    let url = receiver.url();
    let chat: Chat = engine.start(&hook_env(&url, &[])).await;
    let room = unique("room");
    let (a, b) = (unique("erased"), unique("b"));
    chat.put_group(&room, &[&a, &b]).await;
    receiver.wait_for("conversation.updated", Duration::from_secs(10), |s| s.len() == 1).await;
    receiver.down();
    let mut sender = chat.client(&a).await;
    let mut seqs = Vec::new();
    for i in 0..N {
        let ack = sender.say(&room, &format!("PRIVATE-{i}-do-not-leak")).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        seqs.push(ack["seq"].as_u64().unwrap());
    }
    let mut other = chat.client(&b).await;
    let kept = other.say(&room, "bob's message stays").await;
    // Attempts fail meanwhile: some events wait for a retry, some are still queued.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (status, v) = chat.api(reqwest::Method::DELETE, &format!("/api/v1/users/{a}/messages"), None).await;
    assert_eq!((status, v["erased"].as_u64()), (200, Some(N as u64)), "{v}");
    let after = sender.say(&room, "after the erasure").await;
    receiver.up().await;
    receiver
        .wait_for("every message.created", Duration::from_secs(30), |s| {
            s.iter()
                .filter(|e| e.json["type"] == "message.created")
                .map(|e| &e.id)
                .collect::<std::collections::HashSet<_>>()
                .len()
                == N + 2
        })
        .await;
    let seen = receiver.seen();
    for s in &seen {
        assert!(!s.body.contains("PRIVATE-"), "an erased body was delivered: {}", s.body);
        verify(s).unwrap();
    }
    let mut erased: Vec<u64> = Vec::new();
    for s in receiver.of_type("message.created") {
        let d = &s.json["data"];
        let seq = d["seq"].as_u64().unwrap();
        if seq == kept["seq"].as_u64().unwrap() {
            assert_eq!(d["body"], "bob's message stays");
        } else if seq == after["seq"].as_u64().unwrap() {
            assert_eq!(d["body"], "after the erasure", "a message after the erasure keeps its body");
            assert!(d.get("deleted").is_none(), "{d}");
        } else {
            assert_eq!((d["body"].as_str(), d["deleted"].as_bool()), (Some(""), Some(true)), "{d}");
            assert_eq!(d["sender"]["id"], a.as_str());
            erased.push(seq);
        }
    }
    erased.sort();
    erased.dedup();
    assert_eq!(erased, seqs, "every erased message's event still arrives, erased");
    receiver.down();
}

/// The outbox and the unread schedule on a three-master Valkey Cluster (their
/// keys share one slot, `{wh}`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_cluster_every_event_type_arrives_once_per_action_signed() {
    every_event_type_arrives_once_per_action_signed(Engine::ValkeyCluster { nodes: 2 }).await
}

async fn every_event_type_arrives_once_per_action_signed(engine: Engine) {
    let mut receiver = Receiver::start().await;
    let url = receiver.url();
    let chat: Chat = engine
        .start(&hook_env(&url, &[("CHAT_WEBHOOKS__PRESENCE", "true"), ("CHAT_WEBHOOKS__UNREAD_AFTER_S", "2")]))
        .await;
    let deal = unique("deal");
    let (alice_id, bob_id, carol_id) = (unique("alice"), unique("bob"), unique("carol"));
    chat.put_group(&deal, &[&alice_id, &bob_id, &carol_id]).await;
    let mut alice = chat.client(&alice_id).await;
    let mut bob = chat.client(&bob_id).await;
    let ack = alice.say(&deal, "Hello, deal room").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let seq = ack["seq"].as_u64().unwrap();
    bob.expect("the message", |v| v["type"] == "message" && v["conversation"] == deal).await;
    bob.send(json!({"type":"read","conversation":deal,"seq":seq})).await;
    bob.barrier().await;
    // A read at the same mark again changes nothing and sends nothing.
    bob.send(json!({"type":"read","conversation":deal,"seq":seq})).await;
    bob.barrier().await;
    // v1.2: an edit sends message.updated; its retry (a duplicate) nothing.
    let edit = json!({"type":"edit","conversation":deal,"seq":seq,"body":"Hello, deal room!"});
    let edited = alice.request(edit.clone()).await;
    assert_eq!((edited["type"].as_str(), edited["duplicate"].as_bool()), (Some("ack"), Some(false)), "{edited}");
    assert_eq!(alice.request(edit).await["duplicate"], true);
    // Carol never connects: after 2 s she has not delivered it.
    receiver
        .wait_for("message.unread for carol", Duration::from_secs(20), |s| {
            s.iter().any(|e| e.json["type"] == "message.unread")
        })
        .await;
    alice.close().await;
    receiver
        .wait_for("user.offline", Duration::from_secs(10), |s| s.iter().any(|e| e.json["type"] == "user.offline"))
        .await;
    // A second window passes: no second notice for the same message.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let seen = receiver.seen();
    let mut ids = HashMap::new();
    for s in &seen {
        *ids.entry(s.id.clone()).or_insert(0) += 1;
        verify(s).unwrap_or_else(|e| panic!("{e}: {}", s.body));
        assert!(s.id.starts_with("msg_"), "{}", s.id);
        assert!(s.json["timestamp"].as_str().is_some_and(|t| t.len() == 24 && t.ends_with('Z')), "{}", s.body);
    }
    assert!(ids.values().all(|n| *n == 1), "every webhook-id once (receiver always answered 2xx): {ids:?}");
    verify_with_reference_library(&seen);

    let updated = receiver.of_type("conversation.updated");
    assert_eq!(updated.len(), 1, "one PUT, one conversation.updated: {updated:?}");
    assert_eq!(updated[0].json["data"]["id"], deal);
    assert_eq!(updated[0].json["data"]["members"], json!([&alice_id, &bob_id, &carol_id]));

    let created = receiver.of_type("message.created");
    assert_eq!(created.len(), 1, "{created:?}");
    let d = &created[0].json["data"];
    assert_eq!((d["conversation"].as_str(), d["seq"].as_u64()), (Some(deal.as_str()), Some(seq)));
    assert_eq!(d["body"], "Hello, deal room");
    assert_eq!(d["sender"]["id"], alice_id.as_str());
    assert_eq!(d["ts"], ack["ts"], "the stored message's ts");
    assert!(d["client_msg_id"].as_str().is_some_and(|c| !c.is_empty()));

    let changed = receiver.of_type("message.updated");
    assert_eq!(changed.len(), 1, "{changed:?}");
    let d = &changed[0].json["data"];
    assert_eq!(
        (d["conversation"].as_str(), d["seq"].as_u64(), d["target"].as_u64()),
        (Some(deal.as_str()), edited["seq"].as_u64(), Some(seq))
    );
    assert_eq!(
        (d["kind"].as_str(), d["body"].as_str(), d["user"]["id"].as_str()),
        (Some("edit"), Some("Hello, deal room!"), Some(alice_id.as_str()))
    );
    assert_eq!(d["ts"], edited["ts"]);

    let read = receiver.of_type("message.read");
    assert_eq!(read.len(), 1, "the repeated read at the same mark sends nothing: {read:?}");
    assert_eq!(read[0].json["data"], json!({"conversation": deal, "user": bob_id, "read_seq": seq}));

    let unread = receiver.of_type("message.unread");
    assert_eq!(unread.len(), 1, "carol only (bob delivered, alice sent it), and once: {unread:?}");
    let u = &unread[0].json["data"];
    assert_eq!(u["user"], carol_id.as_str());
    assert_eq!((u["conversation"].as_str(), u["seq"].as_u64()), (Some(deal.as_str()), Some(seq)));
    assert_eq!(u["sender"]["id"], alice_id.as_str());

    let online: Vec<Value> = receiver.of_type("user.online").iter().map(|s| s.json["data"]["user"].clone()).collect();
    assert_eq!(online.len(), 2, "{online:?}");
    assert!(online.contains(&json!(alice_id)) && online.contains(&json!(bob_id)));
    let offline = receiver.of_type("user.offline");
    assert_eq!(offline.len(), 1, "{offline:?}");
    assert_eq!(offline[0].json["data"]["user"], alice_id.as_str());

    // The metrics count what happened, on the nodes together.
    let mut delivered = 0.0;
    for n in &chat.nodes {
        delivered += common::extra::metric_sum(&n.metrics().await, "chat_webhooks_delivered_total").unwrap_or(0.0);
    }
    assert_eq!(delivered as usize, seen.len());

    // Deleting the group removes every member: one more conversation.updated.
    let (status, _) = chat.api(reqwest::Method::DELETE, &format!("/api/v1/conversations/{deal}"), None).await;
    assert_eq!(status, 200);
    receiver
        .wait_for("conversation.updated after DELETE", Duration::from_secs(10), |s| {
            s.iter().filter(|e| e.json["type"] == "conversation.updated").count() == 2
        })
        .await;
    let last = receiver.of_type("conversation.updated").pop().unwrap();
    assert_eq!((last.json["data"]["id"].as_str(), &last.json["data"]["members"]), (Some(deal.as_str()), &json!([])));
    receiver.down();
}

async fn the_receiver_down_for_30_s_loses_nothing(engine: Engine) {
    let mut receiver = Receiver::start().await;
    let url = receiver.url();
    let chat: Chat = engine.start(&hook_env(&url, &[])).await;
    let room = unique("room");
    let (a, b) = (unique("a"), unique("b"));
    chat.put_group(&room, &[&a, &b]).await;
    receiver.wait_for("conversation.updated", Duration::from_secs(10), |s| s.len() == 1).await;
    receiver.down();
    let mut sender = chat.client(&a).await;
    let mut seqs = Vec::new();
    for i in 0..20 {
        let ack = sender.say(&room, &format!("while the receiver is down #{i}")).await;
        assert_eq!(ack["type"], "ack", "sending never waits for webhooks: {ack}");
        seqs.push(ack["seq"].as_u64().unwrap());
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    let mut retried = 0.0;
    for n in &chat.nodes {
        retried += common::extra::metric_sum(&n.metrics().await, "chat_webhooks_retried_total").unwrap_or(0.0);
    }
    assert!(retried >= 20.0, "every event was attempted and failed at least once: {retried}");
    receiver.up().await;
    receiver
        .wait_for("all 20 message.created after the receiver came back", Duration::from_secs(20), |s| {
            s.iter()
                .filter(|e| e.json["type"] == "message.created")
                .map(|e| &e.id)
                .collect::<std::collections::HashSet<_>>()
                .len()
                == 20
        })
        .await;
    let mut got: Vec<u64> =
        receiver.of_type("message.created").iter().map(|s| s.json["data"]["seq"].as_u64().unwrap()).collect();
    got.sort();
    got.dedup();
    assert_eq!(got, seqs, "every acked message's event, none lost");
    for s in receiver.seen() {
        verify(&s).unwrap();
    }
    receiver.down();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_the_node_that_queued_events_killed_the_other_delivers_them_each_once() {
    let mut receiver = Receiver::start().await;
    let url = receiver.url();
    let mut chat: Chat = Engine::Valkey { nodes: 2 }.start(&hook_env(&url, &[])).await;
    let room = unique("room");
    let (a, b) = (unique("a"), unique("b"));
    chat.nodes[0].put_group(&room, &[&a, &b]).await;
    receiver.wait_for("conversation.updated", Duration::from_secs(10), |s| s.len() == 1).await;
    receiver.down();
    // Every message through node 0, which queues and first attempts the events.
    let mut sender = chat.nodes[0].client(&a).await;
    let mut seqs = Vec::new();
    for i in 0..10 {
        let ack = sender.say(&room, &format!("queued on node 0 #{i}")).await;
        seqs.push(ack["seq"].as_u64().expect("ack"));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while common::extra::metric_sum(&chat.nodes[0].metrics().await, "chat_webhooks_retried_total").unwrap_or(0.0) < 10.0
    {
        assert!(tokio::time::Instant::now() < deadline, "node 0 never attempted its events");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(sender);
    chat.nodes[0].signal("KILL");
    chat.nodes.remove(0);
    receiver.up().await;
    receiver
        .wait_for("the 10 events, delivered by the surviving node", Duration::from_secs(40), |s| {
            s.iter().filter(|e| e.json["type"] == "message.created").count() >= 10
        })
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got: Vec<u64> =
        receiver.of_type("message.created").iter().map(|s| s.json["data"]["seq"].as_u64().unwrap()).collect();
    got.sort();
    assert_eq!(got, seqs, "each event once, none lost");
    let delivered =
        common::extra::metric_sum(&chat.nodes[0].metrics().await, "chat_webhooks_delivered_total").unwrap_or(0.0);
    assert!(delivered >= 10.0, "node 1 delivered them: {delivered}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_events_a_killed_node_was_delivering_are_claimed_by_another() {
    // Attempts of node 0 hang (3 s timeout) when it is killed: its events
    // stay pending in the consumer group until node 1 claims them
    // (2 x timeout + 10 s = 16 s idle).
    let receiver = Receiver::start().await;
    let url = receiver.url();
    let mut chat: Chat =
        Engine::Valkey { nodes: 2 }.start(&hook_env(&url, &[("CHAT_WEBHOOKS__TIMEOUT_MS", "3000")])).await;
    let room = unique("room");
    let (a, b) = (unique("a"), unique("b"));
    chat.nodes[0].put_group(&room, &[&a, &b]).await;
    receiver.wait_for("conversation.updated", Duration::from_secs(10), |s| s.len() == 1).await;
    receiver.state.hang.store(true, Ordering::SeqCst);
    let mut sender = chat.nodes[0].client(&a).await;
    let mut seqs = Vec::new();
    for i in 0..5 {
        seqs.push(sender.say(&room, &format!("in flight on node 0 #{i}")).await["seq"].as_u64().expect("ack"));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(sender);
    chat.nodes[0].signal("KILL");
    chat.nodes.remove(0);
    receiver.state.hang.store(false, Ordering::SeqCst);
    receiver
        .wait_for("the 5 events node 0 was delivering", Duration::from_secs(45), |s| {
            s.iter().filter(|e| e.json["type"] == "message.created").count() >= 5
        })
        .await;
    let mut got: Vec<u64> =
        receiver.of_type("message.created").iter().map(|s| s.json["data"]["seq"].as_u64().unwrap()).collect();
    got.sort();
    got.dedup();
    assert_eq!(got, seqs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_two_nodes_deliver_each_event_once() {
    let receiver = Receiver::start().await;
    let url = receiver.url();
    let chat: Chat = Engine::Valkey { nodes: 2 }.start(&hook_env(&url, &[])).await;
    let room = unique("room");
    let (a, b) = (unique("a"), unique("b"));
    chat.put_group(&room, &[&a, &b]).await;
    // One sender per node, interleaved.
    let mut on0 = chat.nodes[0].client(&a).await;
    let mut on1 = chat.nodes[1].client(&b).await;
    for i in 0..50 {
        let c = if i % 2 == 0 { &mut on0 } else { &mut on1 };
        assert_eq!(c.say(&room, &format!("m{i}")).await["type"], "ack");
    }
    receiver
        .wait_for("100 events", Duration::from_secs(20), |s| {
            s.iter().filter(|e| e.json["type"] == "message.created").count() >= 50
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let created = receiver.of_type("message.created");
    let mut by_seq: BTreeMap<u64, usize> = BTreeMap::new();
    for s in &created {
        *by_seq.entry(s.json["data"]["seq"].as_u64().unwrap()).or_default() += 1;
    }
    assert_eq!(by_seq.len(), 50);
    assert!(by_seq.values().all(|n| *n == 1), "each event delivered by one node only: {by_seq:?}");
    let per_node: Vec<f64> = {
        let mut v = Vec::new();
        for n in &chat.nodes {
            v.push(common::extra::metric_sum(&n.metrics().await, "chat_webhooks_delivered_total").unwrap_or(0.0));
        }
        v
    };
    assert_eq!(per_node.iter().sum::<f64>() as usize, created.len() + 1, "{per_node:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_bound_drops_the_oldest_and_age_drops_the_stale() {
    // Bound: 5 events wait at most; 20 made while the receiver is down.
    let mut receiver = Receiver::start().await;
    let url = receiver.url();
    let chat: Chat = Engine::Memory.start(&hook_env(&url, &[("CHAT_WEBHOOKS__OUTBOX_MAX", "5")])).await;
    let room = unique("room");
    let (a, b) = (unique("a"), unique("b"));
    receiver.down();
    chat.put_group(&room, &[&a, &b]).await;
    let mut sender = chat.client(&a).await;
    let mut seqs = Vec::new();
    for i in 0..20 {
        seqs.push(sender.say(&room, &format!("m{i}")).await["seq"].as_u64().unwrap());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dropped = common::extra::metric_sum(&chat.node().metrics().await, "chat_webhooks_dropped_total").unwrap_or(0.0);
    assert!(dropped >= 16.0, "21 events, at most 5 kept: {dropped} dropped");
    receiver.up().await;
    receiver.wait_for("the newest events", Duration::from_secs(10), |s| s.len() >= 5).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got: Vec<u64> =
        receiver.of_type("message.created").iter().map(|s| s.json["data"]["seq"].as_u64().unwrap()).collect();
    assert!(got.len() <= 5 && got.iter().all(|s| *s >= 16), "only the newest survive: {got:?}");
    receiver.down();

    // Age: events older than max_age_s are dropped, not delivered late.
    let mut receiver = Receiver::start().await;
    let url = receiver.url();
    let chat: Chat = Engine::Memory.start(&hook_env(&url, &[("CHAT_WEBHOOKS__MAX_AGE_S", "2")])).await;
    receiver.down();
    chat.put_group(&room, &[&a, &b]).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let m = chat.node().metrics().await;
    assert!(m.contains("chat_webhooks_dropped_total{") && m.contains("reason=\"expired\""), "{m}");
    receiver.up().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(receiver.seen().is_empty(), "an expired event is never delivered: {:?}", receiver.seen());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_is_down_gets_probes_not_a_flood() {
    // The receiver listens but answers 503 to everything: 200 events would
    // be attempted again and again (1 s, 2 s, 2 s ...). After 16 failures in a
    // row the node probes with one event at a time instead.
    let receiver = Receiver::start().await;
    let url = receiver.url();
    let chat: Chat = Engine::Memory
        .start(&hook_env(&url, &[("CHAT_LIMITS__SEND_PER_S", "10000"), ("CHAT_LIMITS__SEND_BURST", "10000")]))
        .await;
    receiver.state.down.store(true, Ordering::SeqCst);
    let room = unique("room");
    let (a, b) = (unique("a"), unique("b"));
    chat.put_group(&room, &[&a, &b]).await;
    let mut sender = chat.client(&a).await;
    for i in 0..200 {
        assert_eq!(sender.say(&room, &format!("m{i}")).await["type"], "ack");
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let refused = receiver.state.refused.load(Ordering::SeqCst);
    // 16 to notice (the batch that crosses it finishes: up to 31), then one
    // probe at a time with waits of 1, 2, 2 ... s. Without probing: 200
    // events, each attempted about four times in 8 s.
    assert!((16..=31 + 8).contains(&refused), "attempts while down: {refused}\n{}", chat.node().logs());
    // Back: everything arrives, none lost.
    receiver.state.down.store(false, Ordering::SeqCst);
    receiver
        .wait_for("all 200 messages after the receiver answers again", Duration::from_secs(15), |s| {
            s.iter().filter(|e| e.json["type"] == "message.created").count() >= 200
        })
        .await;
}
