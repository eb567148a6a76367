//! The expert node's `/metrics`, served on its own plain-HTTP address (`--metrics-listen`) beside the gRPC port:
//! the compute queue (depth, wait), compute time per batch, tokens and (token, expert) pairs served, resident
//! experts and bytes, and refusals by reason.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use moe_proto::v1::ErrorCode;
use moe_telemetry::metrics::{histogram, Scrape, ScrapeWith, DISPATCH_BUCKETS};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::node::ExpertNode;
use crate::NodeError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// The node's series; see the module documentation.
#[derive(Debug, Clone)]
pub struct NodeMetrics {
    queue_depth: Gauge,
    queue_wait: Histogram,
    compute: Histogram,
    batches: Counter,
    tokens: Counter,
    pairs: Counter,
    cancelled: Counter,
    refusals: Family<Reason, Counter>,
}

/// Every reason a refusal is counted under; all are exported from the start, at 0.
const REASONS: &[&str] =
    &["invalid_argument", "failed_precondition", "resource_exhausted", "deadline_exceeded", "internal", "other"];

impl Default for NodeMetrics {
    fn default() -> Self {
        let refusals = Family::default();
        for &reason in REASONS {
            let _ = refusals.get_or_create(&Reason { reason });
        }
        NodeMetrics {
            queue_depth: Gauge::default(),
            queue_wait: histogram(DISPATCH_BUCKETS),
            compute: histogram(DISPATCH_BUCKETS),
            batches: Counter::default(),
            tokens: Counter::default(),
            pairs: Counter::default(),
            cancelled: Counter::default(),
            refusals,
        }
    }
}

impl NodeMetrics {
    pub(crate) fn queued(&self) {
        self.queue_depth.inc();
    }

    pub(crate) fn dequeued(&self, waited: Duration) {
        self.queue_depth.dec();
        self.queue_wait.observe(waited.as_secs_f64());
    }

    /// One batch computed: its compute time, tokens and (token, expert) pairs.
    pub(crate) fn computed(&self, took: Duration, tokens: u64, pairs: u64) {
        self.compute.observe(took.as_secs_f64());
        self.batches.inc();
        self.tokens.inc_by(tokens);
        self.pairs.inc_by(pairs);
    }

    /// A queued request dropped because its router cancelled it.
    pub(crate) fn cancelled(&self) {
        self.cancelled.inc();
    }

    pub(crate) fn refused(&self, code: ErrorCode) {
        let reason = match code {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::FailedPrecondition => "failed_precondition",
            ErrorCode::ResourceExhausted => "resource_exhausted",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::Internal => "internal",
            _ => "other",
        };
        self.refusals.get_or_create(&Reason { reason }).inc();
    }

    fn register(&self, r: &mut Registry) {
        r.register("moe_node_queue_depth", "Requests waiting for the compute thread", self.queue_depth.clone());
        r.register(
            "moe_node_queue_wait_seconds",
            "From a request's arrival to the start of its compute",
            self.queue_wait.clone(),
        );
        r.register(
            "moe_node_compute_seconds",
            "Compute of one request (one layer's batch from one router): decode, experts, encode",
            self.compute.clone(),
        );
        r.register("moe_node_batches", "Requests computed", self.batches.clone());
        r.register("moe_node_tokens", "Tokens computed", self.tokens.clone());
        r.register("moe_node_expert_pairs", "(token, expert) pairs computed", self.pairs.clone());
        r.register(
            "moe_node_cancelled",
            "Queued requests dropped before compute because their router cancelled them",
            self.cancelled.clone(),
        );
        r.register("moe_node_refusals", "Requests refused or failed, by reason", self.refusals.clone());
    }
}

/// Everything `/metrics` shows, in Prometheus text format; every series carries the node's id.
pub fn exposition(node: &Arc<ExpertNode>) -> String {
    let mut registry = Registry::with_labels(std::iter::once(("node".into(), node.node_id.clone().into())));
    node.metrics.register(&mut registry);
    let node = Arc::clone(node);
    registry.register_collector(Box::new(ScrapeWith(move |s: &mut Scrape<'_>| {
        let experts: usize = node.hosted().layers.iter().map(|row| row.experts.len()).sum();
        s.gauge("moe_node_resident_experts", "(layer, expert) pairs hosted", experts as i64)?;
        s.gauge("moe_node_resident_bytes", "Bytes of expert weights resident", node.resident_bytes() as i64)?;
        s.gauge("moe_node_placement_epoch", "The newest placement epoch served", node.epoch() as i64)
    })));
    moe_telemetry::metrics::encode(&registry)
}

/// Binds the metrics address (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), NodeError> {
    let listener = TcpListener::bind(addr).await.map_err(|e| NodeError::Bind(addr, e))?;
    let local = listener.local_addr().map_err(|e| NodeError::Bind(addr, e))?;
    Ok((listener, local))
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(node: Arc<ExpertNode>, listener: TcpListener) {
    use axum::http::header;
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let node = Arc::clone(&node);
            async move { ([(header::CONTENT_TYPE, moe_telemetry::metrics::CONTENT_TYPE)], exposition(&node)) }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!("the metrics listener stopped: {e}");
    }
}
