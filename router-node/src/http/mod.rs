//! The OpenAI-compatible HTTP API (axum): `/v1/completions`, `/v1/chat/completions` (SSE with `stream: true`),
//! `/v1/models`, vLLM's `/tokenize` and `/detokenize`, probes (`/livez`, `/readyz`, `/health`, `/ready`),
//! `/metrics` and the live `/dashboard`.
//!
//! Bodies are read under a size limit and parsed by hand from JSON values, so that every bad field gets an OpenAI
//! error naming it (`{"error": {"message", "type", "param", "code"}}`) and unknown fields are ignored. Each choice is
//! one engine sequence; dropping the response (a client that disconnects) drops the sequence's event channel, and the
//! engine frees its state at the next step.

mod auth;
mod chat;
mod choices;
mod completions;
mod dashboard;
mod error;
mod info;
mod parse;
mod plan;
mod probes;
mod stream;
mod text;
mod tools;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use moe_model::{ChatTemplate, GenerationConfig, Tokenizer};

use crate::engine::EngineHandle;
use crate::output::ToolFormat;

use chat::chat_completions;
use completions::completions;
use info::{detokenize, models, tokenize};
use probes::{livez, metrics, readyz, status};

pub use error::ApiError;
pub use parse::Intake;
pub use plan::{read_request, Endpoint, RequestShape};
pub use tools::ChatParsers;

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
    /// The longest a request body may take to arrive (408 beyond).
    pub body_read_timeout: Duration,
    /// Connections and header reads.
    pub connections: ConnectionLimits,
    /// SSE keep-alive comments, sent after this long without an event once a stream's first data event is out
    /// (never before it: some clients cannot parse a stream that begins with a comment).
    pub sse_keepalive: Duration,
    /// The tool-call form read from chat output.
    pub tool_call_parser: ParserChoice<ToolFormat>,
    /// Whether `<think>…</think>` goes to `reasoning_content`.
    pub reasoning_parser: ParserChoice<()>,
    /// Constrained decoding (`response_format`, `structured_outputs`, required tool calls); off refuses them.
    pub structured_outputs: bool,
}

/// A parser setting: what the chat template says, a given one, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParserChoice<T> {
    Auto,
    Use(T),
    Off,
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
            body_read_timeout: Duration::from_secs(30),
            connections: ConnectionLimits::default(),
            tool_call_parser: ParserChoice::Auto,
            reasoning_parser: ParserChoice::Auto,
            structured_outputs: true,
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
    /// vLLM's per-request series, recorded as sequences run.
    pub requests: crate::metrics::RequestMetrics,
    /// How chat output is read: set from the template at construction, overridden by the flags.
    pub parsers: ChatParsers,
    /// Constrained decoding over the model's vocabulary (`None`: constrained requests are refused).
    pub guides: Option<Arc<crate::guide::Guides>>,
    /// The dashboard's last minutes.
    history: dashboard::History,
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
        let requests = crate::metrics::RequestMetrics::new(config.max_model_len);
        let from_template = ChatParsers::of_template(chat_template.as_deref());
        let parsers = ChatParsers {
            tool_format: match config.tool_call_parser {
                ParserChoice::Auto => from_template.tool_format,
                ParserChoice::Use(format) => Some(format),
                ParserChoice::Off => None,
            },
            reasoning: match config.reasoning_parser {
                ParserChoice::Auto => from_template.reasoning,
                ParserChoice::Use(()) => true,
                ParserChoice::Off => false,
            },
        };
        AppState {
            parsers,
            guides: None,
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
            requests,
            history: dashboard::History::default(),
            next_id: AtomicU64::new(1),
        }
    }
}

impl AppState {
    /// What reading a request needs.
    pub fn intake(&self) -> Intake<'_> {
        Intake {
            model_name: &self.config.model_name,
            tokenizer: &self.tokenizer,
            chat_template: self.chat_template.as_deref(),
            generation: &self.generation,
            vocab_size: self.vocab_size,
            max_model_len: self.config.max_model_len,
            max_choices: self.config.max_choices,
            request_timeout: self.config.request_timeout,
            parsers: self.parsers,
            guides: self.guides.as_deref(),
        }
    }

    /// Gives an unseeded request a seed of its own: unseeded sampling differs per request, as clients expect.
    fn seed(&self, common: &mut parse::Common) {
        if !common.seeded {
            common.sampling.seed =
                self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    ^ SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
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
    // With API keys, everything but the probes needs one; the probes say only whether the router is alive or ready.
    let guarded = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key));
    // The dashboard takes the key from the query too: a browser cannot add a header to a navigation.
    let dashboard = Router::new()
        .route("/dashboard", get(dashboard::page))
        .route("/dashboard/data", get(dashboard::data))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key))
        .route_layer(axum::middleware::from_fn(dashboard::key_from_query));
    dashboard::start_sampling(&state);
    Router::new()
        .merge(guarded)
        .merge(dashboard)
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/ready", get(readyz))
        .route("/health", get(readyz))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route", None, "not_found") })
        .with_state(state)
}

/// What one connection may hold.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections at most; one more is closed as soon as it is accepted (a flood of idle sockets cannot
    /// take the router's memory or descriptors).
    pub max_connections: usize,
    /// The longest a client may take to send a request's headers, and to start the next request on a kept-alive
    /// connection: a slowloris client holds a connection no longer than this.
    pub header_read_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits { max_connections: 4096, header_read_timeout: Duration::from_secs(30) }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves; requests in flight finish (streams included), idle
/// connections are closed. HTTP/1.1 and HTTP/2 (prior knowledge), within `limits`; request bodies have their own
/// read timeout ([`ApiConfig::body_read_timeout`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;
    use hyper_util::service::TowerToHyperService;

    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(Duration::from_secs(20)));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors, most likely: wait for some to be freed rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "{} connections are open: connection closed", limits.max_connections);
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
        let service = TowerToHyperService::new(app.clone());
        let connection =
            graceful.watch(builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned());
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
