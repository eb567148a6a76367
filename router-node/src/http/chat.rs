//! `/v1/chat/completions`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use moe_model::Tokenizer;
use serde_json::{json, Value};

use super::choices::{admitted, sequence_params, start_choice, token_text, unix_now, ChoiceSpec, Delta};
use super::completions::collect;
use super::error::ApiError;
use super::parse::{off_the_workers, read_body};
use super::plan::{chat_plan, ChatPlan};
use super::stream::{sse, stream_tail, StreamTally};
use super::AppState;
use crate::engine::TokenLogprob;

pub(super) async fn chat_completions(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, ApiError> {
    let body = read_body(&state, req).await?;
    let ChatPlan { mut common, prompt, max_tokens } =
        off_the_workers(&state, move |state| chat_plan(&state.intake(), &body)).await?;
    state.seed(&mut common);
    let mut receivers = Vec::new();
    for j in 0..common.n {
        let mut params = sequence_params(&state, &common, max_tokens, false);
        params.sampling.seed = params.sampling.seed.wrapping_add(j as u64);
        receivers.push(start_choice(
            &state,
            ChoiceSpec {
                operation: "chat",
                prompt: prompt.clone(),
                params,
                stop: common.stop.clone(),
                skip_special: common.skip_special_tokens,
                deadline: common.deadline,
            },
        )?);
    }
    let id = format!("chatcmpl-{:x}", state.next_id.fetch_add(1, Ordering::Relaxed) ^ (unix_now() << 20));
    let created = unix_now();
    let model = state.config.model_name.clone();
    let prompt_tokens = prompt.len();
    if common.stream {
        let mut admitted_receivers = Vec::with_capacity(receivers.len());
        for rx in receivers {
            admitted_receivers.push(admitted(rx).await?);
        }
        let receivers = admitted_receivers;
        let st = Arc::clone(&state);
        let tally = Arc::new(StreamTally::default());
        tally.prompt_tokens.store(prompt_tokens as u64, Ordering::Relaxed);
        let tail = stream_tail(
            Arc::clone(&tally),
            common.include_usage,
            id.clone(),
            "chat.completion.chunk",
            created,
            model.clone(),
        );
        let n = common.n;
        let chunk = move |choice: Value| {
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}).to_string()
        };
        let chunk2 = chunk.clone();
        let head = futures::stream::iter((0..n).map(move |i| {
            Event::default().data(chunk2(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": Value::Null, "finish_reason": Value::Null})))
        }));
        let streams = receivers
            .into_iter()
            .enumerate()
            .map(|(index, rx)| tokio_stream::wrappers::ReceiverStream::new(rx).map(move |d| (index, d)));
        let events = futures::stream::select_all(streams).filter_map(move |(index, delta)| {
            let st = Arc::clone(&st);
            let tally = Arc::clone(&tally);
            let chunk = chunk.clone();
            async move {
                let choice = match delta {
                    Delta::Text { text, logprobs } => json!({
                        "index": index,
                        "delta": {"content": text},
                        "logprobs": if logprobs.is_empty() { Value::Null } else { chat_logprobs(&st.tokenizer, &logprobs) },
                        "finish_reason": Value::Null,
                    }),
                    Delta::PromptLogprobs(_) => return None,
                    Delta::Finished { reason, completion_tokens, .. } => {
                        tally.finished(0, completion_tokens);
                        json!({"index": index, "delta": {}, "logprobs": Value::Null, "finish_reason": reason})
                    }
                    Delta::Failed(e) => return Some(tally.error_event(e)),
                    Delta::Admitted => return None,
                };
                Some(Event::default().data(chunk(choice)))
            }
        });
        return Ok(sse(head.chain(events), tail, state.config.sse_keepalive));
    }

    let results = futures::future::join_all(receivers.into_iter().map(|rx| collect(rx, Vec::new()))).await;
    let mut choices = Vec::new();
    let mut completion_tokens = 0;
    for (index, (_, r)) in results.into_iter().enumerate() {
        let r = r?;
        completion_tokens += r.completion_tokens;
        choices.push(json!({
            "index": index,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": if common.logprobs.is_some() { chat_logprobs(&state.tokenizer, &r.tokens) } else { Value::Null },
            "finish_reason": r.finish.unwrap_or("length"),
        }));
    }
    Ok(axum::Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    }))
    .into_response())
}

/// The chat `logprobs` object.
pub(super) fn chat_logprobs(tok: &Tokenizer, lps: &[TokenLogprob]) -> Value {
    let entry = |id: u32, l: f32| {
        let t = token_text(tok, id);
        json!({"token": t, "logprob": l, "bytes": t.as_bytes()})
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|lp| {
            let mut e = entry(lp.id, lp.logprob);
            e["top_logprobs"] = Value::Array(lp.top.iter().map(|&(id, l)| entry(id, l)).collect());
            e
        })
        .collect();
    json!({"content": content})
}
