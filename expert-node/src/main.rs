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
    #[arg(long, env = "MOE_EXPERTS", default_value = "all")]
    experts: ExpertSpec,
    /// Where to compute: `cpu`, or `cuda[:0,1,...]` in builds with the CUDA backend.
    #[arg(long, env = "MOE_DEVICE", default_value = "cpu")]
    device: String,
    /// Name reported in Status and logs [default: expert-PORT].
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
    /// Compute threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
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
    match args.device.as_str() {
        "cpu" => {}
        d if d == "cuda" || d.starts_with("cuda:") => {
            bail!("--device {d}: this build has no CUDA backend (build with `--features cuda`)")
        }
        d => bail!("--device {d}: expected `cpu` or `cuda[:0,1,...]`"),
    }
    if args.max_message_mib == 0 || args.max_message_mib > 1024 {
        bail!("--max-message-mib {}: must be between 1 and 1024", args.max_message_mib);
    }
    if let Some(threads) = args.threads {
        rayon_threads(threads)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("expert-io")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Bind first, so that a taken port fails before minutes of loading.
    let (listener, addr) = runtime.block_on(expert_node::bind(args.listen))?;
    let node_id = args.node_id.clone().unwrap_or_else(|| format!("expert-{}", addr.port()));
    let residency = if args.mapped { Residency::Mapped } else { Residency::Resident };
    let options = ServeOptions {
        max_message_bytes: args.max_message_mib << 20,
        keepalive_interval: Duration::from_secs(args.keepalive_secs.max(1)),
        keepalive_timeout: Duration::from_secs(2 * args.keepalive_secs.max(1)),
        ..ServeOptions::default()
    };

    tracing::info!(model = %args.model.display(), experts = %args.experts, %node_id, "loading experts");
    let started = Instant::now();
    let last = std::sync::Mutex::new(Instant::now());
    let progress = |bytes: u64| {
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= Duration::from_secs(2) {
            *last = Instant::now();
            tracing::info!("loading: {:.2} GiB read", bytes as f64 / (1u64 << 30) as f64);
        }
    };
    let node = ExpertNode::load(&args.model, &args.experts, residency, node_id, options.max_message_bytes, &progress)
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
    runtime.block_on(async move {
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
    })
}

fn rayon_threads(threads: usize) -> Result<()> {
    if threads == 0 {
        bail!("--threads 0: need at least one");
    }
    moe_model::cpu::set_threads(threads).context("setting the compute threads")
}
