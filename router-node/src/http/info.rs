//! `/v1/models`, and vLLM's `/tokenize` and `/detokenize`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::error::ApiError;
use super::parse::{check_model, off_the_workers, parse_messages, read_json, Fields};
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
    let body = Arc::new(read_json(&state, req).await?);
    check_model(&state, &Fields(&body))?;
    let tokens = off_the_workers(&state, &body, |state, f| {
        if f.get("messages").is_some() {
            return parse_messages(state, f);
        }
        let text =
            f.string("prompt")?.ok_or_else(|| ApiError::schema("prompt", "`prompt` or `messages` is required"))?;
        let special = f.bool("add_special_tokens")?.unwrap_or(true);
        state.tokenizer.encode(text, special).map_err(|e| ApiError::invalid("prompt", e.to_string()))
    })
    .await?;
    Ok(axum::Json(json!({"count": tokens.len(), "max_model_len": state.config.max_model_len, "tokens": tokens}))
        .into_response())
}

/// vLLM's `/detokenize`: token ids to text.
pub(super) async fn detokenize(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, ApiError> {
    let body = read_json(&state, req).await?;
    let f = Fields(&body);
    check_model(&state, &f)?;
    let ids: Vec<u32> = match f.get("tokens") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_u64().filter(|&t| (t as usize) < state.vocab_size).map(|t| t as u32).ok_or_else(|| {
                    ApiError::invalid("tokens", format!("token ids must be integers below {}", state.vocab_size))
                })
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(ApiError::schema("tokens", "`tokens` must be a list of token ids")),
    };
    let text = state.tokenizer.decode(&ids, false).map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(axum::Json(json!({"prompt": text})).into_response())
}
