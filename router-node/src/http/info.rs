//! `/v1/models`, and vLLM's `/tokenize` and `/detokenize`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::ApiError;
use super::parse::{off_the_workers, read_body};
use super::plan::{detokenize_plan, tokenize_plan};
use super::AppState;

pub(super) async fn models(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    Ok(axum::Json(json!({
        "object": "list",
        "data": [{
            "id": state.config.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "moe-mesh",
            "root": state.config.model_name,
            "max_model_len": state.config.max_model_len,
        }],
    }))
    .into_response())
}

/// vLLM's `/tokenize`: `prompt` (a string) or `messages` (through the chat template) to token ids.
pub(super) async fn tokenize(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, ApiError> {
    let body = read_body(&state, req).await?;
    let tokens = off_the_workers(&state, move |state| tokenize_plan(&state.intake(), &body)).await?;
    Ok(axum::Json(json!({"count": tokens.len(), "max_model_len": state.config.max_model_len, "tokens": tokens}))
        .into_response())
}

/// vLLM's `/detokenize`: token ids to text.
pub(super) async fn detokenize(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, ApiError> {
    let body = read_body(&state, req).await?;
    let text = off_the_workers(&state, move |state| detokenize_plan(&state.intake(), &body)).await?;
    Ok(axum::Json(json!({"prompt": text})).into_response())
}
