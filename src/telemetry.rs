//! Logs, traces and OTLP metrics.
//!
//! - Logs: `tracing` with human-readable output in `local` and JSON in
//!   `production`, both on stderr (stdout carries only the one machine-readable
//!   `listening on` line). Structured fields only (user, conversation, seq,
//!   conn); never a message body or a token.
//! - Traces (when `otel.endpoint` is set): OTLP over HTTP/protobuf
//!   (`<endpoint>/v1/traces`): a span per connection (`session`), one per
//!   frame handled (`frame`, its own trace, linked to the session), `store`
//!   and `fanout`. The fan-out on another node joins the sender's trace: the
//!   W3C `traceparent` travels inside the pub/sub payload ([`traceparent`],
//!   [`join_remote`]). Resource: `service.name`, `service.version`,
//!   `service.instance.id` (the node id). Sampling: `otel.sample_ratio`,
//!   parent-based.
//! - Metrics: the Prometheus endpoint always; with `otel.endpoint`, the same
//!   metrics are also pushed over OTLP (`<endpoint>/v1/metrics`).
//!
//! Without `otel.endpoint` nothing is exported and the trace spans (at debug
//! level) are disabled callsites: no cost on the hot path.

use std::{collections::HashMap, sync::OnceLock};

use opentelemetry::{KeyValue, propagation::TextMapPropagator, trace::TracerProvider as _};
use opentelemetry_sdk::{
    Resource,
    metrics::SdkMeterProvider,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{FilterExt, LevelFilter, Targets},
    fmt,
    prelude::*,
};

use crate::config::{Config, LogFormat, Profile};

static METER: OnceLock<SdkMeterProvider> = OnceLock::new();

/// What must be flushed before the process exits.
#[derive(Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporters (call outside the async runtime).
    pub fn shutdown(self) {
        if let Some(t) = self.tracer
            && let Err(e) = t.shutdown()
        {
            eprintln!("crm-chat: trace export shutdown: {e}");
        }
        if let Some(m) = METER.get()
            && let Err(e) = m.shutdown()
        {
            eprintln!("crm-chat: metrics export shutdown: {e}");
        }
    }
}

/// The OTLP meter provider, when `otel.endpoint` is set.
pub fn meter_provider() -> Option<&'static SdkMeterProvider> {
    METER.get()
}

/// Installs the subscriber (and the OTLP exporters). Call before the async
/// runtime starts: the exporters run on their own threads.
pub fn init(cfg: &Config) -> Telemetry {
    let spec = cfg.log.level.clone().or_else(|| std::env::var("RUST_LOG").ok()).unwrap_or_else(|| "info".into());
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    let production = cfg.profile == Profile::Production;
    // Debug logging is off in production, whatever the filter says.
    let cap = if production { LevelFilter::INFO } else { LevelFilter::TRACE };
    let format = cfg.log.format.unwrap_or(if production { LogFormat::Json } else { LogFormat::Text });
    let logs = match format {
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
    }
    .with_filter(filter.and(cap));

    let mut telemetry = Telemetry::default();
    let traces = match &cfg.otel.endpoint {
        None => None,
        Some(endpoint) => match otlp(cfg, endpoint) {
            Ok((tracer, meter)) => {
                let layer = tracing_opentelemetry::layer()
                    .with_tracer(tracer.tracer("crm-chat"))
                    .with_filter(Targets::new().with_target("crm_chat", tracing::Level::DEBUG));
                telemetry.tracer = Some(tracer);
                let _ = METER.set(meter);
                Some(layer)
            }
            Err(e) => {
                eprintln!("crm-chat: OpenTelemetry export disabled: {e}");
                None
            }
        },
    };
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry().with(logs).with(traces).try_init();
    if let Some(endpoint) = &cfg.otel.endpoint {
        tracing::info!(endpoint, sample_ratio = cfg.otel.sample_ratio, "OpenTelemetry export on (OTLP/HTTP)");
    }
    telemetry
}

fn otlp(cfg: &Config, endpoint: &str) -> anyhow::Result<(SdkTracerProvider, SdkMeterProvider)> {
    // `https://` endpoints: rustls needs one process-wide crypto provider
    // (ring, the one fred's TLS uses too). Installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig};
    let base = endpoint.trim_end_matches('/');
    let resource = Resource::builder()
        .with_service_name(cfg.otel.service_name.clone())
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", cfg.node_id()),
        ])
        .build();
    let spans = SpanExporter::builder().with_http().with_endpoint(format!("{base}/v1/traces")).build()?;
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.otel.sample_ratio)));
    let tracer = SdkTracerProvider::builder()
        .with_batch_exporter(spans)
        .with_sampler(sampler)
        .with_resource(resource.clone())
        .build();
    let metrics = MetricExporter::builder().with_http().with_endpoint(format!("{base}/v1/metrics")).build()?;
    let meter = SdkMeterProvider::builder().with_periodic_exporter(metrics).with_resource(resource).build();
    Ok((tracer, meter))
}

/// The W3C `traceparent` of the current span, when OTLP export is on and the
/// span is being traced.
pub fn traceparent() -> Option<String> {
    // Nothing to propagate without an exporter (and nothing to pay for).
    METER.get()?;
    let cx = tracing::Span::current().context();
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the remote span named by a `traceparent`.
pub fn join_remote(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}

/// Links `span` to the span named by a `traceparent` (a cause in another
/// trace: the message whose webhook `span` delivers).
pub fn link_remote(span: &tracing::Span, traceparent: &str) {
    use opentelemetry::trace::TraceContextExt as _;
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// The W3C `traceparent` of `span`, when it is traced.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    METER.get()?;
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}
