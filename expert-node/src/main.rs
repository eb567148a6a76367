//! `expert-node`: hosts a shard of a model's routed experts and serves them over gRPC.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use expert_node::{ExpertNode, ExpertSpec, ServeOptions};
use moe_model::Residency;

/// Hosts a shard of a Mixture-of-Experts model's routed experts and computes them for the token activations that
/// routers stream to it over gRPC (moe.v1.ExpertService, plus grpc.health.v1.Health).
///
/// It reads only the tensors of the experts it hosts, so its memory grows with its shard, not with the model. Once
/// serving it prints `listening on ADDR` on stdout (with the real port when --listen asks for port 0).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Model directory: config.json and the safetensors checkpoint (single file or sharded with an index).
    #[arg(long, env = "MOE_MODEL")]
    model: PathBuf,
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
    /// Memory offered for experts, in GiB (with --etcd); the controller places no more than fits
    /// [default: 80% of the memory available at start].
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
    /// Seconds to go on answering requests already received after SIGTERM / Ctrl-C before exiting.
    #[arg(long, default_value_t = 1.0)]
    shutdown_grace_secs: f64,
    #[command(flatten)]
    cpu: moe_model::cpu::CpuArgs,
}

fn main() -> ExitCode {
    moe_telemetry::init_logging("info");
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    // The device is checked first, so that a machine without a GPU says so in one line before anything loads.
    let device: moe_cuda::Device = args.device.parse()?;
    if let moe_cuda::Device::Cuda(ordinals) = &device {
        for found in moe_cuda::probe(ordinals).with_context(|| format!("--device {device}"))? {
            tracing::info!(device = %found, "CUDA device found");
        }
    }
    if args.max_message_mib == 0 || args.max_message_mib > 1024 {
        bail!("--max-message-mib {}: must be between 1 and 1024", args.max_message_mib);
    }
    args.cpu.apply()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("expert-io")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Bind first, so that a taken port fails before minutes of loading.
    let (listener, addr) = runtime.block_on(expert_node::bind(args.listen))?;
    let node_id = args.node_id.clone().unwrap_or_else(|| moe_placement::default_member_id("expert", addr.port()));
    let residency = if args.mapped { Residency::Mapped } else { Residency::Resident };
    let options = ServeOptions {
        max_message_bytes: args.max_message_mib << 20,
        keepalive_interval: Duration::from_secs(args.keepalive_secs.max(1)),
        keepalive_timeout: Duration::from_secs(2 * args.keepalive_secs.max(1)),
        max_queued: args.max_queued_requests.max(1),
        ..ServeOptions::default()
    };

    let spec = match (&args.experts, &args.etcd) {
        (Some(spec), _) => spec.clone(),
        (None, Some(_)) => "none".parse().context("the empty expert set")?,
        (None, None) => "all".parse().context("the full expert set")?,
    };
    tracing::info!(model = %args.model.display(), experts = %spec, %node_id, "loading experts");
    let started = Instant::now();
    let last = std::sync::Mutex::new(Instant::now());
    let progress = |bytes: u64| {
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= Duration::from_secs(2) {
            *last = Instant::now();
            tracing::info!("loading: {:.2} GiB read", bytes as f64 / (1u64 << 30) as f64);
        }
    };
    let node = ExpertNode::load(&args.model, &spec, &device, residency, node_id, options.max_message_bytes, &progress)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let hosted = node.hosted();
    tracing::info!(
        experts = hosted.len(),
        resident_gib = node.resident_bytes() as f64 / (1u64 << 30) as f64,
        elapsed = ?started.elapsed(),
        "experts loaded"
    );
    let node = Arc::new(node);
    println!("listening on {addr}");
    tracing::info!(%addr, "serving moe.v1.ExpertService");
    let grace = Duration::from_secs_f64(args.shutdown_grace_secs.max(0.0));
    if let Some(etcd) = args.etcd.clone() {
        let advertise = args.advertise.clone().unwrap_or_else(|| addr.to_string());
        let served = runtime.block_on(in_cluster(args, etcd, advertise, node, listener, options, grace));
        // Tasks still running (a store call that does not return) do not hold the exit up.
        runtime.shutdown_timeout(Duration::from_secs(1));
        return served;
    }
    let served = runtime.block_on(async move {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut server = tokio::spawn(expert_node::serve(node, listener, options, async {
            let _ = stopped.await;
        }));
        tokio::select! {
            _ = moe_telemetry::shutdown_signal() => {}
            // The server only ends by itself on an error.
            done = &mut server => return done.context("the server task failed")?.map_err(Into::into),
        }
        let _ = stop.send(());
        // Open streams are drained: requests already received are answered. Those still open after the grace
        // period are cut when the process exits.
        match tokio::time::timeout(grace, server).await {
            Ok(done) => done.context("the server task failed")??,
            Err(_) => tracing::info!("streams still open after {grace:?}; closing them"),
        }
        tracing::info!("stopped");
        Ok(())
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    served
}

/// Serves as a member of the cluster in etcd until drained (SIGTERM, or `moectl placement drain`).
async fn in_cluster(
    args: Args,
    etcd: String,
    advertise: String,
    node: Arc<ExpertNode>,
    listener: tokio::net::TcpListener,
    options: ServeOptions,
    grace: Duration,
) -> Result<()> {
    use moe_placement::{Cluster, Member, Role, Session};

    let store = moe_placement::open_store(Some(&etcd)).await?;
    let cluster = Cluster::new(store, &args.cluster)?;
    let memory_bytes = match args.memory_gib {
        Some(g) if g > 0.0 && g.is_finite() => (g * (1u64 << 30) as f64) as u64,
        Some(g) => bail!("--memory-gib {g}: must be a positive number"),
        None => match node.device_memory() {
            // On GPUs: 90% of what was free when the devices opened (the rest is for activations and cuBLAS).
            Some(free) => free / 10 * 9,
            None => available_memory().context("reading the available memory (give --memory-gib)")? / 5 * 4,
        },
    };
    let member = Member {
        id: node.node_id.clone(),
        role: Role::Expert,
        addr: advertise,
        devices: node.devices(),
        memory_bytes,
        fingerprint: node.info().fingerprint,
        version: env!("CARGO_PKG_VERSION").into(),
        started_unix_ms: moe_placement::unix_ms(),
    };
    // A node that starts is meant to serve: a drain mark left from its previous run goes.
    cluster.undrain(&member.id).await?;
    let ttl = Duration::from_secs(args.lease_ttl_secs.max(1));
    let session = Arc::new(Session::register(cluster.clone(), &member, ttl).await?);
    tracing::info!(
        cluster = %args.cluster, store = %cluster.store().describe(), memory_gib = memory_bytes as f64 / (1u64 << 30) as f64,
        "registered; waiting for the controller to assign experts"
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(expert_node::serve(node.clone(), listener, options, async {
        let _ = stopped.await;
    }));
    let agent_options = expert_node::agent::AgentOptions {
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        ..Default::default()
    };
    let publisher =
        tokio::spawn(expert_node::agent::publish_served(node.clone(), session.clone(), Duration::from_secs(5)));
    let follow = expert_node::agent::follow(node, session.clone(), agent_options, moe_telemetry::shutdown_signal());
    tokio::select! {
        departure = follow => tracing::info!(?departure, "drained; stopping"),
        done = &mut server => return done.context("the server task failed")?.map_err(Into::into),
    }
    let _ = stop.send(());
    match tokio::time::timeout(grace, server).await {
        Ok(done) => done.context("the server task failed")??,
        Err(_) => tracing::info!("streams still open after {grace:?}; closing them"),
    }
    publisher.abort();
    let _ = publisher.await;
    if let Some(session) = Arc::into_inner(session) {
        // With the store down the lease expires by itself; the exit does not wait for it.
        match tokio::time::timeout(Duration::from_secs(3), session.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("leaving the cluster: {e}; the lease expires by itself"),
            Err(_) => tracing::warn!("the store did not answer; leaving with the lease"),
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn available_memory() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no MemAvailable in /proc/meminfo")?;
    Ok(kib << 10)
}
