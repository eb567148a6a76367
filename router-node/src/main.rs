//! `router-node`: the OpenAI-compatible server, with the routed experts on expert nodes (or in this process).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use moe_config::ConfigError;
use moe_model::Residency;
use moe_proto::v1::{Dtype, Reduce};
use router_node::cluster::ClusterOptions;
use router_node::engine::EngineConfig;
use router_node::http::{ApiConfig, ParserChoice};
use router_node::output::ToolFormat;
use router_node::remote::RemoteOptions;
use router_node::server::{ExpertsAt, RouterOptions, ServeConfig};

/// Serves a Qwen3.5-MoE / Qwen3-Next model over an OpenAI-compatible HTTP API (/v1/completions,
/// /v1/chat/completions, /v1/models, /livez, /readyz, /health, /metrics) with continuous batching. The routed
/// experts are computed on the expert nodes named by --experts-at, or in this process without it.
///
/// Every setting can also come from a TOML file (--config; keys are the flags' names) or from the MOE_*
/// variables shown; flags override the environment, which overrides the file. --print-config shows the result.
#[derive(Debug, Parser, serde::Serialize, serde::Deserialize)]
#[command(version)]
#[serde(default, rename_all = "kebab-case")]
struct Args {
    #[command(flatten)]
    #[serde(skip)]
    config: moe_config::ConfigFile,
    /// Model directory: config.json, the safetensors checkpoint, tokenizer.json (required).
    #[arg(long, env = "MOE_MODEL")]
    model: Option<PathBuf>,
    /// Address to serve HTTP on; port 0 picks a free one.
    #[arg(long, env = "MOE_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Port to serve HTTP on (replaces the port of --listen).
    #[arg(long, env = "MOE_PORT")]
    port: Option<u16>,
    /// Expert nodes (host:port, comma-separated) that together host every routed expert; without it the experts are
    /// loaded in this process.
    #[arg(long, env = "MOE_EXPERTS_AT", value_delimiter = ',', conflicts_with = "etcd")]
    experts_at: Vec<String>,
    /// Join the cluster whose state is in this etcd (`host:port[,host:port...]`): the experts are wherever the
    /// cluster's controller places them, and this router stands for election as that controller.
    #[arg(long, env = "MOE_ETCD")]
    etcd: Option<String>,
    /// Name of the cluster in etcd (with --etcd).
    #[arg(long, env = "MOE_CLUSTER", default_value = "default")]
    cluster: String,
    /// This router's member id in the cluster [default: router-HOSTNAME-PORT].
    #[arg(long, env = "MOE_NODE_ID")]
    node_id: Option<String>,
    /// Seconds of the membership lease (with --etcd); a router that dies is out within this time.
    #[arg(long, default_value_t = 3)]
    lease_ttl_secs: u64,
    /// Do not stand for election as the placement controller (with --etcd).
    #[arg(long)]
    no_controller: bool,
    /// Element type on the wire to expert nodes: f32 keeps single-process results; bf16 halves the bytes.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    wire_dtype: String,
    /// Where a token's expert outputs are added up. router: nodes answer each expert's output and the router adds
    /// them in expert order, so results are the same bits under every placement and after any move to a replica;
    /// node: each node answers one sum per token, top-k / nodes-visited times fewer bytes back, but a token's last
    /// bits then follow the placement.
    #[arg(long, default_value = "router", value_parser = ["router", "node"])]
    combine: String,
    /// How tool calls in chat output are read: auto (the form the chat template teaches), qwen3_xml (Qwen3.5's
    /// `<function=…>` form), hermes (`<tool_call>{json}</tool_call>`), or none (tool calls stay text).
    #[arg(long, default_value = "auto", value_parser = ["auto", "qwen3_xml", "hermes", "none"])]
    tool_call_parser: String,
    /// How reasoning is read: auto (on when the chat template writes `<think>`), qwen3 (`<think>…</think>` into
    /// `reasoning_content`), or none (reasoning stays in `content`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "qwen3", "none"])]
    reasoning_parser: String,
    /// Refuse `response_format`, `structured_outputs` / `guided_*` and required tool calls instead of constraining
    /// the output to them.
    #[arg(long)]
    no_structured_outputs: bool,
    /// Accepted API key (repeatable; also MOE_API_KEYS, comma-separated). Without any, no authentication.
    #[arg(long = "api-key", env = "MOE_API_KEYS", value_delimiter = ',')]
    api_keys: Vec<String>,
    /// Model id clients use [default: the model directory's name].
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most tokens per forward step (decode tokens plus prompt chunks).
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// Do not keep prompt-prefix states: every request feeds its whole prompt. (The cache is exact, lives in what the
    /// state budget leaves free, and gives way to requests; this is for measuring without it.)
    #[arg(long)]
    no_prefix_caching: bool,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 256)]
    max_running: usize,
    /// Most requests waiting for admission; more get HTTP 429.
    #[arg(long, default_value_t = 1024)]
    max_queue: usize,
    /// Memory for sequence state (KV pages, DeltaNet slots), GiB.
    #[arg(long, default_value_t = 4.0)]
    state_budget_gib: f64,
    /// The longest a request may take, queue included; a request's `request_timeout` field may ask for less. Past
    /// it the request ends with HTTP 503 (or a last SSE error event).
    #[arg(long, default_value_t = 600.0)]
    request_timeout_secs: f64,
    /// The longest a request waits for admission before it is shed with HTTP 503 and `Retry-After`.
    #[arg(long, default_value_t = 60.0)]
    max_queue_wait_secs: f64,
    /// Seconds without an event after which a stream gets an SSE keep-alive comment (only after its first event).
    #[arg(long, default_value_t = 15.0)]
    sse_keepalive_secs: f64,
    /// Seconds a client may take to send a request's headers (and to start its next request on a kept-alive
    /// connection) before the connection is closed.
    #[arg(long, default_value_t = 30.0)]
    header_read_timeout_secs: f64,
    /// Seconds a request body may take to arrive (408 beyond).
    #[arg(long, default_value_t = 30.0)]
    body_read_timeout_secs: f64,
    /// Open HTTP connections at most; more are closed as they are accepted.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// The longest a step waits for experts that lost their last live replica (a repair epoch, or the node back).
    #[arg(long, default_value_t = 600.0)]
    hold_timeout_secs: f64,
    /// The longest one expert node may take to answer a piece of a step; past it the node is suspect and the piece
    /// goes to a replica if one exists (else to the same node again).
    #[arg(long, default_value_t = 60.0)]
    expert_deadline_secs: f64,
    /// Hedging: a piece unanswered after this many milliseconds, and 8 times what its node's recent answers say it
    /// should take, is copied to other replicas when all its experts have one, and the first whole answer is used
    /// (a frozen node then costs about this, not the keepalive's 7 s). 0: no hedging.
    #[arg(long, default_value_t = 250)]
    hedge_min_ms: u64,
    /// After SIGTERM / Ctrl-C: seconds requests in flight may take to finish before the router exits anyway (a
    /// second signal exits at once).
    #[arg(long, default_value_t = 30.0)]
    shutdown_grace_secs: f64,
    /// Micro-batches per step: with expert nodes on other machines, 2 overlaps attention with expert work.
    #[arg(long, default_value_t = 1)]
    micro_batches: usize,
    /// Context length limit [default: the model's max_position_embeddings].
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Where the router's layers run: `cpu`, or `cuda[:0,1,...]` in builds with the CUDA backend (the first GPU
    /// listed; without --experts-at and --etcd the routed experts go on every GPU listed).
    #[arg(long, env = "MOE_DEVICE", default_value = "cpu")]
    device: String,
    /// Serve weights from the file mapping instead of copying them into memory.
    #[arg(long)]
    mapped: bool,
    #[command(flatten)]
    #[serde(flatten)]
    cpu: moe_model::cpu::CpuArgs,
    #[command(flatten)]
    #[serde(flatten)]
    trace: moe_telemetry::trace::TraceArgs,
    #[command(flatten)]
    #[serde(flatten)]
    tls: moe_tls::TlsArgs,
}

impl Default for Args {
    fn default() -> Self {
        moe_config::defaults()
    }
}

impl moe_config::Settings for Args {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.model.is_none() {
            return Err(ConfigError::refused("model", "required (--model, MOE_MODEL, or `model` in the config file)"));
        }
        if self.etcd.is_some() && !self.experts_at.is_empty() {
            return Err(ConfigError::refused(
                "experts-at",
                "not with `etcd`: the cluster's controller places the experts",
            ));
        }
        for (key, v) in [
            ("max-batch-tokens", self.max_batch_tokens),
            ("max-running", self.max_running),
            ("micro-batches", self.micro_batches),
            ("max-connections", self.max_connections),
        ] {
            if v == 0 {
                return Err(ConfigError::refused(key, "must be positive"));
            }
        }
        for (key, v) in [
            ("state-budget-gib", self.state_budget_gib),
            ("request-timeout-secs", self.request_timeout_secs),
            ("max-queue-wait-secs", self.max_queue_wait_secs),
            ("sse-keepalive-secs", self.sse_keepalive_secs),
            ("header-read-timeout-secs", self.header_read_timeout_secs),
            ("body-read-timeout-secs", self.body_read_timeout_secs),
            ("hold-timeout-secs", self.hold_timeout_secs),
            ("expert-deadline-secs", self.expert_deadline_secs),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(ConfigError::refused(key, format!("{v}: must be a positive number")));
            }
        }
        if !(self.shutdown_grace_secs.is_finite() && self.shutdown_grace_secs >= 0.0) {
            return Err(ConfigError::refused("shutdown-grace-secs", "must be zero or more"));
        }
        if self.wire_dtype != "f32" && self.wire_dtype != "bf16" {
            return Err(ConfigError::refused("wire-dtype", format!("{:?}: f32 or bf16", self.wire_dtype)));
        }
        if !["auto", "qwen3_xml", "hermes", "none"].contains(&self.tool_call_parser.as_str()) {
            return Err(ConfigError::refused(
                "tool-call-parser",
                format!("{:?}: auto, qwen3_xml, hermes or none", self.tool_call_parser),
            ));
        }
        if !["auto", "qwen3", "none"].contains(&self.reasoning_parser.as_str()) {
            return Err(ConfigError::refused(
                "reasoning-parser",
                format!("{:?}: auto, qwen3 or none", self.reasoning_parser),
            ));
        }
        if self.combine != "router" && self.combine != "node" {
            return Err(ConfigError::refused("combine", format!("{:?}: router or node", self.combine)));
        }
        if self.has_links() {
            self.tls.files("a router with remote experts")?;
        }
        Ok(())
    }
}

impl Args {
    /// Whether the router talks to expert nodes (and so needs TLS settings).
    fn has_links(&self) -> bool {
        self.etcd.is_some() || !self.experts_at.is_empty()
    }
}

fn main() -> ExitCode {
    // Fault injection from FAILPOINTS, in the builds the fault tests run only.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let loaded = moe_config::load::<Args>(|a| &a.config);
    // Logs (and traces, when asked) from here on; flushed when `_telemetry` drops, after the runtimes have stopped.
    let _telemetry = match &loaded {
        Ok((args, _)) => {
            match moe_telemetry::trace::init("info", &args.trace.options("router-node", args.node_id.clone())) {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        Err(_) => None,
    };
    match loaded.map_err(anyhow::Error::from).and_then(|(args, file)| run(args, &file)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(mut args: Args, file: &moe_config::ConfigFile) -> Result<()> {
    if file.print_config {
        let shown = Args { api_keys: vec!["<redacted>".into(); args.api_keys.len()], ..args };
        print!("{}", moe_config::ConfigFile::print(&shown)?);
        return Ok(());
    }
    if let Some(port) = args.port {
        args.listen.set_port(port);
    }
    let options = options(&args)?;
    let model = options.model.clone();
    let identity = match &options.experts {
        ExpertsAt::Nodes(_, remote) | ExpertsAt::Cluster(_, remote) => remote.tls.clone(),
        ExpertsAt::Local => None,
    };
    args.cpu.apply()?;
    // Bind before loading, so that a taken port fails at once.
    let listener =
        std::net::TcpListener::bind(args.listen).with_context(|| format!("cannot listen on {}", args.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let prepared = router_node::server::prepare(options, &|_, _| {})
        .with_context(|| format!("starting the router for {}", model.display()))?;
    let config = ServeConfig {
        node_id: args.node_id.clone().unwrap_or_else(|| moe_placement::default_member_id("router", addr.port())),
        grace: Duration::from_secs_f64(args.shutdown_grace_secs.max(0.0)),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    if let Some(identity) = &identity {
        let _runtime = runtime.enter();
        identity.watch();
    }
    let served = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        println!("listening on http://{addr}");
        router_node::server::run(prepared, listener, config, moe_telemetry::shutdown_signal()).await?;
        anyhow::Ok(())
    });
    // Tasks still running (a store call that does not return) do not hold the exit up.
    runtime.shutdown_timeout(Duration::from_secs(1));
    served
}

/// What the router runs with; `args` is validated.
fn options(args: &Args) -> Result<RouterOptions> {
    let device: moe_cuda::Device = args.device.parse()?;
    if let moe_cuda::Device::Cuda(ordinals) = &device {
        for found in moe_cuda::probe(ordinals).with_context(|| format!("--device {device}"))? {
            tracing::info!(device = %found, "CUDA device found");
        }
    }
    let wire = if args.wire_dtype == "bf16" { Dtype::Bf16 } else { Dtype::F32 };
    let secs = |name: &str, v: f64| {
        if v.is_finite() && v > 0.0 {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(anyhow::anyhow!("--{name} {v}: must be a positive number of seconds"))
        }
    };
    let tls = match args.has_links() {
        true => args.tls.load(&[moe_tls::Role::Router], "a router with remote experts")?,
        false => None,
    };
    let remote = RemoteOptions {
        tls,
        wire_dtype: wire,
        reduce: if args.combine == "node" { Reduce::Token } else { Reduce::Pair },
        hold_timeout: secs("hold-timeout-secs", args.hold_timeout_secs)?,
        deadline: secs("expert-deadline-secs", args.expert_deadline_secs)?,
        hedge_min: (args.hedge_min_ms > 0).then(|| Duration::from_millis(args.hedge_min_ms)),
        ..RemoteOptions::default()
    };
    let experts = if let Some(etcd) = &args.etcd {
        let cluster = ClusterOptions {
            etcd: Some(etcd.clone()),
            cluster: args.cluster.clone(),
            lease_ttl: std::time::Duration::from_secs(args.lease_ttl_secs.max(1)),
            controller: !args.no_controller,
            // What the router shows an `https://` etcd, followed through each reload of its files.
            etcd_tls: remote.tls.as_ref().map(moe_placement::EtcdTls::of),
            ..ClusterOptions::default()
        };
        ExpertsAt::Cluster(cluster, remote)
    } else if args.experts_at.is_empty() {
        ExpertsAt::Local
    } else {
        ExpertsAt::Nodes(args.experts_at.clone(), remote)
    };
    Ok(RouterOptions {
        model: args.model.clone().context("no model")?,
        residency: if args.mapped { Residency::Mapped } else { Residency::Resident },
        experts,
        device,
        engine: EngineConfig {
            max_batch_tokens: args.max_batch_tokens,
            max_running: args.max_running,
            max_queue: args.max_queue,
            state_budget_bytes: (args.state_budget_gib * (1u64 << 30) as f64) as u64,
            micro_batches: args.micro_batches,
            max_queue_wait: secs("max-queue-wait-secs", args.max_queue_wait_secs)?,
            prefix_caching: !args.no_prefix_caching,
        },
        api: ApiConfig {
            model_name: args.served_model_name.clone().unwrap_or_default(),
            api_keys: args.api_keys.iter().filter(|k| !k.is_empty()).cloned().collect(),
            max_model_len: args.max_model_len.unwrap_or(0),
            request_timeout: secs("request-timeout-secs", args.request_timeout_secs)?,
            sse_keepalive: secs("sse-keepalive-secs", args.sse_keepalive_secs)?,
            body_read_timeout: secs("body-read-timeout-secs", args.body_read_timeout_secs)?,
            connections: router_node::http::ConnectionLimits {
                max_connections: args.max_connections.max(1),
                header_read_timeout: secs("header-read-timeout-secs", args.header_read_timeout_secs)?,
            },
            tool_call_parser: match args.tool_call_parser.as_str() {
                "qwen3_xml" => ParserChoice::Use(ToolFormat::Xml),
                "hermes" => ParserChoice::Use(ToolFormat::Hermes),
                "none" => ParserChoice::Off,
                _ => ParserChoice::Auto,
            },
            reasoning_parser: match args.reasoning_parser.as_str() {
                "qwen3" => ParserChoice::Use(()),
                "none" => ParserChoice::Off,
                _ => ParserChoice::Auto,
            },
            structured_outputs: !args.no_structured_outputs,
            ..ApiConfig::default()
        },
    })
}
