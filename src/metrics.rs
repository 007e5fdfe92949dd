//! Prometheus metrics. Names are part of the contract (PROTOCOL.md, "Metric
//! names"); handles of hot counters are resolved once and cached, so the fan-out
//! path pays one atomic add per frame type and dispatch, not a registry lookup.

use std::sync::{LazyLock, OnceLock};

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls keep the first).
pub fn install(node_id: &str) -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .add_global_label("node", node_id)
                // From an event to its delivery: retries stretch it to hours.
                .set_buckets_for_metric(
                    Matcher::Full("chat_webhook_delivery_seconds".into()),
                    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0, 21600.0, 86400.0],
                )
                .expect("static buckets are valid")
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
                )
                .expect("static buckets are valid");
            let prometheus = builder.build_recorder();
            let handle = prometheus.handle();
            // With OTLP on, every metric goes to both exporters.
            let installed = match crate::telemetry::meter_provider() {
                Some(provider) => {
                    use opentelemetry::metrics::MeterProvider as _;
                    let otel = metrics_exporter_opentelemetry::Recorder::with_meter(provider.meter("crm-chat"));
                    let fanout = metrics_util::layers::FanoutBuilder::default()
                        .add_recorder(prometheus)
                        .add_recorder(otel)
                        .build();
                    metrics::set_global_recorder(fanout).is_ok()
                }
                None => metrics::set_global_recorder(prometheus).is_ok(),
            };
            if !installed {
                tracing::warn!("a metrics recorder was installed already; /metrics may be empty");
            }
            // Histogram upkeep (what install_recorder would have spawned).
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawn metrics upkeep");
            describe();
            // Register every series now, so dashboards and alerts see zeros
            // instead of missing metrics.
            LazyLock::force(&FRAMES);
            LazyLock::force(&CONNECTIONS);
            for m in [&STORED, &DELIVERIES, &SLOW, &STORAGE_ERRORS] {
                LazyLock::force(m);
            }
            for m in [&FANOUT, &QUEUE_DEPTH] {
                LazyLock::force(m);
            }
            handle
        })
        .clone()
}

/// Renders the Prometheus text (empty before [`install`]).
pub fn render() -> String {
    HANDLE.get().map(PrometheusHandle::render).unwrap_or_default()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("chat_connections", "Open, authenticated sessions on this node, by transport (ws, http)");
    describe_counter!("chat_frames_total", "WebSocket frames by direction and type");
    describe_counter!("chat_messages_stored_total", "Messages stored (not counting idempotent repeats)");
    describe_counter!("chat_deliveries_total", "Frames queued to local connections by fan-out");
    describe_histogram!("chat_fanout_latency_seconds", "From a message's store to its local fan-out");
    describe_counter!("chat_messages_erased_total", "Message bodies erased through the service API");
    describe_counter!("chat_conversations_deleted_total", "Group conversations deleted through the service API");
    describe_counter!("chat_slow_consumer_closes_total", "Connections closed 1013 because their queue was full");
    describe_counter!("chat_storage_errors_total", "Storage operations that failed");
    describe_gauge!("chat_storage_bytes", "Bytes the durable embedded engine's store takes on disk (database and WAL)");
    describe_counter!("chat_closes_total", "Connections closed by the server, by close code");
    describe_counter!("chat_upgrades_rejected_total", "WebSocket upgrades refused, by reason");
    describe_counter!(
        "chat_http_evicted_total",
        "Plain HTTP connections closed to make room for newer ones (limits.max_http_connections)"
    );
    describe_counter!(
        "chat_stream_posts_total",
        "POST /stream/chat/<session> answers, by status (202, 404, 413, 429, 503) and route (local, forwarded)"
    );
    describe_histogram!("chat_outbound_queue_depth", "Outbound queue depth seen by a connection writer");
    describe_histogram!("chat_valkey_command_seconds", "Latency of the Valkey engine's atomic scripts, by script");
    describe_counter!("chat_valkey_errors_total", "Valkey script calls that failed, by script");
    describe_counter!("chat_pubsub_reconnects_total", "Reconnects of this node's pub/sub connection");
    describe_counter!("chat_pubsub_resent_total", "Messages re-sent to local clients after missed pub/sub traffic");
    describe_counter!("chat_webhooks_queued_total", "Webhook events queued for delivery, by type");
    describe_counter!("chat_webhooks_delivered_total", "Webhook events delivered (2xx) by this node");
    describe_counter!("chat_webhooks_retried_total", "Webhook delivery attempts that failed and will be retried");
    describe_counter!(
        "chat_webhooks_dropped_total",
        "Webhook events given up, by reason (expired: older than webhooks.max_age_s; outbox_full: oldest \
         dropped past webhooks.outbox_max; queue_full: the node's hand-off queue was full)"
    );
    describe_histogram!("chat_webhook_delivery_seconds", "From a webhook event to its delivery (2xx)");
}

/// Frame types counted by [`frame_in`] / [`frame_out`].
pub const FRAME_TYPES: [&str; 18] = [
    "hello",
    "welcome",
    "send",
    "ack",
    "message",
    "delivered",
    "read",
    "receipt",
    "typing",
    "history",
    "sync",
    "presence",
    "ping",
    "pong",
    "error",
    "conversation",
    "refresh",
    "refreshed",
];

struct Frames {
    inbound: Vec<Counter>,
    outbound: Vec<Counter>,
    invalid_in: Counter,
}

static FRAMES: LazyLock<Frames> = LazyLock::new(|| Frames {
    inbound: FRAME_TYPES.iter().map(|t| counter!("chat_frames_total", "direction" => "in", "type" => *t)).collect(),
    outbound: FRAME_TYPES.iter().map(|t| counter!("chat_frames_total", "direction" => "out", "type" => *t)).collect(),
    invalid_in: counter!("chat_frames_total", "direction" => "in", "type" => "invalid"),
});

fn index(ty: &str) -> Option<usize> {
    FRAME_TYPES.iter().position(|t| *t == ty)
}

pub fn frame_in(ty: &str) {
    match index(ty) {
        Some(i) => FRAMES.inbound[i].increment(1),
        None => FRAMES.invalid_in.increment(1),
    }
}

pub fn frames_out(ty: &str, n: u64) {
    if let Some(i) = index(ty) {
        FRAMES.outbound[i].increment(n);
    }
}

/// Open sessions by transport: `[ws, http]`.
static CONNECTIONS: LazyLock<[Gauge; 2]> = LazyLock::new(|| {
    [gauge!("chat_connections", "transport" => "ws"), gauge!("chat_connections", "transport" => "http")]
});

fn transport_index(transport: &str) -> usize {
    usize::from(transport == "http")
}
static STORED: LazyLock<Counter> = LazyLock::new(|| counter!("chat_messages_stored_total"));
static DELIVERIES: LazyLock<Counter> = LazyLock::new(|| counter!("chat_deliveries_total"));
static FANOUT: LazyLock<Histogram> = LazyLock::new(|| histogram!("chat_fanout_latency_seconds"));
static SLOW: LazyLock<Counter> = LazyLock::new(|| counter!("chat_slow_consumer_closes_total"));
static STORAGE_ERRORS: LazyLock<Counter> = LazyLock::new(|| counter!("chat_storage_errors_total"));
static QUEUE_DEPTH: LazyLock<Histogram> = LazyLock::new(|| histogram!("chat_outbound_queue_depth"));

pub fn connection_opened(transport: &'static str) {
    CONNECTIONS[transport_index(transport)].increment(1.0);
}
pub fn connection_closed(transport: &'static str) {
    CONNECTIONS[transport_index(transport)].decrement(1.0);
}
pub fn message_stored() {
    STORED.increment(1);
}
pub fn messages_erased(n: u64) {
    counter!("chat_messages_erased_total").increment(n);
}
pub fn conversation_deleted() {
    counter!("chat_conversations_deleted_total").increment(1);
}
pub fn deliveries(n: u64) {
    DELIVERIES.increment(n);
}
pub fn fanout_latency(seconds: f64) {
    FANOUT.record(seconds);
}
pub fn slow_consumer_close() {
    SLOW.increment(1);
}
pub fn storage_bytes(bytes: u64) {
    gauge!("chat_storage_bytes").set(bytes as f64);
}

pub fn storage_error() {
    STORAGE_ERRORS.increment(1);
}
pub fn queue_depth(depth: usize) {
    QUEUE_DEPTH.record(depth as f64);
}
pub fn close(transport: &'static str, code: u16) {
    counter!("chat_closes_total", "code" => code.to_string(), "transport" => transport).increment(1);
}
pub fn stream_post(status: u16, route: &'static str) {
    counter!("chat_stream_posts_total", "status" => status.to_string(), "route" => route).increment(1);
}
pub fn http_evicted() {
    counter!("chat_http_evicted_total").increment(1);
}
pub fn upgrade_rejected(reason: &'static str) {
    counter!("chat_upgrades_rejected_total", "reason" => reason).increment(1);
}

pub fn valkey_command(script: &'static str, seconds: f64, ok: bool) {
    histogram!("chat_valkey_command_seconds", "script" => script).record(seconds);
    if !ok {
        counter!("chat_valkey_errors_total", "script" => script).increment(1);
    }
}
pub fn pubsub_reconnect() {
    counter!("chat_pubsub_reconnects_total").increment(1);
}
pub fn pubsub_resent(n: u64) {
    counter!("chat_pubsub_resent_total").increment(n);
}

pub fn webhook_queued(ty: &'static str) {
    counter!("chat_webhooks_queued_total", "type" => ty).increment(1);
}
pub fn webhook_delivered(latency_s: f64) {
    counter!("chat_webhooks_delivered_total").increment(1);
    histogram!("chat_webhook_delivery_seconds").record(latency_s);
}
pub fn webhook_retried() {
    counter!("chat_webhooks_retried_total").increment(1);
}
pub fn webhook_dropped(reason: &'static str, n: u64) {
    counter!("chat_webhooks_dropped_total", "reason" => reason).increment(n);
}
