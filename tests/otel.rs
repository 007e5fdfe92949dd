//! OpenTelemetry end to end: two crm-chat nodes on one real Valkey export
//! OTLP/HTTP to a receiver run by this test, which decodes the protobuf. A
//! message sent on node 0 and delivered on node 1 must be one trace:
//! `frame` (send) -> `store` on node 0 -> `fanout` on node 1, with the parent
//! links intact across the pub/sub hop, resource attributes naming each node,
//! and metrics exported over OTLP as well. The message's webhook delivery is a
//! span of its own, linked to the message's trace.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, extract::State, routing::post};
use common::{start_nodes, unique, valkey::Valkey};
use opentelemetry_proto::tonic::{
    collector::{metrics::v1::ExportMetricsServiceRequest, trace::v1::ExportTraceServiceRequest},
    common::v1::{AnyValue, KeyValue, any_value},
};
use prost::Message;
use serde_json::json;

#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    node: String,
    service: String,
    attrs: Vec<(String, String)>,
    /// Trace ids of the span's links.
    links: Vec<Vec<u8>>,
}

#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    metric_names: Vec<String>,
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> String {
    attrs.iter().find(|kv| kv.key == key).map(|kv| text(&kv.value)).unwrap_or_default()
}

async fn traces(State(r): State<Arc<Mutex<Received>>>, body: Bytes) -> &'static str {
    let req = ExportTraceServiceRequest::decode(body).expect("OTLP trace protobuf");
    let mut r = r.lock().unwrap();
    for rs in req.resource_spans {
        let res = rs.resource.map(|r| r.attributes).unwrap_or_default();
        let (node, service) = (attr(&res, "service.instance.id"), attr(&res, "service.name"));
        for ss in rs.scope_spans {
            for s in ss.spans {
                r.spans.push(Span {
                    name: s.name,
                    trace_id: s.trace_id,
                    span_id: s.span_id,
                    parent: s.parent_span_id,
                    node: node.clone(),
                    service: service.clone(),
                    attrs: s.attributes.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect(),
                    links: s.links.iter().map(|l| l.trace_id.clone()).collect(),
                });
            }
        }
    }
    ""
}

async fn metrics(State(r): State<Arc<Mutex<Received>>>, body: Bytes) -> &'static str {
    let req = ExportMetricsServiceRequest::decode(body).expect("OTLP metrics protobuf");
    let mut r = r.lock().unwrap();
    for rm in req.resource_metrics {
        for sm in rm.scope_metrics {
            r.metric_names.extend(sm.metrics.into_iter().map(|m| m.name));
        }
    }
    ""
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_is_one_trace_across_two_nodes() {
    let received = Arc::new(Mutex::new(Received::default()));
    let app = Router::new()
        .route("/v1/traces", post(traces))
        .route("/v1/metrics", post(metrics))
        .route("/hook", post(|| async { axum::http::StatusCode::NO_CONTENT }))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let hook = format!("{endpoint}/hook");
    tokio::spawn(async move { axum::serve(listener, app).await });

    let v = Valkey::start().await;
    let env = [
        ("CHAT_OTEL__ENDPOINT", endpoint.as_str()),
        ("CHAT_OTEL__SERVICE_NAME", "crm-chat-test"),
        // Export quickly (standard OpenTelemetry SDK variables).
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
        ("CHAT_WEBHOOKS__URL", hook.as_str()),
        ("CHAT_WEBHOOKS__SECRET", "otel-test-webhook-secret-0123456789abcdef"),
    ];
    let nodes = start_nodes(2, &v.url(), false, &env).await;
    let conv = unique("deal");
    nodes[0].put_group(&conv, &["alice", "bob"]).await;
    let mut alice = nodes[0].client("alice").await;
    let mut bob = nodes[1].client("bob").await;
    let ack = alice.request(json!({"type":"send","conversation":conv,"client_msg_id":"traced","body":"hi"})).await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(bob.expect_type("message").await["body"], "hi");

    // Wait for the batch exporters: the send frame's trace must reach node 1.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (frame, store, fanout) = loop {
        {
            let r = received.lock().unwrap();
            let frame = r.spans.iter().find(|s| {
                s.name == "frame" && s.attrs.iter().any(|(k, v)| k == "frame_type" && v == "send") && s.node == "node0"
            });
            if let Some(frame) = frame {
                let store = r.spans.iter().find(|s| s.name == "store" && s.parent == frame.span_id);
                let fanout = store.and_then(|st| {
                    r.spans.iter().find(|s| s.name == "fanout" && s.node == "node1" && s.parent == st.span_id)
                });
                if let (Some(store), Some(fanout)) = (store, fanout) {
                    break (frame.clone(), store.clone(), fanout.clone());
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no frame -> store -> fanout chain; spans: {:#?}",
            received.lock().unwrap().spans
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(store.trace_id, frame.trace_id);
    assert_eq!(fanout.trace_id, frame.trace_id, "the fan-out on node 1 joins node 0's trace");
    assert_eq!(store.node, "node0");
    assert!(store.attrs.iter().any(|(k, v)| k == "seq" && v == "1"), "{store:?}");
    assert!(fanout.attrs.iter().any(|(k, v)| k == "recipients" && v == "1"), "{fanout:?}");
    assert_eq!(frame.service, "crm-chat-test");
    // The message's webhook: a delivery span linked to the message's trace.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let linked = received
            .lock()
            .unwrap()
            .spans
            .iter()
            .any(|s| s.name == "webhook.deliver" && s.links.contains(&frame.trace_id));
        if linked {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no webhook.deliver span linked to the message's trace; spans: {:#?}",
            received.lock().unwrap().spans.iter().filter(|s| s.name == "webhook.deliver").collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Connections have spans of their own.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !received.lock().unwrap().metric_names.iter().any(|n| n == "chat_messages_stored_total") {
        assert!(Instant::now() < deadline, "no OTLP metrics: {:?}", received.lock().unwrap().metric_names);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    alice.close().await;
    bob.close().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !received.lock().unwrap().spans.iter().any(|s| s.name == "session") {
        assert!(Instant::now() < deadline, "no session span");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
