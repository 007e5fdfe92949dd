//! The session over an in-memory pipe, under tokio's paused clock: the
//! timers (hello timeout, idle close, write deadline, token expiry) run in
//! virtual time, so these take milliseconds. Also strikes (4008) and the
//! typing throttle across a user's connections.
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::DuplexStream;
use tungstenite::protocol::Role;

use super::*;
use crate::{
    config::Config,
    engine::memory::MemoryEngine,
    hub::{Event, EventKind, Hub, Topic},
};

type Client = WebSocketStream<DuplexStream>;

fn node(f: impl FnOnce(&mut Config)) -> Arc<Node> {
    let mut cfg = Config::default();
    cfg.server.heartbeat_s = 5;
    cfg.limits.write_timeout_s = 3;
    f(&mut cfg);
    let hub = Hub::new();
    let engine = Arc::new(MemoryEngine::new(hub.clone(), 100));
    Node::new(Arc::new(cfg), engine, hub)
}

/// A session on one end of a pipe of `buffer` bytes, a client on the other.
async fn start(node: &Arc<Node>, buffer: usize, pre_auth: Option<Verified>) -> (Client, tokio::task::JoinHandle<()>) {
    let (server_io, client_io) = tokio::io::duplex(buffer);
    let server = WebSocketStream::from_raw_socket(server_io, Role::Server, None).await;
    let client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
    let task = tokio::spawn(run(node.clone(), WsWire::new(server), pre_auth.map(|v| (v, None))));
    (client, task)
}

fn verified(node: &Node, user: &str, ttl_s: u64) -> Verified {
    node.auth.verify_token(&node.auth.sign(user, None, Some(ttl_s))).unwrap()
}

/// Reads text frames until the close frame; returns them and its code.
async fn until_close(c: &mut Client) -> (Vec<Value>, Option<u16>) {
    let mut frames = Vec::new();
    while let Some(Ok(m)) = c.next().await {
        match m {
            Message::Text(t) => frames.push(serde_json::from_str(&t).unwrap()),
            Message::Close(f) => return (frames, f.map(|f| u16::from(f.code))),
            _ => {}
        }
    }
    (frames, None)
}

#[tokio::test(start_paused = true)]
async fn silence_before_hello_closes_4001_after_the_hello_timeout() {
    let node = node(|c| c.auth.hello_timeout_s = 10);
    let (mut c, task) = start(&node, 1 << 16, None).await;
    let t0 = Instant::now();
    let (_, code) = until_close(&mut c).await;
    assert_eq!(code, Some(4001));
    assert!(t0.elapsed() >= Duration::from_secs(10) && t0.elapsed() < Duration::from_secs(11));
    drop(c);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn junk_before_hello_is_unauthorized_4001() {
    let node = node(|_| {});
    for junk in [Message::Text("not json".into()), Message::Binary(vec![0xff].into())] {
        let (mut c, task) = start(&node, 1 << 16, None).await;
        c.send(junk).await.unwrap();
        let (frames, code) = until_close(&mut c).await;
        assert_eq!(frames[0]["code"], "unauthorized");
        assert_eq!(code, Some(4001));
        drop(c);
        task.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_closed_1001_after_two_heartbeats() {
    let node = node(|_| {});
    let (mut c, task) = start(&node, 1 << 16, Some(verified(&node, "alice", 3600))).await;
    // Reading answers pings; so read nothing until the server gave up.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let (frames, code) = until_close(&mut c).await;
    assert_eq!(frames[0]["type"], "welcome");
    assert_eq!(code, Some(1001));
    drop(c);
    task.await.unwrap();
    assert_eq!(node.hub.user_connections("alice"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_never_pins_its_session() {
    let node = node(|c| c.limits.outbound_queue = 1 << 16);
    // A small pipe: the server's writes block once 4 KiB are unread.
    let (mut c, task) = start(&node, 4096, Some(verified(&node, "alice", 3600))).await;
    assert!(c.next().await.unwrap().unwrap().to_text().unwrap().contains("welcome"));
    let t0 = Instant::now();
    let big = Text::from(json!({"type":"message","body":"x".repeat(2000)}).to_string());
    for _ in 0..50 {
        node.hub.dispatch(&Topic::User("alice".into()), &Event::new(EventKind::Message, big.clone()));
    }
    // The session ends by itself: the write deadline (3 s) and a bounded
    // close; the client is still connected and reads nothing.
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("session ended").unwrap();
    assert!(t0.elapsed() < Duration::from_secs(7), "{:?}", t0.elapsed());
    assert_eq!(node.hub.user_connections("alice"), 0);
    drop(c);
}

#[tokio::test(start_paused = true)]
async fn an_expired_token_closes_4001_unless_refreshed() {
    let node = node(|c| c.server.heartbeat_s = 60);
    let (mut c, task) = start(&node, 1 << 16, Some(verified(&node, "alice", 5))).await;
    let welcome = c.next().await.unwrap().unwrap();
    let exp = serde_json::from_str::<Value>(welcome.to_text().unwrap()).unwrap()["exp"].as_u64().unwrap();
    assert!(exp > 0);
    // A refresh naming another user is refused and closes.
    let other = node.auth.sign("bob", None, Some(600));
    let (mut c2, task2) = start(&node, 1 << 16, Some(verified(&node, "alice", 600))).await;
    c2.next().await.unwrap().unwrap();
    c2.send(Message::Text(json!({"type":"refresh","id":1,"token":other}).to_string().into())).await.unwrap();
    let (frames, code) = until_close(&mut c2).await;
    assert_eq!((frames[0]["code"].as_str(), code), (Some("unauthorized"), Some(4001)));
    drop(c2);
    task2.await.unwrap();
    // The 5 s token expires: 4001 (the clock of `exp` is real, so allow slack).
    let (frames, code) = until_close(&mut c).await;
    assert_eq!(frames.last().unwrap()["code"], "unauthorized");
    assert_eq!(code, Some(4001));
    drop(c);
    task.await.unwrap();
}

/// What every idle connection holds is the session's future: its phases
/// that do not last (authentication, set-up, closing, handling one frame)
/// are boxed so they do not count toward it. Guards the idle-memory figure.
#[test]
fn the_session_future_stays_small() {
    let node = {
        let cfg = crate::config::Config::default();
        let hub = crate::hub::Hub::new();
        let engine = std::sync::Arc::new(crate::engine::memory::MemoryEngine::new(hub.clone(), 100));
        crate::node::Node::new(std::sync::Arc::new(cfg), engine, hub)
    };
    let (io, _peer) = tokio::io::duplex(64);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let ws =
        rt.block_on(tokio_tungstenite::WebSocketStream::from_raw_socket(io, tungstenite::protocol::Role::Server, None));
    let fut = super::run(node, super::WsWire::new(ws), None);
    let size = std::mem::size_of_val(&fut);
    assert!(size <= 2560, "the session future is {size} bytes");
}

#[tokio::test(start_paused = true)]
async fn bad_frames_past_the_limit_close_4008_after_their_errors() {
    let node = node(|c| c.limits.max_bad_frames = 3);
    let (mut c, task) = start(&node, 1 << 16, Some(verified(&node, "alice", 600))).await;
    for _ in 0..4 {
        c.send(Message::Text("not json".into())).await.unwrap();
    }
    let (frames, code) = until_close(&mut c).await;
    assert_eq!(frames[0]["type"], "welcome");
    let errors: Vec<&Value> = frames.iter().filter(|f| f["type"] == "error").collect();
    assert_eq!(errors.len(), 4, "every bad frame is answered, the last one too: {frames:?}");
    assert!(errors.iter().all(|e| e["code"] == "bad_request"));
    assert_eq!(code, Some(4008));
    drop(c);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn typing_goes_out_once_per_user_and_conversation_whatever_the_connections() {
    let node = node(|_| {});
    let (mut bob, bob_task) = start(&node, 1 << 16, Some(verified(&node, "bob", 600))).await;
    let (mut a1, a1_task) = start(&node, 1 << 16, Some(verified(&node, "alice", 600))).await;
    let (mut a2, a2_task) = start(&node, 1 << 16, Some(verified(&node, "alice", 600))).await;
    for c in [&mut bob, &mut a1, &mut a2] {
        let Some(Ok(Message::Text(t))) = c.next().await else { panic!("no welcome") };
        assert!(t.contains("\"welcome\""));
    }
    for _ in 0..5 {
        for c in [&mut a1, &mut a2] {
            c.send(Message::Text(json!({"type": "typing", "conversation": "general"}).to_string().into()))
                .await
                .unwrap();
        }
    }
    // A ping as a barrier: bob's session has handled everything sent before
    // its pong (the typing fan-out is queued synchronously by the node).
    a2.send(Message::Text(json!({"type": "ping", "id": 1}).to_string().into())).await.unwrap();
    loop {
        let Some(Ok(Message::Text(t))) = a2.next().await else { panic!("a2 closed") };
        if t.contains("\"pong\"") {
            break;
        }
    }
    let mut typing = 0;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(200), bob.next()).await {
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "typing" {
                assert_eq!(v["user"]["id"], "alice");
                typing += 1;
            }
        }
    }
    assert_eq!(typing, 1, "ten typing frames from two connections within a second");
    for (c, t) in [(bob, bob_task), (a1, a1_task), (a2, a2_task)] {
        drop(c);
        t.await.unwrap();
    }
}
