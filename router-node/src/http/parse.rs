//! Request bodies: read under a size and time limit, then parsed field by field from JSON values, so that every bad
//! field gets an error naming it and unknown fields are ignored. Parsing needs the model's tokenizer, template and
//! limits ([`Intake`]) but no engine: a request is read and checked whole before any of it runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::StatusCode;
use moe_model::{ChatTemplate, GenerationConfig, Message, RenderOptions, SamplingParams, Tokenizer};
use serde_json::{Map, Value};

use super::error::ApiError;
pub use super::tools::ChatParsers;
use super::tools::{message_tool_calls, parse_template_kwargs, parse_tools, ToolChoice, Tools};
use super::AppState;
use crate::guide::Guides;

/// What reading a request needs: the model's tokenizer, chat template and generation defaults, and the server's
/// limits. A view of [`AppState`] ([`AppState::intake`]), or built by hand by tools that check request reading
/// without an engine.
#[derive(Debug, Clone, Copy)]
pub struct Intake<'a> {
    pub model_name: &'a str,
    pub tokenizer: &'a Tokenizer,
    pub chat_template: Option<&'a ChatTemplate>,
    pub generation: &'a GenerationConfig,
    pub vocab_size: usize,
    /// Prompt + max_tokens at most.
    pub max_model_len: usize,
    /// `n` × prompts at most.
    pub max_choices: usize,
    /// The most a request's own `request_timeout` may ask.
    pub request_timeout: Duration,
    /// How chat output is read (tool calls, reasoning).
    pub parsers: ChatParsers,
    /// Constrained decoding over this model's vocabulary; `None` refuses constrained requests.
    pub guides: Option<&'a Guides>,
}

pub(super) fn check_model(intake: &Intake<'_>, f: &Fields<'_>) -> Result<(), ApiError> {
    match f.string("model")? {
        Some(model) if model != intake.model_name => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the model `{model}` does not exist (this server serves `{}`)", intake.model_name),
            Some("model"),
            "model_not_found",
        )),
        _ => Ok(()),
    }
}

/// Reads the body under the size and time limits.
pub(super) async fn read_body(state: &AppState, req: Request) -> Result<Bytes, ApiError> {
    let limit = state.config.max_body_bytes;
    let timeout = state.config.body_read_timeout;
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(req.into_body(), limit)).await.map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request body did not arrive within {} s", timeout.as_secs_f64()),
            None,
            "request_timeout",
        )
    })?;
    read.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body exceeds {limit} bytes"),
            None,
            "payload_too_large",
        )
    })
}

/// Parses a body as a JSON object.
pub(super) fn parse_json(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if std::str::from_utf8(bytes).is_err() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the request body is not valid UTF-8",
            None,
            "invalid_json",
        ));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => {
            Err(ApiError::new(StatusCode::BAD_REQUEST, "the request body must be a JSON object", None, "invalid_json"))
        }
        Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}"), None, "invalid_json")),
    }
}

/// Bounds on what one request may ask for, so that no field makes the work of a request grow without limit: the
/// stop strings are scanned at every token of every choice.
pub(super) const MAX_STOP_STRINGS: usize = 64;
pub(super) const MAX_STOP_BYTES: usize = 4096;
pub(super) const MAX_STOP_TOKEN_IDS: usize = 256;
pub(super) const MAX_MESSAGES: usize = 4096;
pub(super) const MAX_CONTENT_PARTS: usize = 1024;
/// The message roles of the chat API.
pub(super) const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool", "function"];
/// Temperatures below this sample greedily, as in vLLM.
pub(super) const MIN_TEMPERATURE: f64 = 1e-5;

/// Runs `work` on the blocking pool: parsing JSON, tokenising and rendering a chat template are CPU-bound and grow
/// with a body of up to megabytes, and the async workers must go on serving other connections (and probes)
/// meanwhile.
pub(super) async fn off_the_workers<T, F>(state: &Arc<AppState>, work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
{
    let state = Arc::clone(state);
    tokio::task::spawn_blocking(move || work(&state)).await.map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("reading the prompt failed: {e}"), None, "internal")
    })?
}

/// Typed access to the fields of a request object; `null` counts as absent.
pub(super) struct Fields<'a>(pub(super) &'a Map<String, Value>);

impl Fields<'_> {
    pub(super) fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    pub(super) fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| ApiError::schema(key, format!("`{key}` must be a boolean"))))
            .transpose()
    }

    pub(super) fn int(&self, key: &str) -> Result<Option<i64>, ApiError> {
        self.get(key)
            .map(|v| {
                v.as_i64()
                    .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15).map(|f| f as i64))
                    .ok_or_else(|| ApiError::schema(key, format!("`{key}` must be an integer")))
            })
            .transpose()
    }

    pub(super) fn float(&self, key: &str) -> Result<Option<f64>, ApiError> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| ApiError::schema(key, format!("`{key}` must be a number"))))
            .transpose()
    }

    pub(super) fn string(&self, key: &str) -> Result<Option<&str>, ApiError> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| ApiError::schema(key, format!("`{key}` must be a string"))))
            .transpose()
    }
}

/// What a request asks, after checking.
pub(super) struct Common {
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    pub(super) n: usize,
    pub(super) max_tokens: Option<usize>,
    pub(super) sampling: SamplingParams,
    pub(super) stop: Vec<String>,
    pub(super) stop_token_ids: Vec<u32>,
    pub(super) ignore_eos: bool,
    pub(super) min_tokens: usize,
    pub(super) repetition_penalty: f32,
    pub(super) skip_special_tokens: bool,
    /// Top log-probs per token (`Some(0)`: the chosen token's only).
    pub(super) logprobs: Option<usize>,
    /// When the request must have ended.
    pub(super) deadline: Instant,
    /// Whether the request named its seed; without one, the server picks a fresh one per request.
    pub(super) seeded: bool,
}

/// `request_timeout` (seconds; an extension, like vLLM's extra sampling fields), at most the server's limit.
pub(super) fn request_timeout(intake: &Intake<'_>, f: &Fields<'_>) -> Result<Duration, ApiError> {
    let limit = intake.request_timeout;
    match f.float("request_timeout")? {
        None => Ok(limit),
        Some(t) if t.is_finite() && t > 0.0 => Ok(Duration::from_secs_f64(t.min(limit.as_secs_f64()))),
        Some(t) => Err(ApiError::invalid("request_timeout", format!("{t}: must be a positive number of seconds"))),
    }
}

pub(super) fn parse_common(intake: &Intake<'_>, f: &Fields<'_>, chat: bool) -> Result<Common, ApiError> {
    check_model(intake, f)?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o)
            .bool("include_usage")
            .map_err(|_| {
                ApiError::schema("stream_options.include_usage", "`stream_options.include_usage` must be a boolean")
            })?
            .unwrap_or(false),
        Some(_) => return Err(ApiError::schema("stream_options", "`stream_options` must be an object")),
    };
    let n = f.int("n")?.unwrap_or(1);
    if n < 1 {
        return Err(ApiError::invalid("n", format!("`n` must be at least 1, got {n}")));
    }
    if n as u64 > intake.max_choices as u64 {
        return Err(ApiError::invalid("n", format!("at most {} choices per request, got {n}", intake.max_choices)));
    }
    let max_key = if chat && f.get("max_completion_tokens").is_some() { "max_completion_tokens" } else { "max_tokens" };
    let max_tokens = match f.int(max_key)? {
        Some(v) if v <= 0 => {
            return Err(ApiError::invalid(max_key, format!("`{max_key}` must be at least 1, got {v}")))
        }
        Some(v) => Some(v as usize),
        None => None,
    };
    let g = intake.generation;
    let greedy_default = g.do_sample == Some(false);
    let temperature = match f.float("temperature")? {
        // Sampling divides by the temperature as an f32: one past f32's range would be infinite there.
        Some(t) if !(t.is_finite() && t >= 0.0 && t <= f32::MAX as f64) => {
            return Err(ApiError::invalid(
                "temperature",
                format!("`temperature` must be a number from 0 to {:e}, got {t}", f32::MAX),
            ))
        }
        // As vLLM does: a temperature this close to 0 is greedy (dividing logits by it would overflow).
        Some(t) if t < MIN_TEMPERATURE => 0.0,
        Some(t) => t as f32,
        None if greedy_default => 0.0,
        None => g.temperature.unwrap_or(1.0),
    };
    let top_p = match f.float("top_p")? {
        Some(p) if !(p > 0.0 && p <= 1.0) => {
            return Err(ApiError::invalid("top_p", format!("`top_p` must be in (0, 1], got {p}")))
        }
        Some(p) => p as f32,
        None => g.top_p.unwrap_or(1.0),
    };
    let top_k = match f.int("top_k")? {
        Some(k) if k < -1 => {
            return Err(ApiError::invalid("top_k", format!("`top_k` must be -1, 0 or positive, got {k}")))
        }
        Some(k) if k <= 0 => 0,
        Some(k) => k as usize,
        None => g.top_k.unwrap_or(0),
    };
    let seed = f.int("seed")?.map(|s| s as u64);
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::schema("stop", "`stop` must be a string or a list of strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::schema("stop", "`stop` must be a string or a list of strings")),
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    let stop_bytes: usize = stop.iter().map(String::len).sum();
    if stop.len() > MAX_STOP_STRINGS || stop_bytes > MAX_STOP_BYTES {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "at most {MAX_STOP_STRINGS} stop strings of {MAX_STOP_BYTES} bytes in all, got {} of {stop_bytes}",
                stop.len()
            ),
        ));
    }
    let stop_token_ids = match f.get("stop_token_ids") {
        None => Vec::new(),
        Some(Value::Array(a)) if a.len() > MAX_STOP_TOKEN_IDS => {
            return Err(ApiError::invalid(
                "stop_token_ids",
                format!("at most {MAX_STOP_TOKEN_IDS} stop token ids, got {}", a.len()),
            ))
        }
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_u64().filter(|&t| (t as usize) < intake.vocab_size).map(|t| t as u32).ok_or_else(|| {
                    ApiError::invalid("stop_token_ids", "`stop_token_ids` must be token ids of this model")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::schema("stop_token_ids", "`stop_token_ids` must be a list of integers")),
    };
    let min_tokens = match f.int("min_tokens")? {
        Some(v) if v < 0 => return Err(ApiError::invalid("min_tokens", "`min_tokens` must be ≥ 0")),
        v => v.unwrap_or(0) as usize,
    };
    let repetition_penalty = match f.float("repetition_penalty")? {
        // Applied as an f32: it must stay finite and above 0 there too.
        Some(p) if !(p.is_finite() && p as f32 > 0.0 && p <= f32::MAX as f64) => {
            return Err(ApiError::invalid(
                "repetition_penalty",
                format!("`repetition_penalty` must be above 0 and at most {:e}, got {p}", f32::MAX),
            ))
        }
        p => p.unwrap_or(1.0) as f32,
    };
    let logprobs = if chat {
        let on = f.bool("logprobs")?.unwrap_or(false);
        let top = f.int("top_logprobs")?;
        match top {
            Some(t) if !(0..=20).contains(&t) => {
                return Err(ApiError::invalid("top_logprobs", "`top_logprobs` must be between 0 and 20"))
            }
            Some(_) if !on => return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`")),
            _ => {}
        }
        on.then(|| top.unwrap_or(0) as usize)
    } else {
        // Completions: an integer (how many alternatives), or a boolean some clients send.
        match f.get("logprobs") {
            None | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(0),
            Some(_) => match f.int("logprobs")? {
                Some(t) if !(0..=20).contains(&t) => {
                    return Err(ApiError::invalid("logprobs", "`logprobs` must be between 0 and 20"))
                }
                t => t.map(|t| t as usize),
            },
        }
    };
    Ok(Common {
        stream,
        include_usage,
        n: n as usize,
        max_tokens,
        sampling: SamplingParams { temperature, top_p, top_k, seed: seed.unwrap_or(0) },
        stop,
        stop_token_ids,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
        min_tokens,
        repetition_penalty,
        skip_special_tokens: f.bool("skip_special_tokens")?.unwrap_or(true),
        logprobs,
        deadline: Instant::now() + request_timeout(intake, f)?,
        seeded: seed.is_some(),
    })
}

/// Prompts of a completions request: a string, a list of strings, a list of ids, or a list of lists of ids.
pub(super) fn parse_prompts(intake: &Intake<'_>, f: &Fields<'_>) -> Result<Vec<Vec<u32>>, ApiError> {
    let encode = |text: &str| {
        intake.tokenizer.encode(text, false).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("cannot tokenize the prompt: {e}"),
                Some("prompt"),
                "invalid_value",
            )
        })
    };
    let ids = |a: &[Value]| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .map(|v| {
                v.as_u64().filter(|&t| (t as usize) < intake.vocab_size).map(|t| t as u32).ok_or_else(|| {
                    ApiError::invalid(
                        "prompt",
                        format!("prompt token ids must be integers below {}", intake.vocab_size),
                    )
                })
            })
            .collect()
    };
    let schema = || {
        ApiError::schema(
            "prompt",
            "`prompt` must be a string, a list of strings, a list of token ids or a list of lists of token ids",
        )
    };
    let prompts = match f.get("prompt") {
        None => return Err(ApiError::schema("prompt", "`prompt` is required")),
        Some(Value::String(s)) => vec![encode(s)?],
        Some(Value::Array(a)) if a.is_empty() => return Err(ApiError::invalid("prompt", "`prompt` is empty")),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            a.iter().map(|v| encode(v.as_str().unwrap_or_default())).collect::<Result<_, _>>()?
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => vec![ids(a)?],
        Some(Value::Array(a)) if a.iter().all(Value::is_array) => {
            a.iter().map(|v| ids(v.as_array().map_or(&[][..], Vec::as_slice))).collect::<Result<_, _>>()?
        }
        Some(_) => return Err(schema()),
    };
    if prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::invalid("prompt", "a prompt has no tokens"));
    }
    Ok(prompts)
}

/// A chat request's conversation, as its template will render it.
pub(super) struct Conversation {
    pub(super) messages: Vec<Message>,
    pub(super) options: RenderOptions,
    /// The tools, when the request gives any.
    pub(super) tools: Option<Tools>,
}

impl Conversation {
    /// The tools the template is shown: none when `tool_choice` is "none", so that the model is not told of them.
    fn options(&self) -> RenderOptions {
        let mut options = self.options.clone();
        options.tools = match &self.tools {
            Some(t) if t.choice != ToolChoice::None => Some(t.list.clone()),
            _ => None,
        };
        options
    }

    /// Renders and tokenises the conversation, ending with the assistant's turn: the text and its ids.
    pub(super) fn encode(&self, intake: &Intake<'_>) -> Result<(String, Vec<u32>), ApiError> {
        let template = intake.chat_template.ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "this model has no chat template; use /v1/completions",
                Some("messages"),
                "invalid_value",
            )
        })?;
        // Each message's content is read as text: a special token a user types stays the characters it spells.
        template
            .encode_with(intake.tokenizer, &self.messages, true, &self.options())
            .map_err(|e| ApiError::invalid("messages", e.to_string()))
    }
}

pub(super) fn parse_messages(intake: &Intake<'_>, f: &Fields<'_>) -> Result<Vec<u32>, ApiError> {
    parse_conversation(f)?.encode(intake).map(|(_, ids)| ids)
}

pub(super) fn parse_conversation(f: &Fields<'_>) -> Result<Conversation, ApiError> {
    let tools = parse_tools(f)?;
    let kwargs = parse_template_kwargs(f)?;
    let Some(messages) = f.get("messages") else {
        return Err(ApiError::schema("messages", "`messages` is required"));
    };
    let list = messages.as_array().ok_or_else(|| ApiError::schema("messages", "`messages` must be a list"))?;
    if list.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` is empty"));
    }
    if list.len() > MAX_MESSAGES {
        return Err(ApiError::invalid("messages", format!("at most {MAX_MESSAGES} messages, got {}", list.len())));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let field = |k: &str| format!("messages[{i}].{k}");
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::schema(&field("role"), "each message needs a string `role`"))?;
        // The template writes the role into the prompt as it is: only the roles of the API, never arbitrary text.
        if !ROLES.contains(&role) {
            return Err(ApiError::invalid(
                &field("role"),
                format!("unknown role {role:?} (one of {})", ROLES.join(", ")),
            ));
        }
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            // Content parts: the text ones, joined (images are not for this model).
            Some(Value::Array(parts)) if parts.len() > MAX_CONTENT_PARTS => {
                return Err(ApiError::invalid(
                    &field("content"),
                    format!("at most {MAX_CONTENT_PARTS} content parts, got {}", parts.len()),
                ))
            }
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => return Err(ApiError::invalid(&field("content"), "only text content parts are supported")),
                    }
                }
                text
            }
            Some(_) => {
                return Err(ApiError::schema(&field("content"), "`content` must be a string or a list of parts"))
            }
        };
        let mut extra = Map::new();
        match (role, m.get("tool_calls")) {
            (_, None | Some(Value::Null)) => {}
            ("assistant", Some(calls)) => {
                extra.insert("tool_calls".into(), message_tool_calls(i, calls)?);
            }
            (_, Some(_)) => {
                return Err(ApiError::invalid(&field("tool_calls"), "only assistant messages carry tool calls"))
            }
        }
        for key in ["reasoning_content", "tool_call_id", "name"] {
            match m.get(key) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => {
                    extra.insert(key.into(), Value::String(s.clone()));
                }
                Some(_) => return Err(ApiError::schema(&field(key), format!("`{key}` must be a string"))),
            }
        }
        out.push(Message { role: role.to_owned(), content, extra });
    }
    Ok(Conversation { messages: out, options: RenderOptions { tools: None, kwargs }, tools })
}
