//! Fuzz-style: random and malformed frames from proptest strategies. The server
//! may only answer with well-formed frames of documented types, errors with
//! documented codes, keep the connection open (bad-frame limit raised here)
//! and still answer `ping` afterwards. Deterministic seed; set
//! `FUZZ_CASES` for a longer run.

mod common;

use std::time::Duration;

use common::Server;
use futures_util::{SinkExt, StreamExt};
use proptest::{
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};
use serde_json::{Map, Value, json};
use tokio_tungstenite::tungstenite::Message;

const SERVER_TYPES: &[&str] =
    &["welcome", "ack", "message", "receipt", "typing", "history", "presence", "pong", "error", "conversation"];
const CODES: &[&str] =
    &["bad_request", "unauthorized", "forbidden", "not_found", "too_large", "rate_limited", "unavailable", "internal"];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-3i64..60).prop_map(|i| json!(i)),
        any::<i64>().prop_map(|i| json!(i)),
        any::<u64>().prop_map(|i| json!(i)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        prop::sample::select(vec!["general", "dm:alice:bob", "dm:bob:alice", "dm:alice:alice", "deal-1", ""])
            .prop_map(|s| json!(s)),
        "[a-z0-9:@._ -]{0,20}".prop_map(Value::String),
        "\\PC{0,40}".prop_map(Value::String),
        " {0,3}\u{3000}{0,2}\n{0,2}".prop_map(Value::String),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn conversation() -> impl Strategy<Value = Value> {
    prop::sample::select(vec!["general", "general", "dm:alice:bob", "dm:alice:carol", "dm:bob:alice", "deal-x", "x y"])
        .prop_map(|s| json!(s))
}

/// A valid frame of a random type.
fn valid() -> impl Strategy<Value = Map<String, Value>> {
    let obj = |v: Value| v.as_object().unwrap().clone();
    prop_oneof![
        (conversation(), "[a-z0-9]{1,10}", "\\PC{1,30}").prop_map(move |(c, id, body)| {
            obj(json!({"type":"send","conversation":c,"client_msg_id":id,"body":body}))
        }),
        (prop::sample::select(vec!["delivered", "read"]), conversation(), -1i64..8)
            .prop_map(move |(t, c, seq)| obj(json!({"type":t,"conversation":c,"seq":seq}))),
        (prop::sample::select(vec!["typing", "presence"]), conversation())
            .prop_map(move |(t, c)| obj(json!({"type":t,"conversation":c}))),
        (conversation(), prop::option::of(0u64..12), -5i64..300)
            .prop_map(move |(c, b, l)| obj(json!({"type":"history","conversation":c,"before":b,"limit":l}))),
        (conversation(), prop::option::of(0u64..12), -5i64..300)
            .prop_map(move |(c, a, l)| obj(json!({"type":"sync","conversation":c,"after":a,"limit":l}))),
        Just(obj(json!({"type":"ping"}))),
        Just(obj(json!({"type":"hello","token":"x"}))),
    ]
}

/// A frame: mostly a valid frame with 0-2 fields replaced by random values
/// (or dropped), an `id` of any shape; sometimes broken JSON or arbitrary text.
fn frame() -> impl Strategy<Value = String> {
    let field = prop::sample::select(vec![
        "type",
        "id",
        "token",
        "conversation",
        "client_msg_id",
        "body",
        "seq",
        "before",
        "after",
        "limit",
        "extra",
    ]);
    let mutations = prop::collection::vec((field, prop::option::weighted(0.8, value())), 0..3);
    let object = (valid(), prop::option::of(scalar()), mutations).prop_map(|(mut m, id, mutations)| {
        if let Some(id) = id {
            m.insert("id".into(), id);
        }
        for (k, v) in mutations {
            match v {
                Some(v) => m.insert(k.to_string(), v),
                None => m.remove(k),
            };
        }
        Value::Object(m).to_string()
    });
    prop_oneof![
        8 => object,
        1 => (any::<prop::sample::Index>(), value()).prop_map(|(cut, v)| {
            let s = json!({"type":"send","conversation":"general","client_msg_id":"x","body":v}).to_string();
            let at = cut.index(s.len());
            s.char_indices().map(|(i, _)| i).take_while(|i| *i <= at).last().map_or(s.clone(), |i| s[..i].to_string())
        }),
        1 => "\\PC{0,60}",
        1 => value().prop_map(|v| v.to_string()),
    ]
}

fn check_reply(sent: &str, reply: &Value) {
    let ty = reply["type"].as_str().unwrap_or_else(|| panic!("reply without type to {sent}: {reply}"));
    assert!(SERVER_TYPES.contains(&ty), "unknown reply type to {sent}: {reply}");
    if ty == "error" {
        let code = reply["code"].as_str().unwrap_or_default();
        assert!(CODES.contains(&code), "undocumented code to {sent}: {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()), "{reply}");
        if code == "internal" {
            panic!("internal error answering {sent}: {reply}");
        }
    }
    if let Some(id) = reply.get("id") {
        assert!(id.is_string() || id.is_i64() || id.is_u64(), "{reply}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_malformed_frames_get_only_documented_answers() {
    let server = Server::start(&[
        ("CHAT_LIMITS__MAX_BAD_FRAMES", "1000000"),
        ("CHAT_LIMITS__SEND_PER_S", "100000"),
        ("CHAT_LIMITS__SEND_BURST", "100000"),
        ("CHAT_LIMITS__SEND_BYTES_PER_S", "1073741824"),
        ("CHAT_LIMITS__SEND_BYTES_BURST", "1073741824"),
        // One connection per case, as the same user: far past the per-user
        // connect rate, which is not what this test is about.
        ("CHAT_LIMITS__CONNECTS_PER_S", "100000"),
        ("CHAT_LIMITS__CONNECTS_BURST", "100000"),
        ("CHAT_LIMITS__MAX_FRAME_BYTES", "65536"),
    ])
    .await;
    let token = server.token("alice").await;
    let cases: u32 = std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(150);
    let mut runner = TestRunner::new_with_rng(
        Config { cases, ..Config::default() },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let strategy = prop::collection::vec(frame(), 1..16);
    let mut total = 0usize;
    let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
    for case in 0..cases {
        let frames = strategy.new_tree(&mut runner).expect("generate").current();
        // Authenticated with the token at upgrade, so every frame is judged
        // by the authenticated rules; every 10th case says hello itself.
        let hello_first = case % 10 == 0;
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(server.ws_url()).unwrap();
        if !hello_first {
            req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("connect");
        if hello_first {
            ws.send(Message::Text(json!({"type":"hello","token":token}).to_string().into())).await.unwrap();
        }
        for f in &frames {
            ws.send(Message::Text(f.as_str().into())).await.unwrap();
            total += 1;
        }
        if case % 7 == 0 {
            ws.send(Message::Binary(vec![0xde, 0xad].into())).await.unwrap();
        }
        ws.send(Message::Text(json!({"type":"ping","id":"fuzz-end"}).to_string().into())).await.unwrap();
        // Everything up to our final pong must be well-formed.
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .unwrap_or_else(|_| panic!("no pong; frames were {frames:?}"))
                .unwrap_or_else(|| panic!("closed; frames were {frames:?}"))
                .unwrap_or_else(|e| panic!("error {e}; frames were {frames:?}"));
            match m {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or_else(|_| panic!("not JSON: {t}"));
                    check_reply(&format!("{frames:?}"), &v);
                    let key = match v["type"].as_str() {
                        Some("error") => format!("error:{}", v["code"].as_str().unwrap_or("")),
                        Some(t) => t.to_string(),
                        None => unreachable!(),
                    };
                    *seen.entry(key).or_default() += 1;
                    if v["type"] == "pong" && v["id"] == "fuzz-end" {
                        break;
                    }
                }
                Message::Close(c) => panic!("closed {c:?} after {frames:?}"),
                Message::Binary(_) => panic!("binary frame from the server"),
                _ => {}
            }
        }
        let _ = ws.close(None).await;
    }
    eprintln!("{total} frames sent; replies: {seen:?}");
    // The generator reaches both the error paths and the real handlers.
    for kind in ["error:bad_request", "error:forbidden", "ack", "history", "pong"] {
        assert!(seen.get(kind).copied().unwrap_or(0) > 0, "no {kind} in {seen:?}");
    }
    // The server is still healthy.
    let mut c = server.client("bob").await;
    c.barrier().await;
    assert!(!server.logs().contains("panicked"), "{}", server.logs());
}
