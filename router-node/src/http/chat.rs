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
use super::stream::{sse, stream_tail, usage, StreamTally};
use super::AppState;
use crate::engine::TokenLogprob;
use crate::guide::Compiled;
use crate::output::{Part, Splitter};

pub(super) async fn chat_completions(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, ApiError> {
    let body = read_body(&state, req).await?;
    let ChatPlan { mut common, prompt, max_tokens, output, constraint, parallel_tool_calls } =
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
                constraint: constraint.as_ref().map(Compiled::copy),
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
        let streams = receivers.into_iter().enumerate().map(|(index, rx)| {
            let mut choice = StreamedChoice {
                index,
                splitter: Splitter::new(output.clone()),
                parallel: parallel_tool_calls,
                pending_logprobs: None,
                state: Arc::clone(&st),
                tally: Arc::clone(&tally),
                chunk: chunk.clone(),
            };
            tokio_stream::wrappers::ReceiverStream::new(rx)
                .flat_map(move |delta| futures::stream::iter(choice.events(delta)))
        });
        let events = futures::stream::select_all(streams);
        return Ok(sse(head.chain(events), tail, state.config.sse_keepalive));
    }

    let results = futures::future::join_all(receivers.into_iter().map(|rx| collect(rx, Vec::new()))).await;
    let mut choices = Vec::new();
    let (mut completion_tokens, mut cached_tokens) = (0, 0);
    for (index, (_, r)) in results.into_iter().enumerate() {
        let r = r?;
        completion_tokens += r.completion_tokens;
        if index == 0 {
            cached_tokens = r.cached_tokens;
        }
        let mut splitter = Splitter::new(output.clone());
        let mut parts = splitter.push(&r.text);
        parts.extend(splitter.finish());
        let mut message = Answer::default();
        for part in parts {
            match part {
                Part::Reasoning(t) => message.reasoning.push_str(&t),
                Part::Content(t) => message.content.push_str(&t),
                Part::Call(call) if parallel_tool_calls || message.calls.is_empty() => {
                    message.calls.push(json!({
                        "id": call_id(&state),
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }));
                }
                Part::Call(_) => {}
            }
        }
        let finish = finish_reason(r.finish.unwrap_or("length"), !message.calls.is_empty());
        choices.push(json!({
            "index": index,
            "message": message.into_json(),
            "logprobs": if common.logprobs.is_some() { chat_logprobs(&state.tokenizer, &r.tokens) } else { Value::Null },
            "finish_reason": finish,
        }));
    }
    Ok(axum::Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
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

/// A non-streamed answer's message, gathered from its parts.
#[derive(Default)]
struct Answer {
    reasoning: String,
    content: String,
    calls: Vec<Value>,
}

impl Answer {
    fn into_json(self) -> Value {
        let mut m = json!({"role": "assistant"});
        // OpenAI gives `content: null` when the answer is only tool calls.
        m["content"] =
            if self.content.is_empty() && !self.calls.is_empty() { Value::Null } else { Value::String(self.content) };
        if !self.reasoning.is_empty() {
            m["reasoning_content"] = Value::String(self.reasoning);
        }
        if !self.calls.is_empty() {
            m["tool_calls"] = Value::Array(self.calls);
        }
        m
    }
}

/// `tool_calls` when the model stopped after calling tools.
fn finish_reason(reason: &'static str, called: bool) -> &'static str {
    if called && reason == "stop" {
        "tool_calls"
    } else {
        reason
    }
}

/// A tool call's id: `call_` and 24 hex digits, unique within the server's life.
fn call_id(state: &AppState) -> String {
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    let mixed = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ unix_now().rotate_left(32) ^ state.created;
    format!("call_{mixed:016x}{:08x}", n as u32)
}

/// One streamed choice: its deltas turned into chunks, reasoning, content and tool calls apart.
struct StreamedChoice<F> {
    index: usize,
    splitter: Splitter,
    parallel: bool,
    /// Log-probs of text the splitter still holds, sent with the next chunk.
    pending_logprobs: Option<Vec<TokenLogprob>>,
    state: Arc<AppState>,
    tally: Arc<StreamTally>,
    chunk: F,
}

impl<F: Fn(Value) -> String> StreamedChoice<F> {
    fn events(&mut self, delta: Delta) -> Vec<Event> {
        match delta {
            Delta::Text { text, logprobs } => {
                if !logprobs.is_empty() {
                    self.pending_logprobs.get_or_insert_with(Vec::new).extend(logprobs);
                }
                let parts = self.splitter.push(&text);
                self.chunks(parts)
            }
            Delta::Finished { reason, completion_tokens, cached_tokens, .. } => {
                // The prompt counts once (the tally starts with it), its cached part with the first choice.
                self.tally.finished(0, completion_tokens, if self.index == 0 { cached_tokens } else { 0 });
                let parts = self.splitter.finish();
                let mut out = self.chunks(parts);
                let reason = finish_reason(reason, self.splitter.calls() > 0);
                out.push(self.event(json!({}), reason));
                out
            }
            Delta::Failed(e) => vec![self.tally.error_event(e)],
            Delta::PromptLogprobs(_) | Delta::Admitted => Vec::new(),
        }
    }

    fn chunks(&mut self, parts: Vec<Part>) -> Vec<Event> {
        let mut out = Vec::new();
        for part in parts {
            match part {
                Part::Reasoning(t) => out.push(self.event(json!({"reasoning_content": t}), Value::Null)),
                Part::Content(t) => out.push(self.event(json!({"content": t}), Value::Null)),
                Part::Call(call) => {
                    // Calls are counted by the splitter; the first is index 0.
                    let k = self.splitter.calls() - 1;
                    if !self.parallel && k > 0 {
                        continue;
                    }
                    let head = json!({"index": k, "id": call_id(&self.state), "type": "function",
                                      "function": {"name": call.name, "arguments": ""}});
                    out.push(self.event(json!({"tool_calls": [head]}), Value::Null));
                    let args = json!({"index": k, "function": {"arguments": call.arguments}});
                    out.push(self.event(json!({"tool_calls": [args]}), Value::Null));
                }
            }
        }
        out
    }

    fn event(&mut self, delta: Value, finish: impl Into<Value>) -> Event {
        let logprobs = match self.pending_logprobs.take() {
            Some(lps) => chat_logprobs(&self.state.tokenizer, &lps),
            None => Value::Null,
        };
        let choice = json!({"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish.into()});
        Event::default().data((self.chunk)(choice))
    }
}
