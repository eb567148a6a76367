//! Traces: `tracing` spans exported over OTLP/gRPC when an endpoint is configured, nothing when not, and the W3C
//! `traceparent` form in which a span's context crosses a process boundary.
//!
//! Sampling is per trace: a root span (a router's request) is kept with probability `sample_ratio`, and every span
//! under it (engine steps, dispatches, the expert nodes' compute, joined through `traceparent`) follows that
//! decision. Work for an unsampled request creates no dispatch or node span at all: [`traceparent`] is `None` for
//! it, and that is what the data plane checks.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The tracing flags every server takes.
#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct TraceArgs {
    /// Export traces over OTLP/gRPC to this collector (`http://HOST:4317`) [default: the standard
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT; neither set: no traces].
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Share of requests traced (0 to 1); every span under a traced request is kept, on every process.
    #[arg(long, default_value_t = 0.1)]
    pub trace_sample_ratio: f64,
}

impl Default for TraceArgs {
    fn default() -> Self {
        TraceArgs { otlp_endpoint: None, trace_sample_ratio: 0.1 }
    }
}

impl TraceArgs {
    /// The options of a process of `service` named `instance`.
    pub fn options(&self, service: &'static str, instance: Option<String>) -> TraceOptions {
        TraceOptions {
            service,
            endpoint: endpoint(self.otlp_endpoint.as_deref()),
            sample_ratio: self.trace_sample_ratio,
            instance,
        }
    }
}

/// Where and how much to trace.
#[derive(Debug, Clone)]
pub struct TraceOptions {
    /// `service.name` of the spans: `router-node`, `expert-node`.
    pub service: &'static str,
    /// The OTLP/gRPC collector (`http://host:4317`); `None`: no export.
    pub endpoint: Option<String>,
    /// Share of requests traced, 0 to 1.
    pub sample_ratio: f64,
    /// `service.instance.id`: the member id.
    pub instance: Option<String>,
}

/// The endpoint to export to: the flag, else the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_ENDPOINT`; empty means none.
pub fn endpoint(flag: Option<&str>) -> Option<String> {
    flag.map(str::to_owned)
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").ok())
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .filter(|e| !e.trim().is_empty())
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("the trace sample ratio must be within 0 and 1, not {0}")]
    Ratio(f64),
    #[error("OTLP exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
    #[error("starting the exporter's runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Logging and, with an endpoint, trace export; flushes what is left when dropped.
#[must_use = "dropping it stops the export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The exporter's connection lives here, apart from the process's own runtimes.
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").field("exporting", &self.provider.is_some()).finish()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("flushing traces: {e}");
            }
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        }
    }
}

/// Logs to stderr as [`crate::init_logging`] does and, with `options.endpoint`, exports the spans of this
/// workspace's crates over OTLP/gRPC (from a one-thread runtime of its own). Call it once, outside async code, and
/// drop the result there too.
pub fn init(default_level: &str, options: &TraceOptions) -> Result<Telemetry, TraceError> {
    if !(0.0..=1.0).contains(&options.sample_ratio) {
        return Err(TraceError::Ratio(options.sample_ratio));
    }
    let fmt = crate::fmt_layer(default_level);
    let Some(endpoint) = options.endpoint.clone() else {
        tracing_subscriber::registry().with(fmt).init();
        return Ok(Telemetry { provider: None, runtime: None });
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(TraceError::Runtime)?;
    let exporter = {
        use opentelemetry_otlp::WithExportConfig;
        let _inside = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| TraceError::Exporter { endpoint: endpoint.clone(), message: e.to_string() })?
    };
    let mut attributes = vec![KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))];
    if let Some(id) = &options.instance {
        attributes.push(KeyValue::new("service.instance.id", id.clone()));
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(options.sample_ratio))))
        .with_resource(Resource::builder().with_service_name(options.service).with_attributes(attributes).build())
        .build();
    let tracer = provider.tracer("moe-mesh");
    // Only this workspace's spans go out, whatever RUST_LOG says for the log lines.
    let ours = tracing_subscriber::filter::Targets::new()
        .with_target("router_node", tracing::Level::INFO)
        .with_target("expert_node", tracing::Level::INFO)
        .with_target("moe_model", tracing::Level::INFO);
    let otel = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(ours);
    tracing_subscriber::registry().with(fmt).with(otel).init();
    tracing::info!(%endpoint, ratio = options.sample_ratio, "exporting traces over OTLP");
    Ok(Telemetry { provider: Some(provider), runtime: Some(runtime) })
}

/// `span`'s context as a W3C `traceparent` (`00-TRACE-SPAN-01`), when it is part of a sampled trace.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| format!("00-{}-{}-01", sc.trace_id(), sc.span_id()))
}

/// Makes the remote span that `traceparent` names the parent of `span`. A malformed value is ignored.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if let Some(sc) = parse_traceparent(traceparent) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
}

/// The span context of a W3C `traceparent` value (version 00).
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok().filter(|t| *t != TraceId::INVALID)?;
    let span_id = SpanId::from_hex(span).ok().filter(|s| *s != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, TraceState::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parses_and_refuses_malformed_values() {
        let sc = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("valid");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-zzf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn without_a_subscriber_nothing_is_sampled() {
        assert_eq!(traceparent(&tracing::info_span!("x")), None);
    }
}
