//! The wire protocol (PROTOCOL.md v1), end to end against real crm-chat
//! processes. Every suite function runs on each engine (see `engine_suite!`);
//! on Valkey, consecutive clients land on different nodes.

mod common;

use std::time::Duration;

use common::{Chat, Client, Ended, Engine, is_presence, unique};
use reqwest::Method;
use serde_json::{Value, json};

const SHORT: Duration = Duration::from_millis(300);

fn ts_ok(ts: &Value) -> bool {
    let s = ts.as_str().unwrap_or("");
    // YYYY-MM-DDTHH:MM:SS.mmmZ
    s.len() == 24
        && s.as_bytes()[10] == b'T'
        && s.ends_with('Z')
        && s.as_bytes()[19] == b'.'
        && chrono::DateTime::parse_from_rfc3339(s).is_ok()
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(|m| m["seq"].as_u64().unwrap()).collect()
}

async fn group(chat: &Chat, members: &[&str]) -> String {
    let id = unique("deal");
    chat.put_group(&id, members).await;
    id
}

engine_suite!(
    hello_and_welcome,
    send_ack_and_message_to_every_member,
    seq_is_gap_free_under_concurrent_senders,
    idempotent_resend,
    send_validation,
    unicode_round_trips_byte_exact,
    receipts_are_monotonic_and_broadcast,
    typing_goes_to_others_only,
    history_and_sync_paging,
    presence_with_two_connections,
    direct_conversations,
    group_membership_events,
    resume_after_reconnect_loses_nothing,
    service_api,
    unread_counts_in_welcome,
);

async fn hello_and_welcome(engine: Engine) {
    let chat = engine.start(&[]).await;
    let mut a = chat.client("alice").await;
    let w = &a.welcome;
    assert_eq!(w["id"], "hello");
    assert_eq!(w["user"], json!({"id":"alice","name":"Alice"}));
    assert_eq!(w["heartbeat_s"], 25);
    let general = a.conversation("general").expect("general listed").clone();
    assert_eq!(general["title"], "General");
    for k in ["last_seq", "read_seq", "unread"] {
        assert!(general[k].is_u64(), "{k} in {general}");
    }
    // Integer and string ids are echoed as given.
    let r = a.request(json!({"type":"ping"})).await;
    assert_eq!(r["type"], "pong");
    a.send(json!({"type":"ping","id":"p-1"})).await;
    assert_eq!(a.expect_type("pong").await["id"], "p-1");
    // A second hello is a bad request, and the connection stays open.
    let r = a.request(json!({"type":"hello","token":"x"})).await;
    assert_eq!(r["code"], "bad_request");
    a.barrier().await;
}

async fn send_ack_and_message_to_every_member(engine: Engine) {
    let chat = engine.start(&[]).await;
    let mut a1 = chat.client("alice").await;
    let mut a2 = chat.client("alice").await;
    let mut b = chat.client("bob").await;
    let conv = group(&chat, &["alice", "bob"]).await;
    a1.expect_type("conversation").await;
    a2.expect_type("conversation").await;
    b.expect_type("conversation").await;
    let ack = a1.request(json!({"type":"send","conversation":conv,"client_msg_id":"c-1","body":"hi"})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["conversation"], conv);
    assert_eq!(ack["seq"], 1);
    assert_eq!(ack["duplicate"], false);
    assert!(ts_ok(&ack["ts"]), "{ack}");
    for c in [&mut a1, &mut a2, &mut b] {
        let m = c.expect_type("message").await;
        assert_eq!(m["conversation"], conv);
        assert_eq!(m["seq"], 1);
        assert_eq!(m["ts"], ack["ts"]);
        assert_eq!(m["sender"], json!({"id":"alice","name":"Alice"}));
        assert_eq!(m["body"], "hi");
        assert_eq!(m["client_msg_id"], "c-1");
    }
    // In open conversations too.
    let ack = b.say("general", "hello all").await;
    let s = ack["seq"].as_u64().unwrap();
    for c in [&mut a1, &mut a2, &mut b] {
        let m = c.expect("general message", |m| m["type"] == "message" && m["conversation"] == "general").await;
        assert_eq!(m["seq"], s);
    }
}

async fn seq_is_gap_free_under_concurrent_senders(engine: Engine) {
    let chat = engine.start(&[]).await;
    let conv = group(&chat, &["s0", "s1", "s2", "s3", "watcher"]).await;
    let mut watcher = chat.client("watcher").await;
    let mut tasks = Vec::new();
    for i in 0..4 {
        let mut c = chat.client(&format!("s{i}")).await;
        let conv = conv.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for k in 0..25 {
                let r = c
                    .request(json!({"type":"send","conversation":conv,"client_msg_id":format!("{i}-{k}"),"body":format!("m{k}")}))
                    .await;
                assert_eq!(r["type"], "ack", "{r}");
                acked.push(r["seq"].as_u64().unwrap());
            }
            acked
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    assert_eq!(all, (1..=100).collect::<Vec<u64>>());
    let mut got = Vec::new();
    while got.len() < 100 {
        let m = watcher.expect_type("message").await;
        got.push(m["seq"].as_u64().unwrap());
    }
    assert_eq!(got, (1..=100).collect::<Vec<u64>>(), "delivered in seq order");
}

async fn idempotent_resend(engine: Engine) {
    let chat = engine.start(&[]).await;
    let conv = group(&chat, &["alice", "bob"]).await;
    let mut a = chat.client("alice").await;
    let mut b = chat.client("bob").await;
    let send = json!({"type":"send","conversation":conv,"client_msg_id":"once","body":"hello"});
    let first = a.request(send.clone()).await;
    assert_eq!(first["duplicate"], false);
    b.expect_type("message").await;
    a.expect_type("message").await;
    // The same id again, even from another connection: first seq, duplicate, no broadcast.
    let mut a2 = chat.client("alice").await;
    let again = a2.request(send.clone()).await;
    assert_eq!(again["type"], "ack");
    assert_eq!(again["seq"], first["seq"]);
    assert_eq!(again["ts"], first["ts"]);
    assert_eq!(again["duplicate"], true);
    // Another sender may use the same client_msg_id: it is per sender.
    let other = b.request(json!({"type":"send","conversation":conv,"client_msg_id":"once","body":"mine"})).await;
    assert_eq!(other["seq"], 2);
    assert_eq!(other["duplicate"], false);
    let m = a.expect_type("message").await;
    assert_eq!(m["seq"], 2, "only bob's message was broadcast");
    let page = a.request(json!({"type":"sync","conversation":conv,"after":0})).await;
    assert_eq!(seqs(page["messages"].as_array().unwrap()), vec![1, 2]);
}

async fn send_validation(engine: Engine) {
    let chat = engine.start(&[("CHAT_LIMITS__MAX_BODY_CHARS", "10"), ("CHAT_LIMITS__MAX_BAD_FRAMES", "100")]).await;
    let secret = group(&chat, &["bob"]).await;
    let mut a = chat.client("alice").await;
    let cases: Vec<(Value, &str)> = vec![
        (json!({"type":"send","conversation":"general","client_msg_id":"a","body":""}), "bad_request"),
        (
            json!({"type":"send","conversation":"general","client_msg_id":"a","body":" \n\t\u{3000}\u{2003}"}),
            "bad_request",
        ),
        (json!({"type":"send","conversation":"general","client_msg_id":"a","body":"x".repeat(11)}), "too_large"),
        (json!({"type":"send","conversation":"general","body":"hi"}), "bad_request"),
        (json!({"type":"send","conversation":"general","client_msg_id":"","body":"hi"}), "bad_request"),
        (json!({"type":"send","conversation":"general","client_msg_id":"x".repeat(65),"body":"hi"}), "bad_request"),
        (json!({"type":"send","conversation":"general","client_msg_id":"a","body":5}), "bad_request"),
        (json!({"type":"send","conversation":"bad id","client_msg_id":"a","body":"hi"}), "bad_request"),
        (json!({"type":"send","conversation":"dm:bob:alice","client_msg_id":"a","body":"hi"}), "bad_request"),
        (json!({"type":"send","conversation":"dm:bob:carol","client_msg_id":"a","body":"hi"}), "forbidden"),
        (json!({"type":"send","conversation":secret,"client_msg_id":"a","body":"hi"}), "forbidden"),
        (json!({"type":"send","conversation":"never-created","client_msg_id":"a","body":"hi"}), "forbidden"),
        (json!({"type":"history","conversation":secret}), "forbidden"),
        (json!({"type":"presence","conversation":secret}), "forbidden"),
        (json!({"type":"nonsense"}), "bad_request"),
        (json!({"conversation":"general"}), "bad_request"),
    ];
    for (frame, code) in cases {
        let r = a.request(frame.clone()).await;
        assert_eq!(r["type"], "error", "{frame} -> {r}");
        assert_eq!(r["code"], code, "{frame} -> {r}");
        assert!(r["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Exactly max_body_chars is fine; nothing was stored by the rejects.
    let ok = a.say("general", &"x".repeat(10)).await;
    assert_eq!(ok["seq"], 1, "{ok}");
    // Errors on frames without a reply carry no id.
    a.send(json!({"type":"typing","id":77,"conversation":secret})).await;
    let e = a.expect_type("error").await;
    assert_eq!(e["code"], "forbidden");
    assert!(e.get("id").is_none());
}

async fn unicode_round_trips_byte_exact(engine: Engine) {
    let chat = engine.start(&[("CHAT_LIMITS__MAX_BODY_CHARS", "4000")]).await;
    let mut a = chat.client("alice").await;
    let mut b = chat.client("bob").await;
    let bodies = [
        "مرحبا، كيف حالك؟ هل وصلت الصفقة رقم ٤٢؟".to_string(),
        "👋🏽 family: 👨‍👩‍👧‍👦 flags: 🇸🇦🇦🇪 zwj & combining: é".to_string(),
        "line1\nline2\ttab \"quoted\" \\ back <b>not html</b> \u{0000}nul".to_string(),
        "😀".repeat(4000),
    ];
    for body in &bodies {
        let ack = a.say("dm:alice:bob", body).await;
        assert_eq!(ack["type"], "ack", "{}", &ack.to_string()[..200.min(ack.to_string().len())]);
        let m = b.expect_type("message").await;
        assert_eq!(m["body"].as_str().unwrap(), body.as_str());
    }
    let too_long = a.say("dm:alice:bob", &"😀".repeat(4001)).await;
    assert_eq!(too_long["code"], "too_large");
    let page = b.request(json!({"type":"history","conversation":"dm:alice:bob"})).await;
    let got: Vec<&str> = page["messages"].as_array().unwrap().iter().map(|m| m["body"].as_str().unwrap()).collect();
    assert_eq!(got, bodies.iter().map(String::as_str).collect::<Vec<_>>());
    // The service API returns the same bytes.
    let (s, v) = chat.api(Method::GET, "/api/v1/conversations/dm:alice:bob/messages?after=0", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["messages"][0]["body"], bodies[0].as_str());
    // A stored message is the `message` frame as it went out live, type included.
    for m in page["messages"].as_array().unwrap().iter().chain(v["messages"].as_array().unwrap()) {
        assert_eq!((&m["type"], &m["conversation"]), (&json!("message"), &json!("dm:alice:bob")), "{m}");
    }
}

async fn receipts_are_monotonic_and_broadcast(engine: Engine) {
    let chat = engine.start(&[]).await;
    let conv = group(&chat, &["alice", "bob"]).await;
    let mut a = chat.client("alice").await;
    let mut b1 = chat.client("bob").await;
    let mut b2 = chat.client("bob").await;
    // No messages yet: any receipt is a bad request.
    b1.send(json!({"type":"delivered","conversation":conv,"seq":1})).await;
    assert_eq!(b1.expect_type("error").await["code"], "bad_request");
    for i in 0..3 {
        a.say(&conv, &format!("m{i}")).await;
    }
    b1.send(json!({"type":"delivered","conversation":conv,"seq":2})).await;
    for c in [&mut a, &mut b1, &mut b2] {
        let r = c.expect_type("receipt").await;
        assert_eq!(r, json!({"type":"receipt","conversation":conv,"user":"bob","delivered_seq":2,"read_seq":0}));
    }
    // read implies delivered.
    b2.send(json!({"type":"read","conversation":conv,"seq":3})).await;
    let r = a.expect_type("receipt").await;
    assert_eq!((r["delivered_seq"].as_u64(), r["read_seq"].as_u64()), (Some(3), Some(3)));
    // Lower or equal values change nothing and broadcast nothing.
    b1.send(json!({"type":"delivered","conversation":conv,"seq":1})).await;
    b1.send(json!({"type":"read","conversation":conv,"seq":3})).await;
    b1.barrier().await;
    a.barrier().await;
    a.assert_quiet(SHORT, |v| v["type"] == "message" || is_presence(v)).await;
    // Out of range.
    for seq in [0, 4, -1] {
        b1.send(json!({"type":"read","conversation":conv,"seq":seq})).await;
        let e = b1.expect_type("error").await;
        assert_eq!(e["code"], "bad_request", "seq {seq}");
    }
    // history lists receipts of members that sent one.
    let h = a.request(json!({"type":"history","conversation":conv})).await;
    assert_eq!(h["receipts"], json!([{"user":"bob","delivered_seq":3,"read_seq":3}]));
    // ... members only: once bob is removed, his marks are not listed.
    chat.api(Method::POST, &format!("/api/v1/conversations/{conv}/members"), Some(json!({"remove":["bob"]}))).await;
    let h = a.request(json!({"type":"history","conversation":conv})).await;
    assert_eq!(h["receipts"], json!([]));
}

async fn typing_goes_to_others_only(engine: Engine) {
    let chat = engine.start(&[]).await;
    let conv = group(&chat, &["alice", "bob"]).await;
    let mut a1 = chat.client("alice").await;
    let mut a2 = chat.client("alice").await;
    let mut b = chat.client("bob").await;
    a1.send(json!({"type":"typing","id":5,"conversation":conv})).await;
    let t = b.expect_type("typing").await;
    assert_eq!(t, json!({"type":"typing","conversation":conv,"user":{"id":"alice","name":"Alice"}}));
    a1.send(json!({"type":"typing","conversation":"dm:alice:bob"})).await;
    assert_eq!(b.expect_type("typing").await["conversation"], "dm:alice:bob");
    // A burst is forwarded at most once a second per user and conversation,
    // however many connections the user has: a2's burst right after a1's
    // typing forwards nothing, a second later once.
    a2.send(json!({"type":"typing","conversation":conv})).await;
    a2.barrier().await;
    b.assert_quiet(SHORT, |v| v["type"] != "typing").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..20 {
        a2.send(json!({"type":"typing","conversation":conv})).await;
    }
    a2.barrier().await;
    let burst = b.drain(SHORT).await;
    assert_eq!(burst.iter().filter(|v| v["type"] == "typing").count(), 1, "{burst:?}");
    a1.barrier().await;
    a2.barrier().await;
    let not_typing = |v: &Value| v["type"] != "typing";
    a1.assert_quiet(SHORT, not_typing).await;
    a2.assert_quiet(SHORT, not_typing).await;
    // Typing is never stored.
    let h = b.request(json!({"type":"history","conversation":conv})).await;
    assert_eq!(h["messages"], json!([]));
}

async fn history_and_sync_paging(engine: Engine) {
    let chat = engine.start(&[]).await;
    let mut a = chat.client("alice").await;
    let conv = group(&chat, &["alice"]).await;
    // Empty conversation.
    let h = a.request(json!({"type":"history","conversation":conv})).await;
    assert_eq!((h["messages"].clone(), h["has_more"].clone()), (json!([]), json!(false)));
    for i in 1..=7 {
        a.say(&conv, &format!("m{i}")).await;
    }
    let page = |v: &Value| (seqs(v["messages"].as_array().unwrap()), v["has_more"].as_bool().unwrap());
    let q = |extra: Value| {
        let mut f = json!({"conversation": conv});
        for (k, v) in extra.as_object().unwrap() {
            f[k] = v.clone();
        }
        f
    };
    let h = a.request(q(json!({"type":"history","limit":3}))).await;
    assert_eq!(h["type"], "history");
    assert_eq!(h["conversation"], conv);
    assert_eq!(page(&h), (vec![5, 6, 7], true));
    assert_eq!(page(&a.request(q(json!({"type":"history","before":5,"limit":3}))).await), (vec![2, 3, 4], true));
    assert_eq!(page(&a.request(q(json!({"type":"history","before":2,"limit":3}))).await), (vec![1], false));
    assert_eq!(page(&a.request(q(json!({"type":"history","before":1}))).await), (vec![], false));
    assert_eq!(page(&a.request(q(json!({"type":"history","before":100,"limit":2}))).await), (vec![6, 7], true));
    assert_eq!(page(&a.request(q(json!({"type":"sync","after":0,"limit":3}))).await), (vec![1, 2, 3], true));
    assert_eq!(page(&a.request(q(json!({"type":"sync","after":3,"limit":4}))).await), (vec![4, 5, 6, 7], false));
    assert_eq!(page(&a.request(q(json!({"type":"sync","after":6}))).await), (vec![7], false));
    assert_eq!(page(&a.request(q(json!({"type":"sync","after":7}))).await), (vec![], false));
    // limit is clamped into 1..=200.
    assert_eq!(page(&a.request(q(json!({"type":"sync","after":0,"limit":0}))).await), (vec![1], true));
    assert_eq!(page(&a.request(q(json!({"type":"sync","after":0,"limit":-5}))).await), (vec![1], true));
    assert_eq!(page(&a.request(q(json!({"type":"sync","after":0,"limit":100000}))).await).0.len(), 7);
    // Messages in pages look like message frames.
    let h = a.request(q(json!({"type":"sync","after":0,"limit":1}))).await;
    let m = &h["messages"][0];
    assert_eq!(m["body"], "m1");
    assert_eq!(m["conversation"], conv);
    assert_eq!(m["sender"]["id"], "alice");
    assert!(ts_ok(&m["ts"]));
    // Bad cursors.
    let e = a.request(q(json!({"type":"history","before":"x"}))).await;
    assert_eq!(e["code"], "bad_request");
    let e = a.request(q(json!({"type":"sync","after":-1}))).await;
    assert_eq!(e["code"], "bad_request");
}

async fn presence_with_two_connections(engine: Engine) {
    let chat = engine.start(&[]).await;
    let conv = group(&chat, &["alice", "bob"]).await;
    let mut a = chat.client("alice").await;
    let r = a.request(json!({"type":"presence","conversation":conv})).await;
    assert_eq!(r["online"], json!(["alice"]));
    let b1 = chat.client("bob").await;
    let p = a.expect("bob online", |v| is_presence(v) && v["conversation"] == conv).await;
    assert_eq!(p, json!({"type":"presence","conversation":conv,"user":"bob","online":true}));
    // Also pushed in general (small enough).
    a.expect("bob online in general", |v| is_presence(v) && v["conversation"] == "general" && v["user"] == "bob").await;
    let r = a.request(json!({"type":"presence","conversation":conv})).await;
    assert_eq!(r["online"], json!(["alice", "bob"]));
    let r = a.request(json!({"type":"presence","conversation":"general"})).await;
    assert_eq!(r["online"], json!(["alice", "bob"]));
    // A second connection of bob changes nothing.
    let mut b2 = chat.client("bob").await;
    a.barrier().await;
    // bob's own connections never hear about bob.
    b2.barrier().await;
    b2.assert_quiet(SHORT, |v| v["type"] == "presence" && v["user"] != "bob").await;
    b1.close().await;
    a.barrier().await;
    a.assert_quiet(SHORT, |_| false).await;
    b2.close().await;
    let p = a.expect("bob offline", |v| is_presence(v) && v["conversation"] == conv && v["online"] == false).await;
    assert_eq!(p["user"], "bob");
    let r = a.request(json!({"type":"presence","conversation":conv})).await;
    assert_eq!(r["online"], json!(["alice"]));
}

async fn direct_conversations(engine: Engine) {
    let chat = engine.start(&[]).await;
    let mut a = chat.client("alice").await;
    let mut b = chat.client("bob").await;
    let mut c = chat.client("carol").await;
    assert!(a.conversation("dm:alice:bob").is_none(), "listed only once it holds a message");
    let ack = a.say("dm:alice:bob", "psst").await;
    assert_eq!(ack["seq"], 1);
    let m = b.expect_type("message").await;
    assert_eq!(m["conversation"], "dm:alice:bob");
    a.expect_type("message").await;
    c.barrier().await;
    c.assert_quiet(SHORT, is_presence).await;
    let e = c.request(json!({"type":"history","conversation":"dm:alice:bob"})).await;
    assert_eq!(e["code"], "forbidden");
    let e = c.request(json!({"type":"history","conversation":"dm:bob:alice"})).await;
    assert_eq!(e["code"], "bad_request");
    let b2 = chat.client("bob").await;
    let entry = b2.conversation("dm:alice:bob").expect("listed after the first message");
    assert_eq!(entry["last_seq"], 1);
    assert_eq!(entry["unread"], 1);
    assert_eq!(entry["title"], "alice");
}

async fn group_membership_events(engine: Engine) {
    let chat = engine.start(&[]).await;
    let mut carol = chat.client("carol").await;
    let mut alice = chat.client("alice").await;
    let conv = unique("deal");
    let (s, obj) = chat
        .api(
            Method::PUT,
            &format!("/api/v1/conversations/{conv}"),
            Some(json!({"title":"Deal #42","members":["alice"]})),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(obj, json!({"id":conv,"title":"Deal #42","members":["alice"],"last_seq":0}));
    let ev = alice.expect_type("conversation").await;
    assert_eq!(ev, json!({"type":"conversation","conversation":obj,"member":true}));
    // carol is not a member yet.
    assert_eq!(carol.say(&conv, "hi").await["code"], "forbidden");
    let (s, obj) =
        chat.api(Method::POST, &format!("/api/v1/conversations/{conv}/members"), Some(json!({"add":["carol"]}))).await;
    assert_eq!(s, 200);
    assert_eq!(obj["members"], json!(["alice", "carol"]));
    let ev = carol.expect_type("conversation").await;
    assert_eq!(ev["member"], true);
    assert_eq!(ev["conversation"]["id"], conv);
    // alice, already a member, gets no membership event.
    alice.barrier().await;
    alice.assert_quiet(SHORT, is_presence).await;
    // carol now receives and can send, on her existing connection.
    alice.say(&conv, "welcome carol").await;
    assert_eq!(carol.expect_type("message").await["body"], "welcome carol");
    assert_eq!(carol.say(&conv, "thanks").await["type"], "ack");
    for c in [&mut alice, &mut carol] {
        c.expect("carol's message", |v| v["type"] == "message" && v["body"] == "thanks").await;
    }
    // Removed: an event, then nothing more from the conversation.
    let (s, _) = chat
        .api(Method::POST, &format!("/api/v1/conversations/{conv}/members"), Some(json!({"remove":["carol"]})))
        .await;
    assert_eq!(s, 200);
    let ev = carol.expect_type("conversation").await;
    assert_eq!(ev["member"], false);
    assert_eq!(ev["conversation"]["members"], json!(["alice"]));
    alice.say(&conv, "after carol left").await;
    carol.barrier().await;
    carol.assert_quiet(SHORT, |v| v["type"] != "message" || v["conversation"] != conv.as_str()).await;
    assert_eq!(carol.say(&conv, "still here?").await["code"], "forbidden");
    // Removed and added in one call: still a member, no event.
    let (s, obj) = chat
        .api(
            Method::POST,
            &format!("/api/v1/conversations/{conv}/members"),
            Some(json!({"add":["alice"],"remove":["alice"]})),
        )
        .await;
    assert_eq!((s, obj["members"].clone()), (200, json!(["alice"])));
    alice.barrier().await;
    alice.assert_quiet(SHORT, |v| is_presence(v) || v["type"] == "message").await;
    // PUT replaces the member list: alice out, bob in.
    let mut bob = chat.client("bob").await;
    chat.put_group(&conv, &["bob"]).await;
    assert_eq!(alice.expect_type("conversation").await["member"], false);
    assert_eq!(bob.expect_type("conversation").await["member"], true);
}

async fn resume_after_reconnect_loses_nothing(engine: Engine) {
    let chat = engine.start(&[]).await;
    let conv = group(&chat, &["alice", "bob"]).await;
    let mut a = chat.client("alice").await;
    let mut b = chat.client("bob").await;
    for i in 0..3 {
        a.say(&conv, &format!("before {i}")).await;
    }
    let mut last = 0;
    while last < 3 {
        last = b.expect_type("message").await["seq"].as_u64().unwrap();
    }
    b.close().await;
    for i in 0..5 {
        a.say(&conv, &format!("while away {i}")).await;
    }
    let mut b = chat.client("bob").await;
    assert_eq!(b.conversation(&conv).unwrap()["last_seq"], 8);
    let page = b.request(json!({"type":"sync","conversation":conv,"after":last})).await;
    let got = page["messages"].as_array().unwrap();
    assert_eq!(seqs(got), vec![4, 5, 6, 7, 8]);
    assert_eq!(got[0]["body"], "while away 0");
    assert_eq!(page["has_more"], false);
    // Live traffic continues after the sync.
    a.say(&conv, "live").await;
    assert_eq!(b.expect_type("message").await["seq"], 9);
}

async fn service_api(engine: Engine) {
    let chat = engine.start(&[]).await;
    let node = chat.node();
    // Auth: missing and wrong keys, same error shape.
    for auth in [None, Some("Bearer wrong"), Some("Basic abc")] {
        let mut req = node.http.get(node.url("/api/v1/users/alice/conversations"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "unauthorized");
    }
    let conv = unique("deal");
    let path = format!("/api/v1/conversations/{conv}");
    // Unknown group: 404.
    let (s, v) = chat.api(Method::GET, &format!("{path}/messages"), None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")));
    let (s, _) = chat.api(Method::POST, &format!("{path}/members"), Some(json!({"add":["x"]}))).await;
    assert_eq!(s, 404);
    let (s, _) = chat
        .api(Method::POST, &format!("{path}/messages"), Some(json!({"sender":"alice","body":"x","client_msg_id":"1"})))
        .await;
    assert_eq!(s, 404);
    // Bad input: 400 with the error shape.
    for (method, p, body) in [
        (Method::PUT, path.clone(), json!({"members":"alice"})),
        (Method::PUT, path.clone(), json!({"members":["bad id"]})),
        (Method::PUT, "/api/v1/conversations/dm:alice:bob".to_string(), json!({"members":["alice"]})),
        (Method::PUT, "/api/v1/conversations/general".to_string(), json!({"members":["alice"]})),
        (Method::PUT, "/api/v1/conversations/bad%20id".to_string(), json!({"members":["alice"]})),
    ] {
        let (s, v) = chat.api(method, &p, Some(body.clone())).await;
        assert_eq!(s, 400, "{p} {body} -> {v}");
        assert_eq!(v["error"]["code"], "bad_request");
    }
    let r = node.http.put(node.url(&path)).bearer_auth(common::API_KEY).body("{not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    // Create (idempotent) and post.
    let (s, obj) = chat.api(Method::PUT, &path, Some(json!({"title":"Deal","members":["bob","alice","alice"]}))).await;
    assert_eq!(s, 200);
    assert_eq!(obj["members"], json!(["alice", "bob"]));
    let (s, obj2) = chat.api(Method::PUT, &path, Some(json!({"title":"Deal","members":["alice","bob"]}))).await;
    assert_eq!((s, &obj2), (200, &obj));
    let mut bob = chat.client("bob").await;
    let post = json!({"sender":"alice","body":"from the CRM","client_msg_id":"crm-1"});
    let (s, v) = chat.api(Method::POST, &format!("{path}/messages"), Some(post.clone())).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!((v["seq"].as_u64(), v["duplicate"].as_bool()), (Some(1), Some(false)));
    assert!(ts_ok(&v["ts"]));
    let m = bob.expect_type("message").await;
    assert_eq!((m["body"].as_str(), m["sender"]["id"].as_str()), (Some("from the CRM"), Some("alice")));
    let (s, v2) = chat.api(Method::POST, &format!("{path}/messages"), Some(post)).await;
    assert_eq!(s, 200);
    assert_eq!(
        (v2["seq"].clone(), v2["ts"].clone(), v2["duplicate"].clone()),
        (v["seq"].clone(), v["ts"].clone(), json!(true))
    );
    bob.barrier().await;
    bob.assert_quiet(SHORT, is_presence).await;
    // Sender must be a member; body rules as for send.
    let (s, v) = chat
        .api(
            Method::POST,
            &format!("{path}/messages"),
            Some(json!({"sender":"mallory","body":"x","client_msg_id":"m"})),
        )
        .await;
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("forbidden")));
    let (s, _) = chat
        .api(Method::POST, &format!("{path}/messages"), Some(json!({"sender":"alice","body":"  ","client_msg_id":"m"})))
        .await;
    assert_eq!(s, 400);
    let (s, _) = chat.api(Method::POST, &format!("{path}/messages"), Some(json!({"sender":"alice","body":"x"}))).await;
    assert_eq!(s, 400, "client_msg_id is required");
    // List messages.
    for i in 2..=5 {
        let (s, _) = chat
            .api(
                Method::POST,
                &format!("{path}/messages"),
                Some(json!({"sender":"bob","body":format!("m{i}"),"client_msg_id":format!("b{i}")})),
            )
            .await;
        assert_eq!(s, 201);
    }
    let (s, v) = chat.api(Method::GET, &format!("{path}/messages?after=1&limit=2"), None).await;
    assert_eq!(s, 200);
    assert_eq!(seqs(v["messages"].as_array().unwrap()), vec![2, 3]);
    assert_eq!(v["has_more"], true);
    let (_, v) = chat.api(Method::GET, &format!("{path}/messages?after=3"), None).await;
    assert_eq!((seqs(v["messages"].as_array().unwrap()), v["has_more"].clone()), (vec![4, 5], json!(false)));
    let (s, _) = chat.api(Method::GET, &format!("{path}/messages?after=abc"), None).await;
    assert_eq!(s, 400);
    // The user route lists what welcome would.
    let (s, v) = chat.api(Method::GET, "/api/v1/users/alice/conversations", None).await;
    assert_eq!(s, 200);
    let ids: Vec<&str> = v["conversations"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"general") && ids.contains(&conv.as_str()), "{v}");
    let entry = v["conversations"].as_array().unwrap().iter().find(|c| c["id"] == conv.as_str()).unwrap();
    assert_eq!((entry["last_seq"].as_u64(), entry["unread"].as_u64()), (Some(5), Some(4)));
    let (s, _) = chat.api(Method::GET, "/api/v1/users/bad%20user/conversations", None).await;
    assert_eq!(s, 400);
    // Unknown routes answer in the same shape.
    let (s, v) = chat.api(Method::GET, "/api/v1/nope", None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")));
}

async fn unread_counts_in_welcome(engine: Engine) {
    let chat = engine.start(&[]).await;
    let conv = group(&chat, &["alice", "bob"]).await;
    let mut a = chat.client("alice").await;
    let mut b = chat.client("bob").await;
    for i in 0..4 {
        a.say(&conv, &format!("a{i}")).await;
    }
    b.say(&conv, "b").await;
    b.send(json!({"type":"read","conversation":conv,"seq":2})).await;
    b.expect_type("receipt").await;
    let b2 = chat.client("bob").await;
    let e = b2.conversation(&conv).unwrap();
    // Messages of others above read_seq 2: a2, a3 (bob's own seq 5 does not count).
    assert_eq!((e["last_seq"].as_u64(), e["read_seq"].as_u64(), e["unread"].as_u64()), (Some(5), Some(2), Some(2)));
    assert_eq!(e["title"], conv.as_str());
    let a2 = chat.client("alice").await;
    assert_eq!(a2.conversation(&conv).unwrap()["unread"], 1);
}

// ---------------------------------------------------------------------------
// Connection-level behaviour (one node is enough; the rules live in the session).

#[tokio::test]
async fn hello_errors_close_4001() {
    let s = common::Server::start(&[("CHAT_AUTH__HELLO_TIMEOUT_S", "1")]).await;
    // Bad token.
    let mut c = Client::connect(&s.ws_url(), None).await.unwrap();
    c.send(json!({"type":"hello","id":1,"token":"not-a-jwt"})).await;
    let (frames, end) = c.until_closed(Duration::from_secs(5)).await;
    assert_eq!(frames[0]["code"], "unauthorized");
    assert_eq!(frames[0]["id"], 1);
    assert_eq!(end, Ended::Close(4001));
    // Another frame before hello.
    let mut c = Client::connect(&s.ws_url(), None).await.unwrap();
    c.send(json!({"type":"send","id":"x","conversation":"general","client_msg_id":"1","body":"hi"})).await;
    let (frames, end) = c.until_closed(Duration::from_secs(5)).await;
    assert_eq!((frames[0]["code"].as_str(), frames[0]["id"].as_str()), (Some("unauthorized"), Some("x")));
    assert_eq!(end, Ended::Close(4001));
    // Any JSON object that is not a usable hello counts as another frame.
    for frame in [json!({"type":"hello","id":3}), json!({"type":"bogus","id":4}), json!({"id":5})] {
        let mut c = Client::connect(&s.ws_url(), None).await.unwrap();
        c.send(frame.clone()).await;
        let (frames, end) = c.until_closed(Duration::from_secs(5)).await;
        assert_eq!(frames[0]["code"], "unauthorized", "{frame}");
        assert_eq!(frames[0]["id"], frame["id"]);
        assert_eq!(end, Ended::Close(4001), "{frame}");
    }
    // Garbage before hello is "another frame" too (v1.1): unauthorized, 4001.
    for junk in [
        tokio_tungstenite::tungstenite::Message::Text("not json".into()),
        tokio_tungstenite::tungstenite::Message::Binary(vec![1, 2, 3].into()),
    ] {
        let mut c = Client::connect(&s.ws_url(), None).await.unwrap();
        c.send_raw(junk).await;
        let (frames, end) = c.until_closed(Duration::from_secs(5)).await;
        assert_eq!(frames[0]["code"], "unauthorized");
        assert_eq!(end, Ended::Close(4001));
    }
    // Silence past auth.hello_timeout_s.
    let mut c = Client::connect(&s.ws_url(), None).await.unwrap();
    let (_, end) = c.until_closed(Duration::from_secs(5)).await;
    assert_eq!(end, Ended::Close(4001));
    // Expired and wrongly signed tokens.
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub":"alice","exp": 9_999_999_999u64}),
        &jsonwebtoken::EncodingKey::from_secret(b"some other secret"),
    )
    .unwrap();
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub":"alice","exp": 1_000_000u64}),
        &jsonwebtoken::EncodingKey::from_secret(common::JWT_SECRET.as_bytes()),
    )
    .unwrap();
    for token in [forged, expired] {
        let mut c = Client::connect(&s.ws_url(), None).await.unwrap();
        c.send(json!({"type":"hello","token":token})).await;
        let (frames, end) = c.until_closed(Duration::from_secs(5)).await;
        assert_eq!(frames[0]["code"], "unauthorized");
        assert_eq!(end, Ended::Close(4001));
    }
}

#[tokio::test]
async fn token_at_upgrade_header_and_cookie() {
    let s = common::Server::start(&[]).await;
    let token = s.token("alice").await;
    for headers in [
        vec![("authorization", format!("Bearer {token}"))],
        vec![("cookie", format!("theme=dark; chat_token={token}"))],
    ] {
        let mut c = Client::connect(&s.ws_url(), Some(headers)).await.unwrap();
        let w = c.next().await;
        assert_eq!(w["type"], "welcome", "welcome comes unprompted");
        assert!(w.get("id").is_none());
        assert_eq!(w["user"]["id"], "alice");
        let r = c.request(json!({"type":"hello","token":token})).await;
        assert_eq!(r["code"], "bad_request");
    }
    // Another Authorization scheme (a proxy's Basic auth) leaves the cookie to speak.
    let headers = vec![("authorization", "Basic dXNlcjpwdw==".to_string()), ("cookie", format!("chat_token={token}"))];
    let mut c = Client::connect(&s.ws_url(), Some(headers)).await.unwrap();
    assert_eq!(c.next().await["type"], "welcome");
    // A bad token at upgrade: HTTP 401, no upgrade.
    let e = Client::connect(&s.ws_url(), Some(vec![("authorization", "Bearer nope".into())])).await.err().unwrap();
    match e {
        tokio_tungstenite::tungstenite::Error::Http(r) => assert_eq!(r.status(), 401),
        other => panic!("expected HTTP 401, got {other:?}"),
    }
    let e = Client::connect(&s.ws_url(), Some(vec![("cookie", "chat_token=nope".into())])).await.err().unwrap();
    assert!(matches!(e, tokio_tungstenite::tungstenite::Error::Http(ref r) if r.status() == 401), "{e:?}");
}

#[tokio::test]
async fn origin_check() {
    let s = common::Server::start(&[("CHAT_SERVER__ALLOWED_ORIGINS", "[\"https://crm.example.com\"]")]).await;
    let token = s.token("alice").await;
    let bearer = ("authorization", format!("Bearer {token}"));
    let e = Client::connect(&s.ws_url(), Some(vec![bearer.clone(), ("origin", "https://evil.example".into())]))
        .await
        .err()
        .unwrap();
    assert!(matches!(e, tokio_tungstenite::tungstenite::Error::Http(ref r) if r.status() == 403), "{e:?}");
    let mut ok = Client::connect(&s.ws_url(), Some(vec![bearer.clone(), ("origin", "https://crm.example.com".into())]))
        .await
        .unwrap();
    assert_eq!(ok.next().await["type"], "welcome");
    // No Origin header: a non-browser client passes.
    let mut ok = Client::connect(&s.ws_url(), Some(vec![bearer])).await.unwrap();
    assert_eq!(ok.next().await["type"], "welcome");
}

#[tokio::test]
async fn bad_frames_then_4008() {
    let s = common::Server::start(&[("CHAT_LIMITS__MAX_BAD_FRAMES", "3")]).await;
    let mut c = s.client("alice").await;
    c.send_raw(tokio_tungstenite::tungstenite::Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(c.expect_type("error").await["code"], "bad_request");
    for raw in ["{not json", "[1,2,3]"] {
        c.send_raw(tokio_tungstenite::tungstenite::Message::Text(raw.into())).await;
        assert_eq!(c.expect_type("error").await["code"], "bad_request");
    }
    // Still usable: bad frames are tolerated up to the limit.
    c.barrier().await;
    c.send(json!({"type":"bogus"})).await;
    let (frames, end) = c.until_closed(Duration::from_secs(5)).await;
    assert_eq!(frames.last().unwrap()["code"], "bad_request");
    assert_eq!(end, Ended::Close(4008));
}

#[tokio::test]
async fn frame_too_big_closes_1009() {
    let s = common::Server::start(&[("CHAT_LIMITS__MAX_FRAME_BYTES", "1024")]).await;
    let mut c = s.client("alice").await;
    // Just under the limit is fine (and too long a body for the default 4000 chars? no: 900).
    let ok = c.say("general", &"x".repeat(900)).await;
    assert_eq!(ok["type"], "ack");
    c.send(json!({"type":"send","conversation":"general","client_msg_id":"big","body":"x".repeat(2000)})).await;
    let (_, end) = c.until_closed(Duration::from_secs(5)).await;
    assert_eq!(end, Ended::Close(1009));
    // Nothing of it was stored.
    let mut c = s.client("alice").await;
    assert_eq!(c.conversation("general").unwrap()["last_seq"], 1);
    c.barrier().await;
}

#[tokio::test]
async fn send_rate_limit_then_4008_on_abuse() {
    let s = common::Server::start(&[
        ("CHAT_LIMITS__SEND_PER_S", "1"),
        ("CHAT_LIMITS__SEND_BURST", "2"),
        ("CHAT_LIMITS__MAX_BAD_FRAMES", "3"),
    ])
    .await;
    let mut c = s.client("alice").await;
    assert_eq!(c.say("general", "1").await["type"], "ack");
    assert_eq!(c.say("general", "2").await["type"], "ack");
    let e = c.say("general", "3").await;
    assert_eq!(e["code"], "rate_limited");
    let wait = e["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!((1..=1000).contains(&wait), "{e}");
    // Waiting as told works.
    tokio::time::sleep(Duration::from_millis(wait + 50)).await;
    assert_eq!(c.say("general", "4").await["type"], "ack");
    // The bucket is per user, not per connection.
    let mut c2 = s.client("alice").await;
    assert_eq!(c2.say("general", "5").await["code"], "rate_limited");
    // Hammering on regardless: 4008.
    for i in 0..4 {
        c.send(json!({"type":"send","conversation":"general","client_msg_id":format!("h{i}"),"body":"x"})).await;
    }
    let (frames, end) = c.until_closed(Duration::from_secs(5)).await;
    assert!(
        frames.iter().all(|f| f["code"] == "rate_limited" || f["type"] == "message" || is_presence(f)),
        "{frames:?}"
    );
    assert_eq!(end, Ended::Close(4008));
}

#[tokio::test]
async fn connections_per_user_limit() {
    let s = common::Server::start(&[("CHAT_LIMITS__CONNECTIONS_PER_USER", "2")]).await;
    let _a = s.client("alice").await;
    let _b = s.client("alice").await;
    let token = s.token("alice").await;
    let mut c = Client::connect(&s.ws_url(), None).await.unwrap();
    c.send(json!({"type":"hello","id":1,"token":token})).await;
    let (frames, end) = c.until_closed(Duration::from_secs(5)).await;
    assert_eq!(frames[0]["code"], "rate_limited");
    assert_eq!(end, Ended::Close(4008));
    let e = Client::connect(&s.ws_url(), Some(vec![("authorization", format!("Bearer {token}"))])).await.err().unwrap();
    assert!(matches!(e, tokio_tungstenite::tungstenite::Error::Http(ref r) if r.status() == 429), "{e:?}");
    // Another user is not affected.
    s.client("bob").await.barrier().await;
}

#[tokio::test]
async fn heartbeat_pings_and_idle_close_1001() {
    let s = common::Server::start(&[("CHAT_SERVER__HEARTBEAT_S", "1")]).await;
    let token = s.token("alice").await;
    // A raw client that never answers the server's pings.
    let mut raw = common::RawWs::connect(s.addr, "").await;
    raw.send_text(&json!({"type":"hello","token":token}).to_string()).await;
    let started = std::time::Instant::now();
    let (frames, close) = raw.close_code(Duration::from_secs(6)).await;
    let waited = started.elapsed();
    let pings = frames.iter().filter(|(op, _)| *op == 0x9).count();
    assert!(frames.iter().any(|(op, p)| *op == 0x1 && String::from_utf8_lossy(p).contains("welcome")));
    assert!(waited >= Duration::from_millis(1900), "closed after {waited:?}, before 2 x heartbeat_s");
    assert!(pings >= 1, "server sends pings");
    assert_eq!(close, Some(1001), "silent for 2 x heartbeat_s");
    // A client that keeps reading (and so answers pings) stays connected.
    let mut c = s.client("bob").await;
    let frames = c.drain(Duration::from_millis(3500)).await;
    assert!(frames.iter().all(is_presence), "{frames:?}");
    c.barrier().await;
}

#[tokio::test]
async fn slow_consumer_is_closed_1013_others_keep_receiving() {
    let s = common::Server::start(&[
        ("CHAT_LIMITS__OUTBOUND_QUEUE", "16"),
        ("CHAT_LIMITS__MAX_BODY_CHARS", "16000"),
        ("CHAT_LIMITS__SEND_PER_S", "100000"),
        ("CHAT_LIMITS__SEND_BURST", "100000"),
    ])
    .await;
    let conv = unique("flood");
    s.put_group(&conv, &["sender", "fast", "slow"]).await;
    // The slow consumer: a tiny receive buffer and nobody reading.
    let token = s.token("slow").await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(s.addr).await.unwrap();
    let (mut slow, _) = tokio_tungstenite::client_async(s.ws_url(), stream).await.unwrap();
    use futures_util::{SinkExt, StreamExt};
    slow.send(tokio_tungstenite::tungstenite::Message::Text(json!({"type":"hello","token":token}).to_string().into()))
        .await
        .unwrap();
    let mut fast = s.client("fast").await;
    let body = "x".repeat(15000);
    let n = 600u64;
    let fast_reader = tokio::spawn(async move {
        let mut last = 0;
        while last < n {
            let m = fast.expect_type("message").await;
            last = m["seq"].as_u64().unwrap();
        }
        last
    });
    // The sender posts through the service API, so no socket of its own can lag.
    let path = format!("/api/v1/conversations/{conv}/messages");
    let slow_closed =
        |m: &str| m.lines().any(|l| l.starts_with("chat_slow_consumer_closes_total") && !l.ends_with(" 0"));
    let mut close = None;
    for i in 0..n {
        let (status, _) = s
            .api(Method::POST, &path, Some(json!({"sender":"sender","client_msg_id":format!("f{i}"),"body":body})))
            .await;
        assert_eq!(status, 201);
        // Once the server has given up on the slow one, read what reached it:
        // the backlog already in flight, then close 1013.
        if close.is_none() && i % 10 == 0 && slow_closed(&s.metrics().await) {
            while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(10), slow.next()).await {
                if let tokio_tungstenite::tungstenite::Message::Close(f) = m {
                    close = f.map(|f| u16::from(f.code));
                    break;
                }
            }
            assert_eq!(close, Some(1013));
        }
    }
    assert_eq!(fast_reader.await.unwrap(), n, "the fast member got everything");
    assert_eq!(close, Some(1013), "the slow consumer was closed");
    let metrics = s.metrics().await;
    assert!(
        metrics.lines().any(|l| l.starts_with("chat_slow_consumer_closes_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

#[tokio::test]
async fn drain_on_sigterm() {
    let mut s = common::Server::start(&[("CHAT_SERVER__DRAIN_S", "2")]).await;
    let mut a = s.client("alice").await;
    let mut b = s.client("bob").await;
    assert_eq!(s.http.get(s.url("/readyz")).send().await.unwrap().status(), 200);
    s.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.http.get(s.url("/readyz")).send().await.unwrap().status(), 503);
    let e = Client::connect(&s.ws_url(), None).await.err().unwrap();
    assert!(matches!(e, tokio_tungstenite::tungstenite::Error::Http(ref r) if r.status() == 503), "{e:?}");
    let (_, ea) = a.until_closed(Duration::from_secs(5)).await;
    let (_, eb) = b.until_closed(Duration::from_secs(5)).await;
    assert_eq!((ea, eb), (Ended::Close(1012), Ended::Close(1012)));
    assert_eq!(s.wait_exit(Duration::from_secs(10)).await, Some(0));
}

#[tokio::test]
async fn health_metrics_and_dev_tokens() {
    let s = common::Server::start(&[]).await;
    let r = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = s.http.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-chat-node").is_some(), "responses name the node");
    let mut a = s.client("alice").await;
    a.say("general", "counted").await;
    a.barrier().await;
    let m = s.metrics().await;
    for name in [
        "chat_connections",
        "chat_frames_total",
        "chat_messages_stored_total",
        "chat_deliveries_total",
        "chat_fanout_latency_seconds_bucket",
        "chat_slow_consumer_closes_total",
        "chat_storage_errors_total",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics:\n{m}");
    }
    assert!(
        m.contains("chat_connections{node=")
            && m.lines().any(|l| l.starts_with("chat_connections{") && l.ends_with(" 1")),
        "{m}"
    );
    assert!(m.lines().any(|l| l.starts_with("chat_messages_stored_total") && l.ends_with(" 1")), "{m}");
    assert!(m.contains(r#"direction="in",type="send"}"#), "{m}");
    // Dev tokens: validation, and 404 when disabled.
    let r = s.http.post(s.url("/api/v1/dev/token")).json(&json!({"user":"bad id"})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let off = common::Server::start(&[("CHAT_AUTH__DEV_TOKENS", "false")]).await;
    let r = off.http.post(off.url("/api/v1/dev/token")).json(&json!({"user":"alice"})).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = off.http.post(off.url("/api/v1/dev/token")).body("garbage").send().await.unwrap();
    assert_eq!(r.status(), 404, "the route does not exist, whatever the body");
}
