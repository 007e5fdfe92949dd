//! Erasure (PROTOCOL v1.1, "Erasure (retention and GDPR)"), end to end
//! against real crm-chat processes on each engine: `DELETE
//! /api/v1/users/{id}/messages` and `DELETE /api/v1/conversations/{id}`.
//! On Valkey the erasing call goes to one node and every read to the other,
//! and the erased bodies are looked for in every key Valkey holds.

mod common;

use std::time::Duration;

use common::{Chat, Engine, is_presence, unique};
use reqwest::Method;
use serde_json::{Value, json};

const SHORT: Duration = Duration::from_millis(300);

engine_suite!(erase_user_messages, delete_conversation);

/// Every Valkey server of the chat (one, or the Cluster's masters).
fn servers(chat: &Chat) -> Vec<&common::valkey::Valkey> {
    match (&chat.valkey, &chat.cluster) {
        (Some(v), _) => vec![v],
        (None, Some(c)) => c.masters.iter().collect(),
        (None, None) => vec![],
    }
}

/// Everything Valkey holds, as text: every key's values read by type, and
/// its DUMP (uncompressed: what an RDB file would hold, including entries a
/// stream only flags as deleted).
async fn valkey_contents(chat: &Chat) -> String {
    let mut all = String::new();
    for v in servers(chat) {
        v.cli(&["CONFIG", "SET", "rdbcompression", "no"]).await.expect("config set");
        let keys = v.cli(&["--scan"]).await.expect("scan");
        for key in keys.lines().filter(|k| !k.is_empty()) {
            let ty = v.cli(&["TYPE", key]).await.unwrap_or_default();
            let read: &[&str] = match ty.trim() {
                "stream" => &["XRANGE", key, "-", "+"],
                "hash" => &["HGETALL", key],
                "set" => &["SMEMBERS", key],
                "zset" => &["ZRANGE", key, "0", "-1"],
                "string" => &["GET", key],
                _ => &["TYPE", key],
            };
            all.push_str(&v.cli(read).await.unwrap_or_default());
            all.push_str(&v.cli(&["DUMP", key]).await.unwrap_or_default());
        }
    }
    all
}

/// Every file of the durable engine's data directory (database, WAL), as
/// lossy text: an erased body must be in none of them (freed pages included).
fn disk_contents(chat: &Chat) -> String {
    let dir = chat.data_dir.as_ref().expect("durable engine").path();
    let mut all = String::new();
    for entry in std::fs::read_dir(dir).expect("data dir").flatten() {
        if let Ok(bytes) = std::fs::read(entry.path()) {
            all.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    all
}

fn message_of(reply: &Value, seq: u64) -> &Value {
    reply["messages"].as_array().unwrap().iter().find(|m| m["seq"] == seq).unwrap_or_else(|| panic!("{seq} in {reply}"))
}

async fn erase_user_messages(engine: Engine) {
    let chat = engine.start(&[]).await;
    let (a, b) = (&chat.nodes[0], chat.nodes.last().unwrap());
    let g = unique("deal");
    a.put_group(&g, &["alice", "bob"]).await;
    let dm = "dm:alice:bob";
    let mut alice = a.client("alice").await;
    let mut bob = b.client("bob").await;
    let secret = unique("alice-secret");
    let send = |conv: &str, cmid: &str, body: String| json!({"type":"send","conversation":conv,"client_msg_id":cmid,"body":body});
    let g1 = alice.request(send(&g, "a-g1", format!("{secret} in the group"))).await;
    let kept = bob.request(send(&g, "b-g2", "bob keeps this".into())).await;
    let gen1 = alice.request(send("general", "a-gen", format!("{secret} in general"))).await;
    let dm1 = alice.request(send(dm, "a-dm", format!("{secret} direct"))).await;
    let bob_dm = bob.request(send(dm, "b-dm", "bob's direct".into())).await;
    for ack in [&g1, &kept, &gen1, &dm1, &bob_dm] {
        assert_eq!((ack["type"].as_str(), ack["duplicate"].as_bool()), (Some("ack"), Some(false)), "{ack}");
    }
    // Every message reached bob (direct ones may be published after the store).
    for (conv, ack) in [(g.as_str(), &g1), (g.as_str(), &kept), ("general", &gen1), (dm, &dm1), (dm, &bob_dm)] {
        bob.expect("the live message", |v| {
            v["type"] == "message" && v["conversation"] == conv && v["seq"] == ack["seq"]
        })
        .await;
    }
    // v1.2: an edit of alice's holds a body too; erasure empties it.
    let edit = json!({"type":"edit","conversation":g,"seq":g1["seq"],"body":format!("{secret} edited")});
    let edited = alice.request(edit).await;
    assert_eq!((edited["type"].as_str(), edited["seq"].as_u64()), (Some("ack"), Some(3)), "{edited}");
    bob.expect("the edit", |v| v["type"] == "update" && v["seq"] == 3).await;
    bob.barrier().await;
    bob.discard(|_| true);
    if !servers(&chat).is_empty() {
        assert!(valkey_contents(&chat).await.contains(&secret), "the check sees stored bodies");
    }
    if chat.data_dir.is_some() {
        assert!(disk_contents(&chat).contains(&secret), "the check sees stored bodies");
    }

    let (s, v) = a.api(Method::DELETE, "/api/v1/users/alice/messages", None).await;
    assert_eq!((s, &v), (200, &json!({"erased": 3})));
    // Nothing is pushed: clients see it on their next history or sync.
    bob.assert_quiet(SHORT, is_presence).await;

    // Read on the other node: history, sync and the service API.
    let erased = |m: &Value, ack: &Value, cmid: &str| {
        assert_eq!(m["type"], "message");
        assert_eq!(m["deleted"], true, "{m}");
        assert_eq!(m["body"], "", "{m}");
        assert_eq!((&m["seq"], &m["ts"]), (&ack["seq"], &ack["ts"]), "seq and ts kept: {m}");
        assert_eq!((m["sender"]["id"].as_str(), m["client_msg_id"].as_str()), (Some("alice"), Some(cmid)));
    };
    let untouched = |m: &Value, body: &str| {
        assert_eq!(m["body"], body, "{m}");
        assert!(m.get("deleted").is_none(), "no deleted field on a message not erased: {m}");
    };
    let h = bob.request(json!({"type":"history","conversation":g,"limit":50})).await;
    erased(message_of(&h, 1), &g1, "a-g1");
    untouched(message_of(&h, 2), "bob keeps this");
    let s1 = bob.request(json!({"type":"sync","conversation":g,"after":0})).await;
    let (synced, updates): (Vec<Value>, Vec<Value>) =
        s1["messages"].as_array().unwrap().iter().cloned().partition(|m| m["type"] == "message");
    assert_eq!(json!(synced), h["messages"]);
    assert_eq!((updates.len(), &updates[0]["kind"], &updates[0]["body"]), (1, &json!("edit"), &json!("")), "{s1}");
    assert_eq!(s1["epoch"], h["epoch"], "erasure loses no history: same epoch");
    let general = bob.request(json!({"type":"sync","conversation":"general","after":0})).await;
    erased(message_of(&general, gen1["seq"].as_u64().unwrap()), &gen1, "a-gen");
    let d = bob.request(json!({"type":"history","conversation":dm})).await;
    erased(message_of(&d, 1), &dm1, "a-dm");
    untouched(message_of(&d, 2), "bob's direct");
    let (s, api) = b.api(Method::GET, &format!("/api/v1/conversations/{g}/messages?after=0"), None).await;
    assert_eq!(s, 200);
    assert_eq!(api["messages"], h["messages"]);
    let (_, api) = b.api(Method::GET, "/api/v1/conversations/dm:alice:bob/messages", None).await;
    erased(message_of(&api, 1), &dm1, "a-dm");

    // The body is gone from storage, not only hidden.
    if !servers(&chat).is_empty() {
        let contents = valkey_contents(&chat).await;
        assert!(!contents.contains(&secret), "an erased body is still in Valkey");
        assert!(contents.contains("bob keeps this"), "other users' messages stay");
    }
    if chat.data_dir.is_some() {
        let contents = disk_contents(&chat);
        assert!(!contents.contains(&secret), "an erased body is still in a file of chat.data_dir");
        assert!(contents.contains("bob keeps this"), "other users' messages stay");
    }

    // A retried send of an erased message stays a duplicate, stores nothing.
    let retry = alice.request(send(&g, "a-g1", format!("{secret} in the group"))).await;
    assert_eq!((&retry["seq"], &retry["ts"], &retry["duplicate"]), (&g1["seq"], &g1["ts"], &json!(true)));
    let post = json!({"sender":"alice","body":"again","client_msg_id":"a-g1"});
    let (s, v) = b.api(Method::POST, &format!("/api/v1/conversations/{g}/messages"), Some(post)).await;
    assert_eq!((s, &v["seq"], &v["duplicate"]), (200, &g1["seq"], &json!(true)));
    bob.assert_quiet(SHORT, is_presence).await;
    // New messages of alice are kept.
    let later = alice.request(send(&g, "a-g3", "after the erasure".into())).await;
    assert_eq!(later["seq"], 4);
    let m = bob.expect_type("message").await;
    assert!(m.get("deleted").is_none() && m["body"] == "after the erasure", "{m}");

    // Idempotent: a repeat erases nothing more (on either node).
    let (s, v) = b.api(Method::DELETE, "/api/v1/users/carol/messages", None).await;
    assert_eq!((s, &v), (200, &json!({"erased": 0})), "a user without messages");
    let (s, v) = a.api(Method::DELETE, "/api/v1/users/bad%20id/messages", None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_request")));
    let r = a.http.delete(a.internal_url("/api/v1/users/alice/messages")).send().await.unwrap();
    assert_eq!(r.status(), 401, "behind the API key");
    let (s, v) = b.api(Method::DELETE, "/api/v1/users/alice/messages", None).await;
    assert_eq!((s, &v), (200, &json!({"erased": 1})), "only what was sent since");
    let (s, v) = a.api(Method::DELETE, "/api/v1/users/alice/messages", None).await;
    assert_eq!((s, &v), (200, &json!({"erased": 0})));
    assert!(a.metrics().await.contains("chat_messages_erased_total "));
}

async fn delete_conversation(engine: Engine) {
    let chat = engine.start(&[]).await;
    let (a, b) = (&chat.nodes[0], chat.nodes.last().unwrap());
    let g = unique("deal");
    let path = format!("/api/v1/conversations/{g}");
    a.put_group(&g, &["alice", "bob"]).await;
    let mut alice = a.client("alice").await;
    let mut bob = b.client("bob").await;
    for i in 0..3 {
        let ack = alice.say(&g, &format!("message {i}")).await;
        assert_eq!(ack["seq"], i + 1);
        bob.expect_type("message").await;
    }
    bob.send(json!({"type":"read","conversation":g,"seq":3})).await;
    let old = alice.request(json!({"type":"history","conversation":g})).await;
    let old_epoch = old["epoch"].as_str().unwrap().to_string();
    assert!(!old_epoch.is_empty());
    bob.barrier().await;
    bob.discard(|_| true);
    alice.barrier().await;
    alice.discard(|_| true);

    let (s, v) = a.api(Method::DELETE, &path, None).await;
    assert_eq!((s, &v), (200, &json!({"deleted": true})));
    for c in [&mut alice, &mut bob] {
        let ev = c.expect("member:false", |v| v["type"] == "conversation").await;
        assert_eq!(ev["member"], false, "{ev}");
        assert_eq!(ev["conversation"]["id"], g.as_str());
        assert_eq!(ev["conversation"]["members"], json!([]));
    }
    // Gone: the API answers 404, members are members no more.
    for p in [path.clone(), format!("{path}/messages")] {
        let (s, v) = b.api(Method::GET, &p, None).await;
        assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")), "{p}");
    }
    let h = bob.request(json!({"type":"history","conversation":g})).await;
    assert_eq!(h["code"], "forbidden", "{h}");
    let (_, list) = b.api(Method::GET, "/api/v1/users/bob/conversations", None).await;
    assert!(!list.to_string().contains(&g), "{list}");
    // Idempotent; only groups.
    let (s, v) = b.api(Method::DELETE, &path, None).await;
    assert_eq!((s, &v), (200, &json!({"deleted": false})));
    for p in ["/api/v1/conversations/dm:alice:bob", "/api/v1/conversations/general"] {
        let (s, v) = a.api(Method::DELETE, p, None).await;
        assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_request")), "{p}: {v}");
    }

    // Created again: empty, seq 1 under a new epoch, delivered live on both
    // nodes (a node that delivered seqs 1..3 of the old epoch is no obstacle).
    a.put_group(&g, &["alice", "bob"]).await;
    for c in [&mut alice, &mut bob] {
        let ev = c.expect("member:true", |v| v["type"] == "conversation").await;
        assert_eq!((ev["member"].as_bool(), ev["conversation"]["last_seq"].as_u64()), (Some(true), Some(0)));
    }
    let fresh = bob.request(json!({"type":"history","conversation":g})).await;
    assert_eq!(fresh["messages"], json!([]));
    assert_ne!(fresh["epoch"], old_epoch.as_str());
    let ack = alice.say(&g, "a new beginning").await;
    assert_eq!((ack["seq"].as_u64(), ack["duplicate"].as_bool()), (Some(1), Some(false)));
    for c in [&mut alice, &mut bob] {
        let m = c.expect("the new seq 1", |v| v["type"] == "message").await;
        assert_eq!((m["seq"].as_u64(), m["body"].as_str()), (Some(1), Some("a new beginning")));
    }
    let h = bob.request(json!({"type":"sync","conversation":g,"after":0,"epoch":old_epoch})).await;
    let epoch = h["epoch"].as_str().unwrap().to_string();
    assert_ne!(epoch, old_epoch);
    assert_eq!(h["reset"], true, "a client holding the old epoch is told to reload: {h}");
    assert_eq!(h["messages"].as_array().unwrap().len(), 1);
    let again = b.client("bob").await;
    let entry = again.conversation(&g).expect("listed again").clone();
    assert_eq!((entry["last_seq"].as_u64(), entry["read_seq"].as_u64()), (Some(1), Some(0)), "{entry}");
    assert_eq!(entry["epoch"], epoch.as_str());
    assert_eq!(entry["unread"], 1, "alice's new message, nothing of the old history");
}
