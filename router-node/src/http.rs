//! The OpenAI-compatible HTTP API (axum): `/v1/completions`, `/v1/chat/completions` (SSE with `stream: true`),
//! `/v1/models`, vLLM's `/tokenize` and `/detokenize`, probes (`/livez`, `/readyz`, `/health`, `/ready`) and
//! `/metrics`.
//!
//! Bodies are read under a size limit and parsed by hand from JSON values, so that every bad field gets an OpenAI
//! error naming it (`{"error": {"message", "type", "param", "code"}}`) and unknown fields are ignored. Each choice is
//! one engine sequence; dropping the response (a client that disconnects) drops the sequence's event channel, and the
//! engine frees its state at the next step.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use moe_model::{ChatTemplate, GenerationConfig, Message, SamplingParams, Tokenizer};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::engine::{EngineHandle, Finish, SequenceEvent, SequenceParams, SequenceRequest, SubmitError, TokenLogprob};

/// Settings of the HTTP front end.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The model id clients send and `/v1/models` lists (empty: the model directory's name).
    pub model_name: String,
    /// Accepted bearer tokens; empty means no authentication.
    pub api_keys: Vec<String>,
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Context length: prompt + max_tokens may not exceed it.
    pub max_model_len: usize,
    /// Most choices per request (`n` × prompts).
    pub max_choices: usize,
    /// The longest a request may take, queue included (also the most a request's own `request_timeout` may ask);
    /// past it the request ends with HTTP 503 or, streamed, a last SSE error event.
    pub request_timeout: Duration,
    /// SSE keep-alive comments, sent after this long without an event once a stream's first data event is out
    /// (never before it: some clients cannot parse a stream that begins with a comment).
    pub sse_keepalive: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            model_name: String::new(),
            api_keys: Vec::new(),
            max_body_bytes: 8 << 20,
            max_model_len: 4096,
            max_choices: 64,
            request_timeout: Duration::from_secs(600),
            sse_keepalive: Duration::from_secs(15),
        }
    }
}

/// Whether every routed expert has a reachable replica; `Err` says what is missing.
pub type ReadinessCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Everything a handler needs.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Option<Arc<ChatTemplate>>,
    pub generation: GenerationConfig,
    pub eos_ids: Vec<u32>,
    pub vocab_size: usize,
    pub config: ApiConfig,
    pub experts_ready: ReadinessCheck,
    pub draining: AtomicBool,
    pub created: u64,
    /// The experts on expert nodes, when they are there: their counters and placement epoch go to /metrics.
    pub remote: Option<Arc<crate::remote::RemoteExperts>>,
    next_id: AtomicU64,
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: EngineHandle,
        tokenizer: Arc<Tokenizer>,
        chat_template: Option<Arc<ChatTemplate>>,
        generation: GenerationConfig,
        eos_ids: Vec<u32>,
        vocab_size: usize,
        config: ApiConfig,
        experts_ready: ReadinessCheck,
    ) -> Self {
        AppState {
            engine,
            tokenizer,
            chat_template,
            generation,
            eos_ids,
            vocab_size,
            config,
            experts_ready,
            draining: AtomicBool::new(false),
            created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            remote: None,
            next_id: AtomicU64::new(1),
        }
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("model", &self.config.model_name).finish_non_exhaustive()
    }
}

/// The routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/ready", get(readyz))
        .route("/health", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route", None, "not_found") })
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------------------------
// Errors

/// An error in OpenAI's shape.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<String>,
    code: &'static str,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>, param: Option<&str>, code: &'static str) -> Self {
        ApiError { status, message: message.into(), param: param.map(str::to_owned), code, retry_after: None }
    }

    /// A value that is well-typed but not allowed.
    fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message, Some(param), "invalid_value")
    }

    /// A field of the wrong type, or a required one missing.
    fn schema(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, message, Some(param), "invalid_type")
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn body(&self) -> Value {
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

// ---------------------------------------------------------------------------------------------------------------
// Probes and metrics

/// Alive while the engine thread runs: a router whose engine died is restarted by its supervisor.
async fn livez(State(state): State<Arc<AppState>>) -> Response {
    if state.engine.is_alive() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the engine thread has stopped").into_response()
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    if !state.engine.is_alive() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the engine thread has stopped").into_response();
    }
    match (state.experts_ready)() {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let s = &state.engine.stats;
    let g = |v: u64| v.to_string();
    let lines = [
        (
            "moe_num_requests_running",
            "gauge",
            "Sequences in the running batch.",
            g(s.running.load(Ordering::Relaxed) as u64),
        ),
        (
            "moe_num_requests_waiting",
            "gauge",
            "Sequences waiting for admission.",
            g(s.waiting.load(Ordering::Relaxed) as u64),
        ),
        // vLLM's names for the same two gauges, for autoscalers and dashboards written against vLLM.
        (
            "vllm:num_requests_running",
            "gauge",
            "Sequences in the running batch (vLLM's name).",
            g(s.running.load(Ordering::Relaxed) as u64),
        ),
        (
            "vllm:num_requests_waiting",
            "gauge",
            "Sequences waiting for admission (vLLM's name).",
            g(s.waiting.load(Ordering::Relaxed) as u64),
        ),
        (
            "moe_state_bytes_reserved",
            "gauge",
            "Sequence state memory reserved (KV pages and DeltaNet slots).",
            g(s.state_bytes_reserved.load(Ordering::Relaxed)),
        ),
        ("moe_prompt_tokens_total", "counter", "Prompt tokens processed.", g(s.prompt_tokens.load(Ordering::Relaxed))),
        ("moe_generation_tokens_total", "counter", "Tokens generated.", g(s.generated_tokens.load(Ordering::Relaxed))),
        ("moe_engine_steps_total", "counter", "Forward steps.", g(s.steps.load(Ordering::Relaxed))),
        ("moe_requests_finished_total", "counter", "Sequences finished.", g(s.finished.load(Ordering::Relaxed))),
        (
            "moe_requests_cancelled_total",
            "counter",
            "Sequences cancelled (client gone or stop string).",
            g(s.cancelled.load(Ordering::Relaxed)),
        ),
        ("moe_requests_failed_total", "counter", "Sequences failed.", g(s.failed.load(Ordering::Relaxed))),
        (
            "moe_requests_shed_total",
            "counter",
            "Requests shed after waiting longer than the queue limit (HTTP 503 with Retry-After).",
            g(s.shed.load(Ordering::Relaxed)),
        ),
        (
            "moe_requests_expired_total",
            "counter",
            "Sequences ended by their deadline in the engine.",
            g(s.expired.load(Ordering::Relaxed)),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in lines {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    }
    if let Some(remote) = &state.remote {
        let r = &remote.stats;
        let remote_lines = [
            (
                "moe_placement_epoch",
                "gauge",
                "Placement epoch dispatches carry (0: static placement).",
                g(remote.epoch()),
            ),
            (
                "moe_expert_messages_total",
                "counter",
                "Messages answered by expert nodes.",
                g(r.messages.load(Ordering::Relaxed)),
            ),
            (
                "moe_expert_bytes_sent_total",
                "counter",
                "Activation bytes sent to expert nodes.",
                g(r.bytes_sent.load(Ordering::Relaxed)),
            ),
            (
                "moe_expert_bytes_received_total",
                "counter",
                "Partial-sum bytes received from expert nodes.",
                g(r.bytes_received.load(Ordering::Relaxed)),
            ),
            (
                "moe_expert_pieces_resent_total",
                "counter",
                "Pieces sent again elsewhere (node down, or no longer serving the piece's epoch or experts).",
                g(r.resent.load(Ordering::Relaxed)),
            ),
            (
                "moe_expert_holds_total",
                "counter",
                "Layer waits held because some expert had no live replica.",
                g(r.holds.load(Ordering::Relaxed)),
            ),
            (
                "moe_expert_holds_abandoned_total",
                "counter",
                "Holds given up (nobody waited any more, or the hold limit passed).",
                g(r.holds_abandoned.load(Ordering::Relaxed)),
            ),
            ("moe_expert_holding", "gauge", "Layer waits holding now.", g(r.holding.load(Ordering::Relaxed))),
            (
                "moe_expert_reconnects_total",
                "counter",
                "Links re-opened to expert nodes that had gone down.",
                g(r.reconnects.load(Ordering::Relaxed)),
            ),
        ];
        for (name, kind, help, value) in remote_lines {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
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
async fn tokenize(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, ApiError> {
    authorize(&state, req.headers())?;
    let body = read_json(&state, req).await?;
    let f = Fields(&body);
    check_model(&state, &f)?;
    let tokens = if f.get("messages").is_some() {
        parse_messages(&state, &f)?
    } else {
        let text =
            f.string("prompt")?.ok_or_else(|| ApiError::schema("prompt", "`prompt` or `messages` is required"))?;
        let special = f.bool("add_special_tokens")?.unwrap_or(true);
        state.tokenizer.encode(text, special).map_err(|e| ApiError::invalid("prompt", e.to_string()))?
    };
    Ok(axum::Json(json!({"count": tokens.len(), "max_model_len": state.config.max_model_len, "tokens": tokens}))
        .into_response())
}

/// vLLM's `/detokenize`: token ids to text.
async fn detokenize(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, ApiError> {
    authorize(&state, req.headers())?;
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

fn check_model(state: &AppState, f: &Fields<'_>) -> Result<(), ApiError> {
    match f.string("model")? {
        Some(model) if model != state.config.model_name => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the model `{model}` does not exist (this server serves `{}`)", state.config.model_name),
            Some("model"),
            "model_not_found",
        )),
        _ => Ok(()),
    }
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
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

// ---------------------------------------------------------------------------------------------------------------
// Request parsing

/// Reads the body under the size limit and parses it as a JSON object.
async fn read_json(state: &AppState, req: Request) -> Result<Map<String, Value>, ApiError> {
    let limit = state.config.max_body_bytes;
    let bytes = axum::body::to_bytes(req.into_body(), limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body exceeds {limit} bytes"),
            None,
            "payload_too_large",
        )
    })?;
    if std::str::from_utf8(&bytes).is_err() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the request body is not valid UTF-8",
            None,
            "invalid_json",
        ));
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => {
            Err(ApiError::new(StatusCode::BAD_REQUEST, "the request body must be a JSON object", None, "invalid_json"))
        }
        Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}"), None, "invalid_json")),
    }
}

/// Typed access to the fields of a request object; `null` counts as absent.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| ApiError::schema(key, format!("`{key}` must be a boolean"))))
            .transpose()
    }

    fn int(&self, key: &str) -> Result<Option<i64>, ApiError> {
        self.get(key)
            .map(|v| {
                v.as_i64()
                    .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15).map(|f| f as i64))
                    .ok_or_else(|| ApiError::schema(key, format!("`{key}` must be an integer")))
            })
            .transpose()
    }

    fn float(&self, key: &str) -> Result<Option<f64>, ApiError> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| ApiError::schema(key, format!("`{key}` must be a number"))))
            .transpose()
    }

    fn string(&self, key: &str) -> Result<Option<&str>, ApiError> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| ApiError::schema(key, format!("`{key}` must be a string"))))
            .transpose()
    }
}

/// What a request asks, after checking.
struct Common {
    stream: bool,
    include_usage: bool,
    n: usize,
    max_tokens: Option<usize>,
    sampling: SamplingParams,
    stop: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    min_tokens: usize,
    repetition_penalty: f32,
    skip_special_tokens: bool,
    /// Top log-probs per token (`Some(0)`: the chosen token's only).
    logprobs: Option<usize>,
    /// When the request must have ended.
    deadline: Instant,
}

/// `request_timeout` (seconds; an extension, like vLLM's extra sampling fields), at most the server's limit.
fn request_timeout(state: &AppState, f: &Fields<'_>) -> Result<Duration, ApiError> {
    let limit = state.config.request_timeout;
    match f.float("request_timeout")? {
        None => Ok(limit),
        Some(t) if t.is_finite() && t > 0.0 => Ok(Duration::from_secs_f64(t.min(limit.as_secs_f64()))),
        Some(t) => Err(ApiError::invalid("request_timeout", format!("{t}: must be a positive number of seconds"))),
    }
}

fn parse_common(state: &AppState, f: &Fields<'_>, chat: bool) -> Result<Common, ApiError> {
    check_model(state, f)?;
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
    let max_key = if chat && f.get("max_completion_tokens").is_some() { "max_completion_tokens" } else { "max_tokens" };
    let max_tokens = match f.int(max_key)? {
        Some(v) if v <= 0 => {
            return Err(ApiError::invalid(max_key, format!("`{max_key}` must be at least 1, got {v}")))
        }
        Some(v) => Some(v as usize),
        None => None,
    };
    let g = &state.generation;
    let greedy_default = g.do_sample == Some(false);
    let temperature = match f.float("temperature")? {
        Some(t) if !(t.is_finite() && t >= 0.0) => {
            return Err(ApiError::invalid("temperature", format!("`temperature` must be ≥ 0, got {t}")))
        }
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
    let stop_token_ids = match f.get("stop_token_ids") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_u64().filter(|&t| (t as usize) < state.vocab_size).map(|t| t as u32).ok_or_else(|| {
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
        Some(p) if !(p.is_finite() && p > 0.0) => {
            return Err(ApiError::invalid("repetition_penalty", format!("`repetition_penalty` must be > 0, got {p}")))
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
        deadline: Instant::now() + request_timeout(state, f)?,
    })
    .map(|mut c| {
        if seed.is_none() {
            // Unseeded sampling differs per request, as clients expect.
            c.sampling.seed = state.next_id.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        }
        c
    })
}

/// Prompts of a completions request: a string, a list of strings, a list of ids, or a list of lists of ids.
fn parse_prompts(state: &AppState, f: &Fields<'_>) -> Result<Vec<Vec<u32>>, ApiError> {
    let encode = |text: &str| {
        state.tokenizer.encode(text, false).map_err(|e| {
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
                v.as_u64().filter(|&t| (t as usize) < state.vocab_size).map(|t| t as u32).ok_or_else(|| {
                    ApiError::invalid("prompt", format!("prompt token ids must be integers below {}", state.vocab_size))
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

fn parse_messages(state: &AppState, f: &Fields<'_>) -> Result<Vec<u32>, ApiError> {
    let Some(messages) = f.get("messages") else {
        return Err(ApiError::schema("messages", "`messages` is required"));
    };
    let list = messages.as_array().ok_or_else(|| ApiError::schema("messages", "`messages` must be a list"))?;
    if list.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` is empty"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let field = |k: &str| format!("messages[{i}].{k}");
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::schema(&field("role"), "each message needs a string `role`"))?;
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            // Content parts: the text ones, joined (images are not for this model).
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
        out.push(Message { role: role.to_owned(), content });
    }
    let template = state.chat_template.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "this model has no chat template; use /v1/completions",
            Some("messages"),
            "invalid_value",
        )
    })?;
    let text = template
        .render(&out, true)
        .map_err(|e| ApiError::invalid("messages", format!("the chat template failed: {e}")))?;
    state.tokenizer.encode(&text, false).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("cannot tokenize the messages: {e}"),
            Some("messages"),
            "invalid_value",
        )
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Running choices

/// Text of one choice as it grows: incremental detokenisation and stop strings.
struct TextState {
    ids: Vec<u32>,
    /// The text of `ids[..read]`.
    text: String,
    /// `ids[prefix..read]` is already in `text` and is decoded again as context for the tokens after it, so that each
    /// token costs a decode of a few tokens, not of the whole output.
    prefix: usize,
    read: usize,
    /// Bytes of `text` already handed out.
    sent: usize,
    stop: Vec<String>,
    skip_special: bool,
}

impl TextState {
    fn new(stop: Vec<String>, skip_special: bool) -> Self {
        TextState { ids: Vec::new(), text: String::new(), prefix: 0, read: 0, sent: 0, stop, skip_special }
    }

    /// Decodes the tokens after `read` into `text`; unless `last`, waits while they end inside a UTF-8 sequence.
    fn advance(&mut self, tok: &Tokenizer, last: bool) {
        let before = tok.decode(&self.ids[self.prefix..self.read], self.skip_special).unwrap_or_default();
        let after = tok.decode(&self.ids[self.prefix..], self.skip_special).unwrap_or_default();
        if after.ends_with('\u{FFFD}') && !last {
            return;
        }
        match after.strip_prefix(before.as_str()) {
            Some(delta) => self.text.push_str(delta),
            // The context decoded differently once more tokens followed: decode everything once.
            None => self.text = tok.decode(&self.ids, self.skip_special).unwrap_or_default(),
        }
        self.prefix = self.read;
        self.read = self.ids.len();
    }

    /// Adds a token and returns the text that can be handed out now, and whether a stop string ended the choice
    /// (the stop string itself is not part of the text).
    fn push(&mut self, tok: &Tokenizer, id: u32) -> (String, bool) {
        self.ids.push(id);
        self.advance(tok, false);
        let text = &self.text;
        // A stop string can only end in text not yet handed out.
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(longest);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        if let Some(at) = self.stop.iter().filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i)).min() {
            let out = text.get(self.sent..at.max(self.sent)).unwrap_or_default().to_owned();
            self.sent = at.max(self.sent);
            return (out, true);
        }
        // Hold back a tail that may begin a stop string.
        let mut end = text.len();
        for s in &self.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                    end = end.min(text.len() - k);
                    break;
                }
            }
        }
        if end <= self.sent {
            return (String::new(), false);
        }
        let out = text[self.sent..end].to_owned();
        self.sent = end;
        (out, false)
    }

    /// The rest of the text when the choice ends without a stop string.
    fn flush(&mut self, tok: &Tokenizer) -> String {
        self.advance(tok, true);
        let out = self.text.get(self.sent..).unwrap_or_default().to_owned();
        self.sent = self.text.len();
        out
    }
}

/// What a choice produced so far, for non-streaming responses.
#[derive(Default)]
struct ChoiceResult {
    text: String,
    tokens: Vec<TokenLogprob>,
    prompt_logprobs: Vec<TokenLogprob>,
    finish: Option<&'static str>,
    completion_tokens: usize,
}

/// One piece of a choice's progress, for streaming.
enum Delta {
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
    },
    /// The sequence ended without finishing; nothing follows.
    Failed(ApiError),
}

struct ChoiceSpec {
    prompt: Vec<u32>,
    params: SequenceParams,
    stop: Vec<String>,
    skip_special: bool,
    deadline: Instant,
}

fn unavailable(message: impl Into<String>, code: &'static str) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message, None, code)
}

/// Waits until the engine admits the choice (it left the queue), so that a request shed from the queue gets its
/// status code (503 with `Retry-After`) before a stream's headers go out.
async fn admitted(mut rx: mpsc::Receiver<Delta>) -> Result<mpsc::Receiver<Delta>, ApiError> {
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
fn start_choice(state: &Arc<AppState>, spec: ChoiceSpec) -> Result<mpsc::Receiver<Delta>, ApiError> {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let prompt_tokens = spec.prompt.len();
    let deadline = spec.deadline;
    let submitted = Instant::now();
    let timeout = deadline.saturating_duration_since(submitted);
    let admit_by = submitted + state.engine.max_queue_wait();
    state
        .engine
        .submit(SequenceRequest {
            prompt: spec.prompt,
            params: spec.params,
            events: events_tx,
            cancel: Arc::clone(&cancel),
            deadline: Some(deadline),
            submitted,
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
    tokio::spawn(async move {
        let mut pending_logprobs: Vec<TokenLogprob> = Vec::new();
        let mut admitted = false;
        loop {
            let event = tokio::select! {
                e = events.recv() => e,
                // The client is gone: stop the sequence now rather than at its next token.
                _ = tx.closed() => { cancel.store(true, Ordering::Release); return; }
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
            admitted |= matches!(event, Some(SequenceEvent::Admitted));
            let delta = match event {
                Some(SequenceEvent::Admitted) => Delta::Admitted,
                Some(SequenceEvent::PromptLogprobs(lp)) => Delta::PromptLogprobs(lp),
                Some(SequenceEvent::Token { id, logprob }) => {
                    let (piece, stopped) = text.push(&tokenizer, id);
                    pending_logprobs.extend(logprob);
                    if stopped {
                        cancel.store(true, Ordering::Release);
                        let _ =
                            tx.send(Delta::Text { text: piece, logprobs: std::mem::take(&mut pending_logprobs) }).await;
                        let _ = tx
                            .send(Delta::Finished { reason: "stop", prompt_tokens, completion_tokens: text.ids.len() })
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
                    let reason = match reason {
                        Finish::Stop => "stop",
                        Finish::Length => "length",
                    };
                    let _ = tx.send(Delta::Finished { reason, prompt_tokens, completion_tokens }).await;
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
                return;
            }
            if last {
                return;
            }
        }
    });
    Ok(rx)
}

fn shed(waited: Duration) -> ApiError {
    ApiError {
        retry_after: Some(1),
        ..unavailable(
            format!("the server is overloaded: the request waited {waited:.1?} for a slot; retry later"),
            "overloaded",
        )
    }
}

fn expired(timeout: Duration) -> ApiError {
    unavailable(format!("the request did not finish within its timeout of {timeout:.1?}"), "timeout")
}

fn sequence_params(state: &AppState, c: &Common, max_tokens: usize, prompt_logprobs: bool) -> SequenceParams {
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

/// The max_tokens to use, checked against the context length.
fn budget(
    state: &AppState,
    c: &Common,
    prompt_len: usize,
    default: Option<usize>,
    param: &str,
) -> Result<usize, ApiError> {
    let ctx = state.config.max_model_len;
    let max_tokens = c.max_tokens.or(default).unwrap_or_else(|| ctx.saturating_sub(prompt_len));
    if prompt_len + max_tokens > ctx || max_tokens == 0 {
        return Err(ApiError::invalid(
            param,
            format!(
                "this model's maximum context length is {ctx} tokens; the request asks for {} ({prompt_len} in the \
                 prompt, {max_tokens} to generate)",
                prompt_len + max_tokens
            ),
        ));
    }
    Ok(max_tokens)
}

fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------------------------------------------
// /v1/completions

async fn completions(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, ApiError> {
    authorize(&state, req.headers())?;
    let body = read_json(&state, req).await?;
    let f = Fields(&body);
    let common = parse_common(&state, &f, false)?;
    let prompts = parse_prompts(&state, &f)?;
    let echo = f.bool("echo")?.unwrap_or(false);
    if prompts.len() * common.n > state.config.max_choices {
        return Err(ApiError::invalid("n", format!("at most {} choices per request", state.config.max_choices)));
    }
    let mut receivers = Vec::new();
    for prompt in &prompts {
        let max_tokens = budget(&state, &common, prompt.len(), Some(16), "max_tokens")?;
        for j in 0..common.n {
            let mut params = sequence_params(&state, &common, max_tokens, echo && common.logprobs.is_some());
            params.sampling.seed = params.sampling.seed.wrapping_add(j as u64);
            receivers.push((
                prompt.clone(),
                start_choice(
                    &state,
                    ChoiceSpec {
                        prompt: prompt.clone(),
                        params,
                        stop: common.stop.clone(),
                        skip_special: common.skip_special_tokens,
                        deadline: common.deadline,
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
                    Delta::Finished { reason, prompt_tokens, completion_tokens } => {
                        // A prompt counts once however many choices it has, as in the non-streamed usage.
                        tally.finished(if index % n == 0 { prompt_tokens } else { 0 }, completion_tokens);
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
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for (index, (prompt, r)) in results.into_iter().enumerate() {
        let r = r?;
        if index % common.n == 0 {
            prompt_tokens += prompt.len();
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
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    }))
    .into_response())
}

/// Waits for a choice to end.
async fn collect(mut rx: mpsc::Receiver<Delta>, prompt: Vec<u32>) -> (Vec<u32>, Result<ChoiceResult, ApiError>) {
    let mut r = ChoiceResult::default();
    while let Some(delta) = rx.recv().await {
        match delta {
            Delta::Text { text, logprobs } => {
                r.text.push_str(&text);
                r.tokens.extend(logprobs);
            }
            Delta::PromptLogprobs(lp) => r.prompt_logprobs = lp,
            Delta::Finished { reason, completion_tokens, .. } => {
                r.finish = Some(reason);
                r.completion_tokens = completion_tokens;
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
fn completion_logprobs(tok: &Tokenizer, lps: &[TokenLogprob], offset: usize) -> Value {
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

/// The chat `logprobs` object.
fn chat_logprobs(tok: &Tokenizer, lps: &[TokenLogprob]) -> Value {
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

/// What a streaming response has seen, for its last events.
#[derive(Default)]
struct StreamTally {
    failed: AtomicBool,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

impl StreamTally {
    fn finished(&self, prompt_tokens: usize, completion_tokens: usize) {
        self.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        self.completion_tokens.fetch_add(completion_tokens as u64, Ordering::Relaxed);
    }

    /// The event that ends a stream whose sequence failed; nothing follows it.
    fn error_event(&self, e: ApiError) -> Event {
        self.failed.store(true, Ordering::Release);
        Event::default().data(e.body().to_string())
    }
}

/// The events after the choices: a chunk with the usage when asked, then `[DONE]`; none after an error event.
fn stream_tail(
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
            let p = tally.prompt_tokens.load(Ordering::Relaxed);
            let c = tally.completion_tokens.load(Ordering::Relaxed);
            let usage = json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});
            let chunk =
                json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage});
            out.push(Event::default().data(chunk.to_string()));
        }
        out.push(Event::default().data("[DONE]"));
        futures::stream::iter(out)
    })
    .flatten()
}

fn sse(
    events: impl futures::Stream<Item = Event> + Send + 'static,
    tail: impl futures::Stream<Item = Event> + Send + 'static,
    keepalive: Duration,
) -> Response {
    let stream = keep_alive_after_first(events.chain(tail), keepalive).map(Ok::<_, std::convert::Infallible>);
    Sse::new(stream).into_response()
}

/// `events`, with an SSE comment after every `interval` without an event, once the first event has gone out.
fn keep_alive_after_first(
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

// ---------------------------------------------------------------------------------------------------------------
// /v1/chat/completions

async fn chat_completions(State(state): State<Arc<AppState>>, req: Request) -> Result<Response, ApiError> {
    authorize(&state, req.headers())?;
    let body = read_json(&state, req).await?;
    let f = Fields(&body);
    let common = parse_common(&state, &f, true)?;
    let prompt = parse_messages(&state, &f)?;
    if common.n > state.config.max_choices {
        return Err(ApiError::invalid("n", format!("at most {} choices per request", state.config.max_choices)));
    }
    let param = if f.get("max_completion_tokens").is_some() { "max_completion_tokens" } else { "max_tokens" };
    let max_tokens = budget(&state, &common, prompt.len(), None, param)?;
    let mut receivers = Vec::new();
    for j in 0..common.n {
        let mut params = sequence_params(&state, &common, max_tokens, false);
        params.sampling.seed = params.sampling.seed.wrapping_add(j as u64);
        receivers.push(start_choice(
            &state,
            ChoiceSpec {
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

/// Serves `app` on `listener` until `shutdown` resolves; requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen35/tokenizer.json");
        Tokenizer::from_file(&path).expect("the fixture's tokenizer")
    }

    fn ids(n: usize, seed: u32) -> Vec<u32> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x % 300
            })
            .collect()
    }

    #[test]
    fn incremental_text_equals_one_decode() {
        let tok = tokenizer();
        for seed in 1..40 {
            let ids = ids(60, seed);
            for skip in [true, false] {
                let mut t = TextState::new(Vec::new(), skip);
                let mut out = String::new();
                for &id in &ids {
                    let (piece, stopped) = t.push(&tok, id);
                    assert!(!stopped);
                    assert!(
                        !piece.contains('\u{FFFD}') || tok.decode(&ids, skip).expect("decodes").contains('\u{FFFD}')
                    );
                    out.push_str(&piece);
                }
                out.push_str(&t.flush(&tok));
                assert_eq!(out, tok.decode(&ids, skip).expect("decodes"), "seed {seed}");
            }
        }
    }

    #[test]
    fn stop_strings_cut_the_text_before_them() {
        let tok = tokenizer();
        let ids = ids(80, 7);
        let full = tok.decode(&ids, true).expect("decodes");
        let cut = full.char_indices().nth(20).map(|(i, _)| i).expect("long enough");
        let stop: String = full[cut..].chars().take(3).collect();
        let first = full.find(&stop).expect("present");
        let mut t = TextState::new(vec!["never-there".into(), stop.clone()], true);
        let mut out = String::new();
        for &id in &ids {
            let (piece, stopped) = t.push(&tok, id);
            out.push_str(&piece);
            if stopped {
                assert_eq!(out, full[..first]);
                return;
            }
        }
        panic!("the stop string {stop:?} was not seen in {full:?}");
    }
}
