//! Server-sent events: the chunks of a streamed response, its last chunk and usage, and keep-alive comments.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;

use super::error::ApiError;

/// What a streaming response has seen, for its last events.
#[derive(Default)]
pub(super) struct StreamTally {
    pub(super) failed: AtomicBool,
    pub(super) prompt_tokens: AtomicU64,
    pub(super) completion_tokens: AtomicU64,
    pub(super) cached_tokens: AtomicU64,
}

impl StreamTally {
    pub(super) fn finished(&self, prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) {
        self.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        self.completion_tokens.fetch_add(completion_tokens as u64, Ordering::Relaxed);
        self.cached_tokens.fetch_add(cached_tokens as u64, Ordering::Relaxed);
    }

    /// The event that ends a stream whose sequence failed; nothing follows it.
    pub(super) fn error_event(&self, e: ApiError) -> Event {
        self.failed.store(true, Ordering::Release);
        Event::default().data(e.body().to_string())
    }
}

/// The events after the choices: a chunk with the usage when asked, then `[DONE]`; none after an error event.
pub(super) fn stream_tail(
    tally: Arc<StreamTally>,
    include_usage: bool,
    id: String,
    object: &'static str,
    created: u64,
    model: String,
) -> impl futures::Stream<Item = Event> + Send + 'static {
    futures::stream::once(async move {
        let mut out = Vec::new();
        if tally.failed.load(Ordering::Acquire) {
            return futures::stream::iter(out);
        }
        if include_usage {
            let load = |n: &AtomicU64| n.load(Ordering::Relaxed) as usize;
            let usage = usage(load(&tally.prompt_tokens), load(&tally.completion_tokens), load(&tally.cached_tokens));
            let chunk =
                json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage});
            out.push(Event::default().data(chunk.to_string()));
        }
        out.push(Event::default().data("[DONE]"));
        futures::stream::iter(out)
    })
    .flatten()
}

/// A response's `usage`: OpenAI's fields, with the prompt tokens the prefix cache served as
/// `prompt_tokens_details.cached_tokens`.
pub(super) fn usage(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> serde_json::Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    })
}

pub(super) fn sse(
    events: impl futures::Stream<Item = Event> + Send + 'static,
    tail: impl futures::Stream<Item = Event> + Send + 'static,
    keepalive: Duration,
) -> Response {
    let stream = keep_alive_after_first(events.chain(tail), keepalive).map(Ok::<_, std::convert::Infallible>);
    Sse::new(stream).into_response()
}

/// `events`, with an SSE comment after every `interval` without an event, once the first event has gone out.
pub(super) fn keep_alive_after_first(
    events: impl futures::Stream<Item = Event> + Send + 'static,
    interval: Duration,
) -> impl futures::Stream<Item = Event> + Send + 'static {
    futures::stream::unfold((Box::pin(events), false), move |(mut events, started)| async move {
        if !started {
            let first = events.next().await?;
            return Some((first, (events, true)));
        }
        match tokio::time::timeout(interval, events.next()).await {
            Ok(Some(event)) => Some((event, (events, true))),
            Ok(None) => None,
            Err(_) => Some((Event::default().comment("keep-alive"), (events, true))),
        }
    })
}
