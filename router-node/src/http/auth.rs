//! API keys: with keys configured, every route but the probes (`/livez`, `/readyz` and their aliases) needs one, as
//! `Authorization: Bearer KEY` (the scheme in any case).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ring::digest::{digest, SHA256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;

/// The middleware on every guarded route.
pub(super) async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match authorize(&state, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Whether `headers` carry one of the configured keys (always, with none configured).
pub(super) fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if state.config.api_keys.is_empty() {
        return Ok(());
    }
    let unauthorized = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "a valid API key is required (Authorization: Bearer KEY)",
            None,
            "invalid_api_key",
        )
    };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| bearer(v.as_bytes())).ok_or_else(unauthorized)?;
    if key_matches(&state.config.api_keys, given) {
        Ok(())
    } else {
        Err(unauthorized())
    }
}

/// The token of an `Authorization` value whose scheme is `Bearer` (RFC 9110: schemes are case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| rest.trim_ascii())
}

/// Compares digests rather than the keys themselves, so that the time taken says nothing about a key's length or
/// its first bytes; every key is compared, so it says nothing about which matched either.
fn key_matches(keys: &[String], given: &[u8]) -> bool {
    let given = digest(&SHA256, given);
    let mut ok = subtle::Choice::from(0);
    for key in keys {
        ok |= digest(&SHA256, key.as_bytes()).as_ref().ct_eq(given.as_ref());
    }
    bool::from(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_is_case_insensitive_and_the_token_exact() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
        let keys = vec!["k1".to_owned(), "secret".to_owned()];
        assert!(key_matches(&keys, b"secret") && key_matches(&keys, b"k1"));
        assert!(!key_matches(&keys, b"secre") && !key_matches(&keys, b"secret2") && !key_matches(&keys, b""));
    }
}
