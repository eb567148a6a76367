//! Probes and metrics: `/livez`, `/readyz` (`/health`, `/ready`), `/metrics`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use serde_json::json;

use super::AppState;

/// Alive while the engine thread runs: a router whose engine died is restarted by its supervisor.
pub(super) async fn livez(State(state): State<Arc<AppState>>) -> Response {
    if state.engine.is_alive() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the engine thread has stopped").into_response()
    }
}

/// Ready to take requests: not draining, the engine alive, every routed expert reachable. Unauthenticated, so it
/// says only yes or no; `/v1/status` (behind the API key) says why.
pub(super) async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match why_not_ready(&state) {
        None => (StatusCode::OK, "ready").into_response(),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response(),
    }
}

fn why_not_ready(state: &AppState) -> Option<String> {
    if state.draining.load(Ordering::Acquire) {
        return Some("draining".into());
    }
    if !state.engine.is_alive() {
        return Some("the engine thread has stopped".into());
    }
    (state.experts_ready)().err()
}

/// Readiness with its reason, and the engine's occupancy.
pub(super) async fn status(State(state): State<Arc<AppState>>) -> Response {
    let why = why_not_ready(&state);
    let s = &state.engine.stats;
    axum::Json(json!({
        "ready": why.is_none(),
        "reason": why,
        "draining": state.draining.load(Ordering::Acquire),
        "engine_alive": state.engine.is_alive(),
        "model": state.config.model_name,
        "running": s.running.load(Ordering::Relaxed),
        "waiting": s.waiting.load(Ordering::Relaxed),
    }))
    .into_response()
}

pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let s = &state.engine.stats;
    let g = |v: u64| v.to_string();
    let lines = [
        (
            "moe_num_requests_running",
            "gauge",
            "Sequences in the running batch.",
            g(s.running.load(Ordering::Relaxed) as u64),
        ),
        (
            "moe_num_requests_waiting",
            "gauge",
            "Sequences waiting for admission.",
            g(s.waiting.load(Ordering::Relaxed) as u64),
        ),
        // vLLM's names for the same two gauges, for autoscalers and dashboards written against vLLM.
        (
            "vllm:num_requests_running",
            "gauge",
            "Sequences in the running batch (vLLM's name).",
            g(s.running.load(Ordering::Relaxed) as u64),
        ),
        (
            "vllm:num_requests_waiting",
            "gauge",
            "Sequences waiting for admission (vLLM's name).",
            g(s.waiting.load(Ordering::Relaxed) as u64),
        ),
        (
            "moe_state_bytes_reserved",
            "gauge",
            "Sequence state memory reserved (KV pages and DeltaNet slots).",
            g(s.state_bytes_reserved.load(Ordering::Relaxed)),
        ),
        ("moe_prompt_tokens_total", "counter", "Prompt tokens processed.", g(s.prompt_tokens.load(Ordering::Relaxed))),
        ("moe_generation_tokens_total", "counter", "Tokens generated.", g(s.generated_tokens.load(Ordering::Relaxed))),
        ("moe_engine_steps_total", "counter", "Forward steps.", g(s.steps.load(Ordering::Relaxed))),
        ("moe_requests_finished_total", "counter", "Sequences finished.", g(s.finished.load(Ordering::Relaxed))),
        (
            "moe_requests_cancelled_total",
            "counter",
            "Sequences cancelled (client gone or stop string).",
            g(s.cancelled.load(Ordering::Relaxed)),
        ),
        ("moe_requests_failed_total", "counter", "Sequences failed.", g(s.failed.load(Ordering::Relaxed))),
        (
            "moe_requests_shed_total",
            "counter",
            "Requests shed after waiting longer than the queue limit (HTTP 503 with Retry-After).",
            g(s.shed.load(Ordering::Relaxed)),
        ),
        (
            "moe_requests_expired_total",
            "counter",
            "Sequences ended by their deadline in the engine.",
            g(s.expired.load(Ordering::Relaxed)),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in lines {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    }
    if let Some(remote) = &state.remote {
        let r = &remote.stats;
        let remote_lines = [
            (
                "moe_placement_epoch",
                "gauge",
                "Placement epoch dispatches carry (0: static placement).",
                g(remote.epoch()),
            ),
            (
                "moe_expert_messages_total",
                "counter",
                "Messages answered by expert nodes.",
                g(r.messages.load(Ordering::Relaxed)),
            ),
            (
                "moe_expert_bytes_sent_total",
                "counter",
                "Activation bytes sent to expert nodes.",
                g(r.bytes_sent.load(Ordering::Relaxed)),
            ),
            (
                "moe_expert_bytes_received_total",
                "counter",
                "Partial-sum bytes received from expert nodes.",
                g(r.bytes_received.load(Ordering::Relaxed)),
            ),
            (
                "moe_expert_pieces_resent_total",
                "counter",
                "Pieces sent again elsewhere (node down, or no longer serving the piece's epoch or experts).",
                g(r.resent.load(Ordering::Relaxed)),
            ),
            (
                "moe_expert_holds_total",
                "counter",
                "Layer waits held because some expert had no live replica.",
                g(r.holds.load(Ordering::Relaxed)),
            ),
            (
                "moe_expert_holds_abandoned_total",
                "counter",
                "Holds given up (nobody waited any more, or the hold limit passed).",
                g(r.holds_abandoned.load(Ordering::Relaxed)),
            ),
            ("moe_expert_holding", "gauge", "Layer waits holding now.", g(r.holding.load(Ordering::Relaxed))),
            (
                "moe_expert_reconnects_total",
                "counter",
                "Links re-opened to expert nodes that had gone down.",
                g(r.reconnects.load(Ordering::Relaxed)),
            ),
        ];
        for (name, kind, help, value) in remote_lines {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
