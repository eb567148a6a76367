//! API keys: the bearer token a request must carry when keys are configured.

use axum::http::{header, HeaderMap, StatusCode};

use super::error::ApiError;
use super::AppState;

pub(super) fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if state.config.api_keys.is_empty() {
        return Ok(());
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let unauthorized = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "a valid API key is required (Authorization: Bearer KEY)",
            None,
            "invalid_api_key",
        )
    };
    let given = given.ok_or_else(unauthorized)?;
    // Constant-time per key, and every key is compared, so timing tells nothing about which prefix matched.
    let mut ok = subtle::Choice::from(0);
    for key in &state.config.api_keys {
        ok |= subtle::ConstantTimeEq::ct_eq(key.as_bytes(), given.as_bytes());
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(unauthorized())
    }
}
