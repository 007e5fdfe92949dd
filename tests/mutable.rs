//! Messages people can change (PROTOCOL v1.2), end to end against real
//! crm-chat processes: replies, edits, deletes and reactions, live on every
//! node, replayed by `sync`, idempotent by state, and every bad input
//! refused with nothing stored or broadcast. Every suite function runs on
//! each engine (see `engine_suite!`); on Valkey, consecutive clients land on
//! different nodes, so alice's changes cross to bob's node.

mod common;

use std::time::Duration;

use common::{Chat, Client, Engine, is_presence, unique};
use reqwest::Method;
use serde_json::{Value, json};

const SHORT: Duration = Duration::from_millis(300);

engine_suite!(
    changes_reach_every_member_on_every_node,
    sync_after_reconnect_replays_changes_in_order,
    bad_changes_store_and_broadcast_nothing,
    edit_window_and_reaction_limit_apply,
    moderation_through_the_service_api,
    a_flood_of_changes_draws_from_the_send_budget,
);

async fn edit(c: &mut Client, conv: &str, seq: u64, body: &str) -> Value {
    c.request(json!({"type":"edit","conversation":conv,"seq":seq,"body":body})).await
}

async fn delete(c: &mut Client, conv: &str, seq: u64) -> Value {
    c.request(json!({"type":"delete","conversation":conv,"seq":seq})).await
}

async fn react(c: &mut Client, conv: &str, seq: u64, emoji: &str, on: bool) -> Value {
    c.request(json!({"type":"react","conversation":conv,"seq":seq,"emoji":emoji,"on":on})).await
}

async fn update(c: &mut Client, seq: u64) -> Value {
    c.expect("update", |v| v["type"] == "update" && v["seq"] == seq).await
}

fn ack(r: &Value) -> (u64, bool) {
    assert_eq!(r["type"], "ack", "{r}");
    (r["seq"].as_u64().unwrap(), r["duplicate"].as_bool().unwrap())
}

/// A conversation of its own per test run (open conversations are shared).
async fn room(chat: &Chat) -> String {
    let id = unique("room");
    chat.put_group(&id, &["alice", "bob"]).await;
    id
}

async fn last_seq(c: &mut Client, conv: &str) -> u64 {
    let h = c.request(json!({"type":"sync","conversation":conv,"after":0,"limit":200})).await;
    h["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).max().unwrap_or(0)
}

async fn changes_reach_every_member_on_every_node(engine: Engine) {
    let chat = engine.start(&[]).await;
    let mut a = chat.client("alice").await;
    let mut b = chat.client("bob").await;
    let conv = room(&chat).await;
    a.expect_type("conversation").await;
    b.expect_type("conversation").await;
    let (m, _) = ack(&a.say(&conv, "the price is 100").await);
    b.expect_type("message").await;

    let (e, dup) = ack(&edit(&mut a, &conv, m, "the price is 120").await);
    assert_eq!((e, dup), (m + 1, false), "an update takes the next seq");
    for c in [&mut a, &mut b] {
        let u = update(c, e).await;
        assert_eq!(
            (u["target"].as_u64(), u["kind"].as_str(), u["body"].as_str()),
            (Some(m), Some("edit"), Some("the price is 120"))
        );
        assert_eq!(u["user"]["id"], "alice");
    }
    let (r, _) = ack(&react(&mut b, &conv, m, "👍", true).await);
    let u = update(&mut a, r).await;
    assert_eq!(
        (u["emoji"].as_str(), u["on"].as_bool(), u["user"]["id"].as_str()),
        (Some("👍"), Some(true), Some("bob"))
    );
    update(&mut b, r).await;
    // Retries are duplicates with the seq of the change already made.
    assert_eq!(ack(&edit(&mut a, &conv, m, "the price is 120").await), (r, true));
    assert_eq!(ack(&react(&mut b, &conv, m, "👍", true).await), (r, true));
    // A reply carries its target.
    let reply = b
        .request(json!({"type":"send","conversation":conv,"client_msg_id":unique("c"),"body":"ok","reply_to":m}))
        .await;
    let (rs, _) = ack(&reply);
    let got = a.expect("reply", |v| v["type"] == "message" && v["seq"] == rs).await;
    assert_eq!(got["reply_to"], m);
    let (d, _) = ack(&delete(&mut a, &conv, m).await);
    let u = update(&mut b, d).await;
    assert_eq!((u["kind"].as_str(), u.get("body")), (Some("delete"), None));
    assert_eq!(ack(&delete(&mut a, &conv, m).await), (d, true), "a retried delete");
    b.barrier().await;
    b.assert_quiet(SHORT, |v| is_presence(v) || v["type"] == "update" || v["type"] == "message").await;

    // History: messages only, current state.
    let h = b.request(json!({"type":"history","conversation":conv})).await;
    let msgs = h["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2, "{h}");
    assert_eq!((msgs[0]["deleted"].as_bool(), msgs[0]["body"].as_str()), (Some(true), Some("")));
    assert!(msgs[0]["edited_at"].is_string());
    assert_eq!(msgs[0]["reactions"], json!([{"emoji":"👍","users":["bob"]}]));
    assert_eq!(msgs[1]["reply_to"], m);

    // A direct conversation (user topics; on Cluster published after the script).
    let dm = "dm:alice:bob";
    let (d1, _) = ack(&a.say(dm, "direct").await);
    b.expect("the direct message", |v| v["type"] == "message" && v["conversation"] == dm).await;
    let (r, _) = ack(&react(&mut b, dm, d1, "🙏", true).await);
    let u = a.expect("the direct update", |v| v["type"] == "update" && v["conversation"] == dm && v["seq"] == r).await;
    assert_eq!((u["target"].as_u64(), u["emoji"].as_str()), (Some(d1), Some("🙏")));
    let (e, _) = ack(&edit(&mut a, dm, d1, "direct, edited").await);
    b.expect("the direct edit", |v| v["type"] == "update" && v["conversation"] == dm && v["seq"] == e).await;
    assert_eq!(edit(&mut b, dm, d1, "not mine").await["code"], "forbidden");
}

async fn sync_after_reconnect_replays_changes_in_order(engine: Engine) {
    let chat = engine.start(&[]).await;
    let mut a = chat.client("alice").await;
    let conv = room(&chat).await;
    let (m, _) = ack(&a.say(&conv, "draft").await);
    let b = chat.client("bob").await;
    let held = b.conversation(&conv).expect("listed")["last_seq"].as_u64().unwrap();
    assert_eq!(held, m);
    b.close().await;
    // While bob is away: an edit, a reaction, a delete.
    let (e, _) = ack(&edit(&mut a, &conv, m, "final").await);
    let (r, _) = ack(&react(&mut a, &conv, m, "🙏", true).await);
    let (d, _) = ack(&delete(&mut a, &conv, m).await);
    let mut b = chat.client("bob").await;
    let entry = b.conversation(&conv).expect("listed").clone();
    assert_eq!((entry["last_seq"].as_u64(), entry["unread"].as_u64()), (Some(d), Some(1)), "unread counts messages");
    let h = b.request(json!({"type":"sync","conversation":conv,"after":held,"limit":100})).await;
    let got: Vec<(u64, String, String)> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["seq"].as_u64().unwrap(),
                f["type"].as_str().unwrap_or("").into(),
                f["kind"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    let want = vec![
        (e, "update".to_string(), "edit".to_string()),
        (r, "update".to_string(), "reaction".to_string()),
        (d, "update".to_string(), "delete".to_string()),
    ];
    assert_eq!(got, want, "{h}");
    // `limit` counts both: from 0 with limit 2, the message and the edit.
    let h = b.request(json!({"type":"sync","conversation":conv,"after":0,"limit":2})).await;
    let seqs: Vec<u64> = h["messages"].as_array().unwrap().iter().map(|f| f["seq"].as_u64().unwrap()).collect();
    assert_eq!((seqs, h["has_more"].as_bool()), (vec![m, e], Some(true)));
    // The message in sync is in its current state too.
    assert_eq!(h["messages"][0]["deleted"], true);
}

async fn bad_changes_store_and_broadcast_nothing(engine: Engine) {
    let env = [("CHAT_LIMITS__MAX_BODY_CHARS", "20"), ("CHAT_LIMITS__MAX_BAD_FRAMES", "100")];
    let chat = engine.start(&env).await;
    let mut a = chat.client("alice").await;
    let mut b = chat.client("bob").await;
    let mut c = chat.client("carol").await;
    let conv = room(&chat).await;
    a.expect_type("conversation").await;
    b.expect_type("conversation").await;
    let (m, _) = ack(&a.say(&conv, "hello").await);
    let (u, _) = ack(&react(&mut a, &conv, m, "👍", true).await);
    let (gone, _) = ack(&a.say(&conv, "to delete").await);
    ack(&delete(&mut a, &conv, gone).await);
    b.barrier().await;
    b.drain(SHORT).await;
    let before = last_seq(&mut b, &conv).await;
    let code = |r: &Value| r["code"].as_str().unwrap_or("").to_string();
    let frame = |ty: &str, extra: Value| {
        let mut v = json!({"type":ty,"conversation":conv});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let cases: Vec<(Value, &str)> = vec![
        (frame("edit", json!({"seq":99,"body":"x"})), "bad_request"),
        (frame("edit", json!({"seq":u,"body":"x"})), "bad_request"),
        (frame("edit", json!({"seq":0,"body":"x"})), "bad_request"),
        (frame("edit", json!({"seq":-3,"body":"x"})), "bad_request"),
        (frame("edit", json!({"seq":m,"body":"   "})), "bad_request"),
        (frame("edit", json!({"seq":m,"body":"x".repeat(21)})), "too_large"),
        (frame("edit", json!({"seq":gone,"body":"back"})), "bad_request"),
        (frame("edit", json!({"seq":m})), "bad_request"),
        (frame("react", json!({"seq":m,"emoji":"a b","on":true})), "bad_request"),
        (frame("react", json!({"seq":m,"emoji":"","on":true})), "bad_request"),
        (frame("react", json!({"seq":m,"emoji":"x".repeat(17),"on":true})), "bad_request"),
        (frame("react", json!({"seq":m,"emoji":"a\u{0007}","on":true})), "bad_request"),
        (frame("react", json!({"seq":m,"emoji":"👍"})), "bad_request"),
        (frame("react", json!({"seq":u,"emoji":"👍","on":true})), "bad_request"),
        (frame("send", json!({"body":"r","client_msg_id":unique("c"),"reply_to":u})), "bad_request"),
        (frame("send", json!({"body":"r","client_msg_id":unique("c"),"reply_to":0})), "bad_request"),
        (frame("send", json!({"body":"r","client_msg_id":unique("c"),"reply_to":999})), "bad_request"),
    ];
    for (f, want) in &cases {
        let r = a.request(f.clone()).await;
        assert_eq!(code(&r), *want, "{f} -> {r}");
    }
    // Someone else's message: forbidden.
    assert_eq!(code(&edit(&mut b, &conv, m, "mine now").await), "forbidden");
    assert_eq!(code(&delete(&mut b, &conv, m).await), "forbidden");
    // A non-member: forbidden for any change.
    assert_eq!(code(&react(&mut c, &conv, m, "👍", true).await), "forbidden");
    assert_eq!(code(&edit(&mut c, &conv, m, "x").await), "forbidden");
    assert_eq!(last_seq(&mut b, &conv).await, before, "nothing stored");
    b.assert_quiet(SHORT, is_presence).await;
}

async fn edit_window_and_reaction_limit_apply(engine: Engine) {
    let env = [("CHAT_LIMITS__EDIT_WINDOW_S", "1"), ("CHAT_LIMITS__REACTIONS_PER_MESSAGE", "2")];
    let chat = engine.start(&env).await;
    let mut a = chat.client("alice").await;
    let conv = room(&chat).await;
    let (m, _) = ack(&a.say(&conv, "typo").await);
    ack(&react(&mut a, &conv, m, "a", true).await);
    ack(&react(&mut a, &conv, m, "b", true).await);
    let r = react(&mut a, &conv, m, "c", true).await;
    assert_eq!(r["code"], "bad_request", "a third distinct emoji: {r}");
    ack(&react(&mut a, &conv, m, "a", false).await);
    ack(&react(&mut a, &conv, m, "c", true).await);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let r = edit(&mut a, &conv, m, "fixed").await;
    assert_eq!(r["code"], "forbidden", "outside the window: {r}");
    // Deleting has no window.
    ack(&delete(&mut a, &conv, m).await);
}

async fn moderation_through_the_service_api(engine: Engine) {
    let chat = engine.start(&[]).await;
    let mut b = chat.client("bob").await;
    let conv = room(&chat).await;
    b.expect_type("conversation").await;
    let (s, v) = chat
        .api(
            Method::POST,
            &format!("/api/v1/conversations/{conv}/messages"),
            Some(json!({"sender":"alice","body":"spam","client_msg_id":"m1"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let m = v["seq"].as_u64().unwrap();
    b.expect_type("message").await;
    let path = format!("/api/v1/conversations/{conv}/messages/{m}");
    let (s, v) =
        chat.api(Method::PATCH, &path, Some(json!({"body":"[removed by moderator]","sender":"supervisor1"}))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["type"].as_str(), v["kind"].as_str(), v["user"]["id"].as_str()),
        (Some("update"), Some("edit"), Some("supervisor1"))
    );
    assert_eq!(v["seq"], m + 1);
    let u = update(&mut b, m + 1).await;
    assert_eq!(u["body"], "[removed by moderator]");
    let (s, v) = chat.api(Method::DELETE, &path, None).await;
    assert_eq!((s, v["kind"].as_str(), v["user"]["id"].as_str()), (200, Some("delete"), Some("system")));
    update(&mut b, m + 2).await;
    let (s, _) =
        chat.api(Method::PATCH, &format!("/api/v1/conversations/{conv}/messages/99"), Some(json!({"body":"x"}))).await;
    assert_eq!(s, 404);
    let (s, _) = chat.api(Method::DELETE, &format!("/api/v1/conversations/{conv}/messages/{}", m + 1), None).await;
    assert_eq!(s, 404, "an update is not a message");
    let (s, _) = chat.api(Method::DELETE, &format!("/api/v1/conversations/{}/messages/1", unique("nope")), None).await;
    assert_eq!(s, 404);
    // The API's list is history's form.
    let (_, v) = chat.api(Method::GET, &format!("/api/v1/conversations/{conv}/messages"), None).await;
    assert_eq!(v["messages"].as_array().unwrap().len(), 1);
    assert_eq!(v["messages"][0]["deleted"], true);
}

async fn a_flood_of_changes_draws_from_the_send_budget(engine: Engine) {
    let env = [("CHAT_LIMITS__SEND_PER_S", "0.2"), ("CHAT_LIMITS__SEND_BURST", "4")];
    let chat = engine.start(&env).await;
    let mut a = chat.client("alice").await;
    let conv = room(&chat).await;
    let (m, _) = ack(&a.say(&conv, "react to me").await);
    // The message took one token; three changes take the rest.
    for on in [true, false, true] {
        ack(&react(&mut a, &conv, m, "👍", on).await);
    }
    let before = last_seq(&mut a, &conv).await;
    let r = react(&mut a, &conv, m, "👍", false).await;
    assert_eq!(r["code"], "rate_limited", "{r}");
    assert!(r["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{r}");
    let r = edit(&mut a, &conv, m, "edited").await;
    assert_eq!(r["code"], "rate_limited", "edits share the bucket: {r}");
    assert_eq!(last_seq(&mut a, &conv).await, before, "nothing stored");
}

/// Stream range reads (XRANGE and XREVRANGE) Valkey served so far, scripts'
/// calls included.
async fn xrange_calls(v: &common::valkey::Valkey) -> u64 {
    let stats = v.cli(&["INFO", "commandstats"]).await.expect("info");
    ["cmdstat_xrange:calls=", "cmdstat_xrevrange:calls="]
        .iter()
        .filter_map(|p| stats.lines().find_map(|l| l.strip_prefix(p)))
        .filter_map(|rest| rest.split(',').next()?.trim().parse::<u64>().ok())
        .sum()
}

/// A history page costs its messages, not the changes between them: with
/// 400 reactions between two messages, the page of both reads two stream
/// entries (counted by Valkey itself), and a sync page reads `limit` entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valkey_history_page_reads_its_messages_only() {
    let env = [("CHAT_LIMITS__SEND_PER_S", "100000"), ("CHAT_LIMITS__SEND_BURST", "100000")];
    let chat = Engine::Valkey { nodes: 1 }.start(&env).await;
    let v = chat.valkey.as_ref().expect("valkey");
    let mut a = chat.client("alice").await;
    let conv = room(&chat).await;
    let (m1, _) = ack(&a.say(&conv, "first").await);
    for i in 0..400 {
        ack(&react(&mut a, &conv, m1, "👍", i % 2 == 0).await);
    }
    let (m2, _) = ack(&a.say(&conv, "second").await);
    assert_eq!(m2, m1 + 401);
    let before = xrange_calls(v).await;
    let h = a.request(json!({"type":"history","conversation":conv,"limit":50})).await;
    let seqs: Vec<u64> = h["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![m1, m2]);
    let reads = xrange_calls(v).await - before;
    assert!(reads <= 2, "a page of two messages read {reads} stream ranges");
    // Sync: one range of limit + 1 entries.
    let before = xrange_calls(v).await;
    let s = a.request(json!({"type":"sync","conversation":conv,"after":0,"limit":50})).await;
    assert_eq!(s["messages"].as_array().unwrap().len(), 50);
    assert_eq!(s["has_more"], true);
    assert_eq!(xrange_calls(v).await - before, 1);
}
