//! Running choices: one engine sequence per choice, its event channel, its budget and deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use moe_model::Tokenizer;
use tokio::sync::mpsc;

use super::error::{expired, shed, unavailable, ApiError};
use super::parse::Common;
use super::text::TextState;
use super::AppState;
use crate::engine::{Finish, SequenceEvent, SequenceParams, SequenceRequest, SubmitError, TokenLogprob};
use crate::metrics::{Ended, RequestTimer};

/// What a choice produced so far, for non-streaming responses.
#[derive(Default)]
pub(super) struct ChoiceResult {
    pub(super) text: String,
    pub(super) tokens: Vec<TokenLogprob>,
    pub(super) prompt_logprobs: Vec<TokenLogprob>,
    pub(super) finish: Option<&'static str>,
    pub(super) completion_tokens: usize,
    pub(super) cached_tokens: usize,
}

/// One piece of a choice's progress, for streaming.
pub(super) enum Delta {
    /// The engine admitted the sequence (always first, unless it failed before).
    Admitted,
    Text {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    PromptLogprobs(Vec<TokenLogprob>),
    Finished {
        reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens the prefix cache served.
        cached_tokens: usize,
    },
    /// The sequence ended without finishing; nothing follows.
    Failed(ApiError),
}

pub(super) struct ChoiceSpec {
    /// The GenAI operation, as traces name it: `text_completion` or `chat`.
    pub(super) operation: &'static str,
    pub(super) prompt: Vec<u32>,
    pub(super) params: SequenceParams,
    pub(super) stop: Vec<String>,
    pub(super) skip_special: bool,
    pub(super) deadline: Instant,
    /// The output constraint this choice follows (its own copy).
    pub(super) constraint: Option<crate::guide::Compiled>,
}

/// Waits until the engine admits the choice (it left the queue), so that a request shed from the queue gets its
/// status code (503 with `Retry-After`) before a stream's headers go out.
pub(super) async fn admitted(mut rx: mpsc::Receiver<Delta>) -> Result<mpsc::Receiver<Delta>, ApiError> {
    match rx.recv().await {
        Some(Delta::Admitted) => Ok(rx),
        Some(Delta::Failed(e)) => Err(e),
        Some(_) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the sequence produced output before it was admitted",
            None,
            "engine_error",
        )),
        None => Err(unavailable("the engine dropped the sequence", "engine_error")),
    }
}

/// Starts one sequence; returns its deltas. Dropping the receiver cancels the sequence.
pub(super) fn start_choice(state: &Arc<AppState>, spec: ChoiceSpec) -> Result<mpsc::Receiver<Delta>, ApiError> {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let prompt_tokens = spec.prompt.len();
    let deadline = spec.deadline;
    let submitted = Instant::now();
    let timeout = deadline.saturating_duration_since(submitted);
    let admit_by = submitted + state.engine.max_queue_wait();
    // The request's span, with the GenAI semantic conventions' attributes: kept if the trace is sampled (then the
    // engine's steps and the dispatches under them are its children).
    let model = &state.config.model_name;
    let span = tracing::info_span!(
        "gen_ai.request",
        "otel.name" = format!("{} {model}", spec.operation),
        "otel.kind" = "server",
        "gen_ai.operation.name" = spec.operation,
        "gen_ai.system" = "moe-mesh",
        "gen_ai.request.model" = model.as_str(),
        "gen_ai.request.max_tokens" = spec.params.max_tokens,
        "gen_ai.usage.input_tokens" = prompt_tokens,
        "gen_ai.usage.output_tokens" = tracing::field::Empty,
        "gen_ai.response.finish_reasons" = tracing::field::Empty,
    );
    let trace = moe_telemetry::trace::traceparent(&span).map(|_| span.clone());
    let guide = match spec.constraint {
        Some(c) => Some(c.start().map_err(|e| unavailable(e.to_string(), "unavailable"))?),
        None => None,
    };
    state
        .engine
        .submit(SequenceRequest {
            trace,
            prompt: spec.prompt,
            params: spec.params,
            events: events_tx,
            cancel: Arc::clone(&cancel),
            deadline: Some(deadline),
            submitted,
            guide,
        })
        .map_err(|e| match e {
            SubmitError::QueueFull(_) => ApiError {
                retry_after: Some(1),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string(), None, "overloaded")
            },
            SubmitError::TooLarge { .. } => ApiError::invalid("max_tokens", e.to_string()),
            SubmitError::Stopped => unavailable(e.to_string(), "unavailable"),
        })?;
    let (tx, rx) = mpsc::channel(64);
    let tokenizer = Arc::clone(&state.tokenizer);
    let mut text = TextState::new(spec.stop, spec.skip_special);
    let mut timer = RequestTimer::new(&state.requests, submitted);
    tokio::spawn(async move {
        let mut pending_logprobs: Vec<TokenLogprob> = Vec::new();
        let mut admitted = false;
        let mut cached = 0;
        loop {
            let event = tokio::select! {
                e = events.recv() => e,
                // The client is gone: stop the sequence now rather than at its next token.
                _ = tx.closed() => {
                    cancel.store(true, Ordering::Release);
                    timer.ended(Ended::Abort, prompt_tokens, text.ids.len());
                    return;
                }
                // The deadline holds even while the engine is inside a step (one held for a lost expert node).
                _ = tokio::time::sleep_until(deadline.into()) => {
                    cancel.store(true, Ordering::Release);
                    let _ = tx.send(Delta::Failed(expired(timeout))).await;
                    return;
                }
                // Likewise the queue limit, which the engine applies only between steps.
                _ = tokio::time::sleep_until(admit_by.into()), if !admitted => {
                    cancel.store(true, Ordering::Release);
                    let _ = tx.send(Delta::Failed(shed(admit_by - submitted))).await;
                    return;
                }
            };
            admitted |= matches!(event, Some(SequenceEvent::Admitted { .. }));
            let delta = match event {
                Some(SequenceEvent::Admitted { cached_tokens }) => {
                    cached = cached_tokens;
                    timer.admitted();
                    Delta::Admitted
                }
                Some(SequenceEvent::PromptLogprobs(lp)) => Delta::PromptLogprobs(lp),
                Some(SequenceEvent::Token { id, logprob }) => {
                    timer.token();
                    let (piece, stopped) = text.push(&tokenizer, id);
                    pending_logprobs.extend(logprob);
                    if stopped {
                        cancel.store(true, Ordering::Release);
                        timer.ended(Ended::Stop, prompt_tokens, text.ids.len());
                        finished(&span, "stop", text.ids.len());
                        let _ =
                            tx.send(Delta::Text { text: piece, logprobs: std::mem::take(&mut pending_logprobs) }).await;
                        let _ = tx
                            .send(Delta::Finished {
                                reason: "stop",
                                prompt_tokens,
                                completion_tokens: text.ids.len(),
                                cached_tokens: cached,
                            })
                            .await;
                        return;
                    }
                    if piece.is_empty() {
                        continue;
                    }
                    Delta::Text { text: piece, logprobs: std::mem::take(&mut pending_logprobs) }
                }
                Some(SequenceEvent::Finished { reason, prompt_tokens, completion_tokens }) => {
                    let rest = text.flush(&tokenizer);
                    if !rest.is_empty() || !pending_logprobs.is_empty() {
                        let _ =
                            tx.send(Delta::Text { text: rest, logprobs: std::mem::take(&mut pending_logprobs) }).await;
                    }
                    timer.ended(
                        match reason {
                            Finish::Stop => Ended::Stop,
                            Finish::Length => Ended::Length,
                        },
                        prompt_tokens,
                        completion_tokens,
                    );
                    let reason = match reason {
                        Finish::Stop => "stop",
                        Finish::Length => "length",
                    };
                    finished(&span, reason, completion_tokens);
                    let _ = tx
                        .send(Delta::Finished { reason, prompt_tokens, completion_tokens, cached_tokens: cached })
                        .await;
                    return;
                }
                Some(SequenceEvent::Failed(why)) => Delta::Failed(unavailable(why, "engine_error")),
                Some(SequenceEvent::Shed { waited }) => Delta::Failed(shed(waited)),
                Some(SequenceEvent::Expired { .. }) => Delta::Failed(expired(timeout)),
                None => Delta::Failed(unavailable("the engine dropped the sequence", "engine_error")),
            };
            let last = matches!(delta, Delta::Failed(_));
            if tx.send(delta).await.is_err() {
                cancel.store(true, Ordering::Release);
                timer.ended(Ended::Abort, prompt_tokens, text.ids.len());
                return;
            }
            if last {
                return;
            }
        }
    });
    Ok(rx)
}

/// Records how a traced sequence ended on its span.
fn finished(span: &tracing::Span, reason: &str, completion_tokens: usize) {
    span.record("gen_ai.usage.output_tokens", completion_tokens);
    span.record("gen_ai.response.finish_reasons", format!("[\"{reason}\"]"));
}

pub(super) fn sequence_params(
    state: &AppState,
    c: &Common,
    max_tokens: usize,
    prompt_logprobs: bool,
) -> SequenceParams {
    SequenceParams {
        max_tokens,
        min_tokens: c.min_tokens.min(max_tokens),
        sampling: c.sampling,
        logprobs: c.logprobs,
        prompt_logprobs,
        stop_ids: c.stop_token_ids.clone(),
        eos_ids: state.eos_ids.clone(),
        ignore_eos: c.ignore_eos,
        repetition_penalty: c.repetition_penalty,
    }
}

pub(super) fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
