//! Big groups (issue 22, finding 1): a group's cost grows linearly with its
//! members, on every engine. Before the fix, each member's `conversation`
//! event carried the whole member list through Valkey, so a PUT of 20,000
//! members sent gigabytes into Valkey, ran into the route's timeout and left
//! online members without the event and without the group's messages.
//! Also `limits.max_group_members` (over it: 400 `bad_request`).

mod common;

use std::time::Instant;

use common::{Client, Engine, valkey::Valkey};
use reqwest::Method;
use serde_json::{Value, json};

const MEMBERS: usize = 20_000;

fn member(i: usize) -> String {
    format!("m{i:05}")
}

fn members(n: usize) -> Vec<String> {
    (0..n).map(member).collect()
}

async fn net_input_bytes(v: &Valkey) -> u64 {
    let info = v.cli(&["INFO", "stats"]).await.expect("INFO stats");
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_input_bytes:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("total_net_input_bytes in INFO stats")
}

/// Waits for the `conversation` event of `conv` on a client, then for a
/// message posted to the group afterwards.
async fn hears_group(c: &mut Client, conv: &str, n_members: usize) {
    let ev = c.expect("conversation event", |v| v["type"] == "conversation" && v["conversation"]["id"] == conv).await;
    assert_eq!(ev["member"], true, "{ev}");
    assert_eq!(ev["conversation"]["members"].as_array().map(Vec::len), Some(n_members), "every member is listed");
}

async fn big_group_reaches_every_online_member(engine: Engine) {
    let chat = engine.start(&[]).await;
    let conv = common::unique("big");
    // The first and the last member online before the PUT, on different
    // nodes when there are two.
    let (first, last) = (member(0), member(MEMBERS - 1));
    let mut a = chat.nodes[0].client(&first).await;
    let mut b = chat.nodes[chat.nodes.len() - 1].client(&last).await;
    let before = match &chat.valkey {
        Some(v) => Some(net_input_bytes(v).await),
        None => None,
    };
    let started = Instant::now();
    let (s, v) = chat.nodes[0]
        .api(
            Method::PUT,
            &format!("/api/v1/conversations/{conv}"),
            Some(json!({"title": "All hands", "members": members(MEMBERS)})),
        )
        .await;
    let took = started.elapsed();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["members"].as_array().map(Vec::len), Some(MEMBERS));
    if let (Some(valkey), Some(before)) = (&chat.valkey, before) {
        let sent = net_input_bytes(valkey).await - before;
        eprintln!("PUT of {MEMBERS} members: {took:?}, {} KiB into Valkey", sent / 1024);
        // The member list travels a few times (the PUT's script, the index,
        // one event): a few MB. Per member it was a whole list each: GBs.
        assert!(sent < 50 << 20, "a PUT of {MEMBERS} members sent {sent} bytes into Valkey (limit 50 MiB)");
    } else {
        eprintln!("PUT of {MEMBERS} members: {took:?}");
    }
    hears_group(&mut a, &conv, MEMBERS).await;
    hears_group(&mut b, &conv, MEMBERS).await;
    // The group's next message reaches both: their connections follow it.
    let (s, v) = chat.nodes[0]
        .api(
            Method::POST,
            &format!("/api/v1/conversations/{conv}/messages"),
            Some(json!({"sender": first, "body": "welcome, everyone", "client_msg_id": "big-1"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    for c in [&mut a, &mut b] {
        let m = c.expect("the group's message", |v| v["type"] == "message" && v["conversation"] == conv).await;
        assert_eq!(m["body"], "welcome, everyone");
    }
    // Removing members is linear too, and they hear it.
    let (s, v) = chat.nodes[0]
        .api(Method::POST, &format!("/api/v1/conversations/{conv}/members"), Some(json!({"remove": [last]})))
        .await;
    assert_eq!(s, 200, "{v}");
    let ev = b.expect("removal", |v| v["type"] == "conversation" && v["conversation"]["id"] == conv).await;
    assert_eq!(ev["member"], false, "{ev}");
}

async fn group_size_is_bounded_by_max_group_members(engine: Engine) {
    let chat = engine.start(&[("CHAT_LIMITS__MAX_GROUP_MEMBERS", "5")]).await;
    let conv = common::unique("capped");
    let path = format!("/api/v1/conversations/{conv}");
    let put = |n: usize| json!({"members": members(n)});
    let (s, v) = chat.api(Method::PUT, &path, Some(put(6))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_request")), "{v}");
    let (s, v) = chat.api(Method::GET, &path, None).await;
    assert_eq!(s, 404, "a refused PUT stores nothing: {v}");
    // Duplicates count once.
    let mut dup = members(5);
    dup.push(member(0));
    let (s, v) = chat.api(Method::PUT, &path, Some(json!({"members": dup}))).await;
    assert_eq!(s, 200, "{v}");
    let add = |add: Vec<String>, remove: Vec<String>| json!({"add": add, "remove": remove});
    let mpath = format!("{path}/members");
    let (s, v) = chat.api(Method::POST, &mpath, Some(add(vec![member(5)], vec![]))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_request")), "a 6th member: {v}");
    // Re-adding a member, or adding one while removing another, stays at 5.
    let (s, v) = chat.api(Method::POST, &mpath, Some(add(vec![member(1)], vec![]))).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = chat.api(Method::POST, &mpath, Some(add(vec![member(5)], vec![member(0)]))).await;
    assert_eq!(s, 200, "{v}");
    let got: Vec<Value> = v["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(got.len(), 5, "{v}");
    assert!(got.contains(&json!(member(5))) && !got.contains(&json!(member(0))), "{v}");
}

engine_suite!(big_group_reaches_every_online_member, group_size_is_bounded_by_max_group_members);
