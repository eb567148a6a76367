//! `/v1/completions`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use moe_model::Tokenizer;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::choices::{admitted, sequence_params, start_choice, token_text, unix_now, ChoiceResult, ChoiceSpec, Delta};
use super::error::ApiError;
use super::parse::{off_the_workers, read_body};
use super::plan::{completion_plan, CompletionPlan};
use super::stream::{sse, stream_tail, usage, StreamTally};
use super::AppState;
use crate::engine::TokenLogprob;
use crate::guide::Compiled;

pub(super) async fn completions(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, ApiError> {
    let body = read_body(&state, req).await?;
    let CompletionPlan { mut common, prompts, echo, constraint } =
        off_the_workers(&state, move |state| completion_plan(&state.intake(), &body)).await?;
    state.seed(&mut common);
    let mut receivers = Vec::new();
    for (prompt, max_tokens) in &prompts {
        for j in 0..common.n {
            let mut params = sequence_params(&state, &common, *max_tokens, echo && common.logprobs.is_some());
            params.sampling.seed = params.sampling.seed.wrapping_add(j as u64);
            receivers.push((
                prompt.clone(),
                start_choice(
                    &state,
                    ChoiceSpec {
                        operation: "text_completion",
                        prompt: prompt.clone(),
                        params,
                        stop: common.stop.clone(),
                        skip_special: common.skip_special_tokens,
                        deadline: common.deadline,
                        constraint: constraint.as_ref().map(Compiled::copy),
                    },
                )?,
            ));
        }
    }
    let id = format!("cmpl-{:x}", state.next_id.fetch_add(1, Ordering::Relaxed) ^ (unix_now() << 20));
    let created = unix_now();
    let model = state.config.model_name.clone();
    if common.stream {
        let mut admitted_receivers = Vec::with_capacity(receivers.len());
        for (prompt, rx) in receivers {
            admitted_receivers.push((prompt, admitted(rx).await?));
        }
        let receivers = admitted_receivers;
        let st = Arc::clone(&state);
        let skip = common.skip_special_tokens;
        let streams = receivers.into_iter().enumerate().map(move |(index, (prompt, rx))| {
            let st = Arc::clone(&st);
            let mut first = true;
            tokio_stream::wrappers::ReceiverStream::new(rx).map(move |delta| {
                let echo_text =
                    if first && echo { st.tokenizer.decode(&prompt, skip).unwrap_or_default() } else { String::new() };
                first = false;
                (index, delta, echo_text)
            })
        });
        let tally = Arc::new(StreamTally::default());
        let tail = stream_tail(
            Arc::clone(&tally),
            common.include_usage,
            id.clone(),
            "text_completion",
            created,
            model.clone(),
        );
        let st = Arc::clone(&state);
        let n = common.n;
        let events = futures::stream::select_all(streams).filter_map(move |(index, delta, echo_text)| {
            let st = Arc::clone(&st);
            let tally = Arc::clone(&tally);
            let (id, model) = (id.clone(), model.clone());
            async move {
                let choice = match delta {
                    Delta::Text { text, logprobs } => json!({
                        "index": index,
                        "text": echo_text + &text,
                        "logprobs": if logprobs.is_empty() { Value::Null } else { completion_logprobs(&st.tokenizer, &logprobs, 0) },
                        "finish_reason": Value::Null,
                    }),
                    Delta::PromptLogprobs(lp) => json!({
                        "index": index,
                        "text": echo_text,
                        "logprobs": completion_logprobs(&st.tokenizer, &lp, 0),
                        "finish_reason": Value::Null,
                    }),
                    Delta::Finished { reason, prompt_tokens, completion_tokens, cached_tokens } => {
                        // A prompt counts once however many choices it has, as in the non-streamed usage.
                        let first = index % n == 0;
                        tally.finished(
                            if first { prompt_tokens } else { 0 },
                            completion_tokens,
                            if first { cached_tokens } else { 0 },
                        );
                        json!({"index": index, "text": echo_text, "logprobs": Value::Null, "finish_reason": reason})
                    }
                    Delta::Failed(e) => return Some(tally.error_event(e)),
                    Delta::Admitted => return None,
                };
                let chunk = json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": [choice]});
                Some(Event::default().data(chunk.to_string()))
            }
        });
        return Ok(sse(events, tail, state.config.sse_keepalive));
    }

    let results = futures::future::join_all(receivers.into_iter().map(|(p, rx)| collect(rx, p))).await;
    let mut choices = Vec::new();
    let (mut prompt_tokens, mut completion_tokens, mut cached_tokens) = (0, 0, 0);
    for (index, (prompt, r)) in results.into_iter().enumerate() {
        let r = r?;
        if index % common.n == 0 {
            prompt_tokens += prompt.len();
            cached_tokens += r.cached_tokens;
        }
        completion_tokens += r.completion_tokens;
        let mut text = r.text;
        let mut lps = Vec::new();
        if echo {
            text = state.tokenizer.decode(&prompt, common.skip_special_tokens).unwrap_or_default() + &text;
            if common.logprobs.is_some() {
                // The first prompt token has no log-prob: a placeholder the formatter turns into nulls.
                lps.push(TokenLogprob { id: prompt[0], logprob: f32::NAN, top: Vec::new() });
                lps.extend(r.prompt_logprobs);
            }
        }
        lps.extend(r.tokens);
        choices.push(json!({
            "index": index,
            "text": text,
            "logprobs": if common.logprobs.is_some() { completion_logprobs(&state.tokenizer, &lps, 0) } else { Value::Null },
            "finish_reason": r.finish.unwrap_or("length"),
        }));
    }
    Ok(axum::Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }))
    .into_response())
}

/// Waits for a choice to end.
pub(super) async fn collect(
    mut rx: mpsc::Receiver<Delta>,
    prompt: Vec<u32>,
) -> (Vec<u32>, Result<ChoiceResult, ApiError>) {
    let mut r = ChoiceResult::default();
    while let Some(delta) = rx.recv().await {
        match delta {
            Delta::Text { text, logprobs } => {
                r.text.push_str(&text);
                r.tokens.extend(logprobs);
            }
            Delta::PromptLogprobs(lp) => r.prompt_logprobs = lp,
            Delta::Finished { reason, completion_tokens, cached_tokens, .. } => {
                r.finish = Some(reason);
                r.completion_tokens = completion_tokens;
                r.cached_tokens = cached_tokens;
                return (prompt, Ok(r));
            }
            Delta::Admitted => {}
            Delta::Failed(e) => return (prompt, Err(e)),
        }
    }
    (
        prompt,
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the sequence ended without finishing",
            None,
            "engine_error",
        )),
    )
}

/// The legacy completions `logprobs` object.
pub(super) fn completion_logprobs(tok: &Tokenizer, lps: &[TokenLogprob], offset: usize) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut offsets = Vec::new();
    let mut at = offset;
    for lp in lps {
        let text = token_text(tok, lp.id);
        offsets.push(at);
        at += text.len();
        tokens.push(Value::String(text));
        if lp.logprob.is_nan() {
            token_logprobs.push(Value::Null);
            top.push(Value::Null);
        } else {
            token_logprobs.push(json!(lp.logprob));
            let mut m = BTreeMap::new();
            for &(id, l) in &lp.top {
                m.insert(token_text(tok, id), json!(l));
            }
            top.push(if lp.top.is_empty() { Value::Null } else { json!(m) });
        }
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}
