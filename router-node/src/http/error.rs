//! Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), with the status and `Retry-After`
//! each maps to.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// An error in OpenAI's shape.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
    pub(super) param: Option<String>,
    pub(super) code: &'static str,
    pub(super) retry_after: Option<u64>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>, param: Option<&str>, code: &'static str) -> Self {
        ApiError { status, message: message.into(), param: param.map(str::to_owned), code, retry_after: None }
    }

    /// A value that is well-typed but not allowed.
    pub(super) fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, Some(param), "invalid_value")
    }

    /// A field of the wrong type, or a required one missing.
    pub(super) fn schema(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message, Some(param), "invalid_type")
    }

    /// The HTTP status the client gets.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// What the client is told.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(super) fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub(super) fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind(), "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

pub(super) fn unavailable(message: impl Into<String>, code: &'static str) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message, None, code)
}

pub(super) fn shed(waited: Duration) -> ApiError {
    ApiError {
        retry_after: Some(1),
        ..unavailable(
            format!("the server is overloaded: the request waited {waited:.1?} for a slot; retry later"),
            "overloaded",
        )
    }
}

pub(super) fn expired(timeout: Duration) -> ApiError {
    unavailable(format!("the request did not finish within its timeout of {timeout:.1?}"), "timeout")
}
