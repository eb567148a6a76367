//! `expert-node`: hosts a shard of a model's routed experts and serves them over gRPC.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use expert_node::{ClusterConfig, ExpertSpec, NodeConfig, ServeOptions};
use moe_config::ConfigError;
use moe_model::Residency;

/// Hosts a shard of a Mixture-of-Experts model's routed experts and computes them for the token activations that
/// routers stream to it over gRPC (moe.v1.ExpertService, plus grpc.health.v1.Health).
///
/// It reads only the tensors of the experts it hosts, so its memory grows with its shard, not with the model. Once
/// serving it prints `listening on ADDR` on stdout (with the real port when --listen asks for port 0).
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
    /// Model directory: config.json and the safetensors checkpoint, single file or sharded with an index (required).
    #[arg(long, env = "MOE_MODEL")]
    model: Option<PathBuf>,
    /// Address to serve on; port 0 picks a free one.
    #[arg(long, env = "MOE_LISTEN", default_value = "127.0.0.1:50061")]
    listen: SocketAddr,
    /// The (layer, expert) pairs to host: `all`, `none`, `0-31` (those experts of every MoE layer),
    /// `layers=0-7:experts=0-63`, clauses joined with `;`. Changeable later through LoadExperts / UnloadExperts.
    /// Not with --etcd, where the cluster's controller assigns the experts [default: all].
    #[arg(long, env = "MOE_EXPERTS", conflicts_with = "etcd")]
    experts: Option<ExpertSpec>,
    /// Join the cluster whose state is in this etcd (`host:port[,host:port...]`): register, load the experts the
    /// controller assigns, follow placement epochs, and drain on SIGTERM.
    #[arg(long, env = "MOE_ETCD")]
    etcd: Option<String>,
    /// Name of the cluster in etcd (with --etcd).
    #[arg(long, env = "MOE_CLUSTER", default_value = "default")]
    cluster: String,
    /// Address routers reach this node at (with --etcd) [default: the address it listens on].
    #[arg(long)]
    advertise: Option<String>,
    /// Memory offered for experts, in GiB: the controller places no more than fits, and a LoadExperts beyond it is
    /// refused [default: on GPUs 90% of their free memory, else the experts loaded at start plus 80% of the memory
    /// available].
    #[arg(long)]
    memory_gib: Option<f64>,
    /// Seconds of the membership lease: a node that dies is out of the cluster within this time.
    #[arg(long, default_value_t = 3)]
    lease_ttl_secs: u64,
    /// Seconds a drain (SIGTERM with --etcd) waits for the node's experts to move before the node exits anyway,
    /// also when etcd does not answer; a second SIGTERM exits at once.
    #[arg(long, default_value_t = 30)]
    drain_timeout_secs: u64,
    /// Requests waiting for compute, over all routers; more are answered RESOURCE_EXHAUSTED at once.
    #[arg(long, default_value_t = 256)]
    max_queued_requests: usize,
    /// Where to compute: `cpu`, or `cuda[:0,1,...]` in builds with the CUDA backend.
    #[arg(long, env = "MOE_DEVICE", default_value = "cpu")]
    device: String,
    /// Name reported in Status and logs [default: expert-HOSTNAME-PORT].
    #[arg(long, env = "MOE_NODE_ID")]
    node_id: Option<String>,
    /// Serve the weights from the file mapping instead of copying them into memory (less memory, slower decode).
    #[arg(long)]
    mapped: bool,
    /// Largest gRPC message accepted or sent, in MiB; routers split their batches under it.
    #[arg(long, default_value_t = 16)]
    max_message_mib: usize,
    /// Seconds between HTTP/2 keepalive pings; a peer that does not answer within twice this is dropped.
    #[arg(long, default_value_t = 2)]
    keepalive_secs: u64,
    /// Serve Prometheus `/metrics` over plain HTTP on this address (port 0 picks a free one; announced as
    /// `metrics on ADDR`). Unauthenticated: bind it where only the scraper reaches [default: not served].
    #[arg(long, env = "MOE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Seconds to go on answering requests already received after SIGTERM / Ctrl-C before exiting.
    #[arg(long, default_value_t = 1.0)]
    shutdown_grace_secs: f64,
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
        if self.etcd.is_some() && self.experts.is_some() {
            return Err(ConfigError::refused("experts", "not with `etcd`: the cluster's controller assigns them"));
        }
        if self.max_message_mib == 0 || self.max_message_mib > 1024 {
            return Err(ConfigError::refused(
                "max-message-mib",
                format!("{}: must be between 1 and 1024", self.max_message_mib),
            ));
        }
        if let Some(g) = self.memory_gib {
            if !(g.is_finite() && g > 0.0) {
                return Err(ConfigError::refused("memory-gib", format!("{g}: must be a positive number")));
            }
        }
        if !(self.shutdown_grace_secs.is_finite() && self.shutdown_grace_secs >= 0.0) {
            return Err(ConfigError::refused("shutdown-grace-secs", "must be zero or more"));
        }
        self.tls.files("an expert node")?;
        if self.max_queued_requests == 0 {
            return Err(ConfigError::refused("max-queued-requests", "must be positive"));
        }
        Ok(())
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
            match moe_telemetry::trace::init("info", &args.trace.options("expert-node", args.node_id.clone())) {
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

fn run(args: Args, file: &moe_config::ConfigFile) -> Result<()> {
    if file.print_config {
        print!("{}", moe_config::ConfigFile::print(&args)?);
        return Ok(());
    }
    let mut config = config(&args)?;
    args.cpu.apply()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("expert-io")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Bind first, so that a taken port fails before minutes of loading.
    let (listener, addr) = runtime.block_on(expert_node::bind(args.listen))?;
    config.serve.tls = args.tls.load(&[moe_tls::Role::Expert], "an expert node")?;
    if let (Some(cluster), Some(identity)) = (config.cluster.as_mut(), &config.serve.tls) {
        // Followed: each reload of the files reconnects to etcd with them.
        cluster.etcd_tls = Some(moe_placement::EtcdTls::of(identity));
    }
    let metrics = match args.metrics_listen {
        Some(at) => Some(runtime.block_on(expert_node::metrics::bind(at))?),
        None => None,
    };
    let node = expert_node::run::load(&config, addr).with_context(|| format!("loading {}", config.model.display()))?;
    if let Some((listener, at)) = metrics {
        runtime.spawn(expert_node::metrics::serve(node.clone(), listener));
        println!("metrics on {at}");
    }
    println!("listening on {addr}");
    let served = runtime.block_on(expert_node::run::run(config, node, listener, moe_telemetry::shutdown_signal()));
    // Tasks still running (a store call that does not return) do not hold the exit up.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(served?)
}

/// The node's configuration from its settings (validated).
fn config(args: &Args) -> Result<NodeConfig> {
    // The device is checked first, so that a machine without a GPU says so in one line before anything loads.
    let device: moe_cuda::Device = args.device.parse()?;
    if let moe_cuda::Device::Cuda(ordinals) = &device {
        for found in moe_cuda::probe(ordinals).with_context(|| format!("--device {device}"))? {
            tracing::info!(device = %found, "CUDA device found");
        }
    }
    let memory_bytes = args.memory_gib.map(|g| (g * (1u64 << 30) as f64) as u64);
    let cluster = args.etcd.clone().map(|etcd| ClusterConfig {
        etcd,
        name: args.cluster.clone(),
        advertise: args.advertise.clone(),
        memory_bytes,
        lease_ttl: Duration::from_secs(args.lease_ttl_secs.max(1)),
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        etcd_tls: None,
    });
    Ok(NodeConfig {
        model: args.model.clone().context("no model")?,
        experts: args.experts.clone(),
        device,
        residency: if args.mapped { Residency::Mapped } else { Residency::Resident },
        node_id: args.node_id.clone(),
        serve: ServeOptions {
            max_message_bytes: args.max_message_mib << 20,
            keepalive_interval: Duration::from_secs(args.keepalive_secs.max(1)),
            keepalive_timeout: Duration::from_secs(2 * args.keepalive_secs.max(1)),
            max_queued: args.max_queued_requests.max(1),
            memory_limit: memory_bytes,
            ..ServeOptions::default()
        },
        grace: Duration::from_secs_f64(args.shutdown_grace_secs.max(0.0)),
        cluster,
    })
}
