//! Probes and metrics: `/livez`, `/readyz` (`/health`, `/ready`), `/metrics` (see [`crate::metrics`]).

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
    let text = crate::metrics::exposition(
        &state.config.model_name,
        &state.requests,
        &state.engine.stats,
        state.engine.state_budget(),
        state.remote.as_ref(),
    );
    ([(header::CONTENT_TYPE, moe_telemetry::metrics::CONTENT_TYPE)], text).into_response()
}
