//! The service API is not rate-limited (docs/protocol.md, *Service API*), on
//! every engine: a burst of posts for one sender is stored whole, and draws
//! nothing from that user's WebSocket send budget, which still applies to
//! the user's own `send`s.

mod common;

use common::{Engine, unique};
use reqwest::Method;
use serde_json::json;

engine_suite!(a_burst_of_posts_for_one_sender_is_stored_whole, a_burst_of_moderation_is_applied_whole);

async fn a_burst_of_posts_for_one_sender_is_stored_whole(engine: Engine) {
    // A small session budget: 300 posts are far beyond it.
    let chat = engine.start(&[("CHAT_LIMITS__SEND_PER_S", "1"), ("CHAT_LIMITS__SEND_BURST", "3")]).await;
    let conv = unique("deal");
    chat.put_group(&conv, &["alice", "bob"]).await;
    let path = format!("/api/v1/conversations/{conv}/messages");
    for i in 1..=300u64 {
        let body = json!({"sender": "alice", "body": format!("post {i}"), "client_msg_id": format!("p{i}")});
        let (s, v) = chat.api(Method::POST, &path, Some(body)).await;
        assert_eq!((s, v["seq"].as_u64()), (201, Some(i)), "post {i}: {v}");
    }
    let (s, v) = chat.api(Method::GET, &format!("{path}?after=295&limit=10"), None).await;
    assert_eq!(s, 200, "{v}");
    let seqs: Vec<u64> = v["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [296, 297, 298, 299, 300]);
    // The posts took nothing from alice's own budget: her burst is whole.
    let mut alice = chat.client("alice").await;
    for i in 1..=3 {
        let r = alice.say(&conv, &format!("own {i}")).await;
        assert_eq!(r["type"], "ack", "send {i} within the burst: {r}");
    }
    // And it still applies to her sends.
    let r = alice.say(&conv, "one too many").await;
    assert_eq!(r["code"], "rate_limited", "{r}");
}

/// Moderation (v1.2's PATCH and DELETE of one message) is the service API
/// too: a supervisor editing and taking down many messages in a row is never
/// answered 429, on any engine.
async fn a_burst_of_moderation_is_applied_whole(engine: Engine) {
    let chat = engine.start(&[("CHAT_LIMITS__SEND_PER_S", "1"), ("CHAT_LIMITS__SEND_BURST", "3")]).await;
    let conv = unique("deal");
    chat.put_group(&conv, &["alice", "bob"]).await;
    let path = format!("/api/v1/conversations/{conv}/messages");
    for i in 1..=60u64 {
        let body = json!({"sender": "alice", "body": format!("post {i}"), "client_msg_id": format!("p{i}")});
        let (s, v) = chat.api(Method::POST, &path, Some(body)).await;
        assert_eq!(s, 201, "post {i}: {v}");
    }
    for i in 1..=60u64 {
        let body = json!({"body": format!("moderated {i}"), "sender": "supervisor1"});
        let (s, v) = chat.api(Method::PATCH, &format!("{path}/{i}"), Some(body)).await;
        assert_eq!(s, 200, "edit {i}: {v}");
        let (s, v) = chat.api(Method::DELETE, &format!("{path}/{i}"), Some(json!({"sender": "supervisor1"}))).await;
        assert_eq!(s, 200, "delete {i}: {v}");
    }
    let (s, v) = chat.api(Method::GET, &format!("{path}?after=0&limit=100"), None).await;
    assert_eq!(s, 200, "{v}");
    let msgs = v["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 60, "history holds messages only: {v}");
    assert!(msgs.iter().all(|m| m["deleted"] == true), "{v}");
}
