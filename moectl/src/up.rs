//! `moectl up`: a whole local cluster from one command. Expert-node processes on loopback host the routed experts,
//! split evenly; a router in this process serves the OpenAI-compatible API. Ctrl-C stops everything.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use moe_model::synth::Preset;
use moe_model::{ModelConfig, Residency};
use router_node::cluster::ClusterOptions;
use router_node::engine::EngineConfig;
use router_node::http::ApiConfig;
use router_node::remote::RemoteOptions;
use router_node::server::{ExpertsAt, RouterOptions};

use moe_tls::{dev_ca, Identity, Role};

use crate::cluster::{even_split, LocalNode};
use crate::remote::{Combine, WireDtype};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model directory [default: the `demo` preset, written once into the cache directory].
    #[arg(long, env = "MOE_MODEL")]
    model: Option<PathBuf>,
    /// Expert-node processes to start (the experts are split evenly); 0 keeps them in the router.
    #[arg(long, default_value_t = 2)]
    expert_nodes: usize,
    /// HTTP port of the router (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Accepted API key (repeatable); without any, no authentication.
    #[arg(long = "api-key", env = "MOE_API_KEYS", value_delimiter = ',')]
    api_keys: Vec<String>,
    /// Element type on the wire between router and expert nodes.
    #[arg(long, value_enum, default_value_t = WireDtype::F32)]
    wire_dtype: WireDtype,
    /// Where a token's expert outputs are added up: router (the same bits under every placement) or node (fewer
    /// bytes back; last bits follow the placement).
    #[arg(long, value_enum, default_value_t = Combine::Router)]
    combine: Combine,
    /// Most tokens per forward step.
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// Micro-batches per step (ping-pong between attention and the experts).
    #[arg(long, default_value_t = 1)]
    micro_batches: usize,
    /// Show the expert nodes' logs.
    #[arg(long)]
    verbose: bool,
    /// Run the cluster against this etcd (`host:port[,...]`): the expert nodes register there and the router's
    /// controller places the experts (and re-places them with `moectl placement`). Without it the experts are
    /// split evenly and statically.
    #[arg(long, env = "MOE_ETCD")]
    etcd: Option<String>,
    /// Name of the cluster in etcd (with --etcd).
    #[arg(long, env = "MOE_CLUSTER", default_value = "default")]
    cluster: String,
    /// Where to compute: `cpu`, or `cuda[:0,1,...]`, given as is to the router and to every expert node; the
    /// binaries must be built with `--features cuda`.
    #[arg(long, env = "MOE_DEVICE", default_value = "cpu")]
    device: String,
    /// `--threads` is the cores the whole cluster uses, split between the router and the expert nodes (see the
    /// line `up` prints); the kernel and precision go to every process, so that they agree bit for bit.
    #[command(flatten)]
    cpu: moe_model::cpu::CpuArgs,
    /// Directory of the cluster's development CA and certificates (made on first use; `moectl certs` can issue
    /// more from it) [default: `certs` in the cache directory].
    #[arg(long, env = "MOE_CERTS")]
    certs: Option<PathBuf>,
    /// Plaintext, unauthenticated links between the router and the expert nodes instead of mutual TLS.
    #[arg(long)]
    insecure: bool,
}

/// Compute threads of the router and of each expert node when `total` cores are shared by `nodes` expert nodes.
///
/// Without micro-batches the router and the nodes take turns (the router waits while a layer's experts compute, and
/// the nodes wait while the router runs attention), so the router gets every core and the nodes split them: no more
/// threads compute at once than there are cores. With micro-batches the two overlap, so each side gets half.
pub(crate) fn split_threads(total: usize, nodes: usize, micro_batches: usize) -> (usize, usize) {
    let total = total.max(1);
    if nodes == 0 {
        return (total, 0);
    }
    let router = if micro_batches > 1 { total.div_ceil(2) } else { total };
    let for_nodes = if micro_batches > 1 { total - router } else { total };
    (router, (for_nodes / nodes).max(1))
}

/// Where the default model lives: `$MOE_MESH_CACHE`, else `$XDG_CACHE_HOME/moe-mesh`, else `~/.cache/moe-mesh`.
fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MOE_MESH_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("moe-mesh"));
    }
    let home =
        std::env::var_os("HOME").context("neither MOE_MESH_CACHE, XDG_CACHE_HOME nor HOME is set; pass --model")?;
    Ok(PathBuf::from(home).join(".cache").join("moe-mesh"))
}

fn spinner(message: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

pub fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let model = match &args.model {
        Some(dir) => dir.clone(),
        None => {
            let dir = cache_dir()?.join("models").join("demo");
            if dir.join("config.json").exists() {
                eprintln!("using the demo model cached in {}", dir.display());
            } else {
                eprintln!("no --model: writing the demo model (random weights) once into {}", dir.display());
                crate::init_model::write_preset(Preset::Demo, &dir)?;
            }
            dir
        }
    };
    let config =
        ModelConfig::from_file(&model.join("config.json")).with_context(|| format!("reading {}", model.display()))?;
    if args.expert_nodes > config.num_experts {
        bail!("--expert-nodes {}: the model has only {} experts per layer", args.expert_nodes, config.num_experts);
    }
    if args.max_batch_tokens == 0 || args.micro_batches == 0 {
        bail!("--max-batch-tokens and --micro-batches must be positive");
    }
    let device: moe_cuda::Device = args.device.parse()?;
    let cpu = args.cpu.options()?;
    let total = match cpu.threads {
        Some(0) => bail!("--threads 0: need at least one"),
        Some(t) => t,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    let (router_threads, node_threads) = split_threads(total, args.expert_nodes, args.micro_batches);
    let selection = moe_model::cpu::CpuOptions { threads: Some(router_threads), ..cpu.clone() }.apply()?;
    if args.expert_nodes > 0 {
        eprintln!(
            "{total} cores: the router computes on {router_threads} threads, each of {} expert nodes on {node_threads} ({}); matmul kernel {}, precision {}",
            args.expert_nodes,
            if args.micro_batches > 1 { "micro-batches overlap them, so each side has half" } else { "they take turns: a layer's experts run while the router waits" },
            selection.kernel.name(),
            selection.precision.name(),
        );
    }
    // The links run as in production: mutual TLS with role certificates from a CA kept in the cache directory.
    let tls = match (args.insecure, args.expert_nodes) {
        (_, 0) => None,
        (true, _) => {
            eprintln!("--insecure: the links to the expert nodes are plaintext and unauthenticated");
            None
        }
        (false, _) => {
            let dir = match &args.certs {
                Some(dir) => dir.clone(),
                None => cache_dir()?.join("certs"),
            };
            let identities = [(Role::Router, "router"), (Role::Expert, "expert"), (Role::Controller, "controller")];
            dev_ca::ensure(&dir, &identities).with_context(|| format!("the certificates in {}", dir.display()))?;
            eprintln!(
                "mutual TLS between the router and the expert nodes (CA in {}; `moectl certs issue --dir {}` adds more)",
                dir.display(),
                dir.display()
            );
            Some(dir)
        }
    };
    let mut device_args = vec![
        "--device".to_owned(),
        device.to_string(),
        "--threads".to_owned(),
        node_threads.to_string(),
        "--matmul-precision".to_owned(),
        selection.precision.name().to_owned(),
        "--matmul-kernel".to_owned(),
        selection.kernel.name().to_owned(),
    ];
    let router_tls = match &tls {
        Some(dir) => {
            device_args.extend(dev_ca::files(dir, "expert").flags());
            Some(Identity::load(dev_ca::files(dir, "router"), &[Role::Router])?)
        }
        None => {
            device_args.push("--insecure".into());
            None
        }
    };
    // Bind first: a taken port fails before anything loads.
    let addr = SocketAddr::new(args.host, args.port);
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;

    let mut nodes = Vec::new();
    if let (Some(etcd), true) = (&args.etcd, args.expert_nodes > 0) {
        let bar = spinner(format!("starting {} expert nodes in cluster `{}`", args.expert_nodes, args.cluster));
        let extra =
            [&["--etcd".to_owned(), etcd.clone(), "--cluster".to_owned(), args.cluster.clone()][..], &device_args[..]]
                .concat();
        let started = (0..args.expert_nodes)
            .map(|_| LocalNode::start(&model, None, &extra, args.verbose))
            .collect::<Result<Vec<_>>>();
        bar.finish_and_clear();
        nodes = started.context("starting the expert nodes")?;
        for node in &nodes {
            eprintln!("expert node on {} joined cluster `{}`", node.addr, args.cluster);
        }
    } else if args.expert_nodes > 0 {
        let specs = even_split(config.num_experts, args.expert_nodes);
        let bar = spinner(format!("starting {} expert nodes (experts {})", args.expert_nodes, specs.join(" | ")));
        let started = specs
            .iter()
            .map(|spec| LocalNode::start(&model, Some(spec), &device_args, args.verbose))
            .collect::<Result<Vec<_>>>();
        bar.finish_and_clear();
        nodes = started.context("starting the expert nodes")?;
        for (node, spec) in nodes.iter().zip(&specs) {
            eprintln!("expert node on {} hosts experts {spec} of every layer", node.addr);
        }
    }
    let wire = match args.wire_dtype {
        WireDtype::F32 => moe_proto::v1::Dtype::F32,
        WireDtype::Bf16 => moe_proto::v1::Dtype::Bf16,
    };
    let remote = RemoteOptions {
        wire_dtype: wire,
        reduce: args.combine.reduce(),
        tls: router_tls.clone(),
        ..RemoteOptions::default()
    };
    let experts = if nodes.is_empty() {
        ExpertsAt::Local
    } else if let Some(etcd) = &args.etcd {
        let cluster = ClusterOptions {
            etcd: Some(etcd.clone()),
            cluster: args.cluster.clone(),
            etcd_tls: router_tls.as_ref().map(moe_placement::EtcdTls::of),
            ..ClusterOptions::default()
        };
        ExpertsAt::Cluster(cluster, remote)
    } else {
        ExpertsAt::Nodes(nodes.iter().map(|n| n.addr.clone()).collect(), remote)
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("loading the router's weights [{bar:40}] {bytes}/{total_bytes}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let options = RouterOptions {
        model: model.clone(),
        residency: Residency::Resident,
        experts,
        device,
        engine: EngineConfig {
            max_batch_tokens: args.max_batch_tokens,
            micro_batches: args.micro_batches,
            ..EngineConfig::default()
        },
        api: ApiConfig { api_keys: args.api_keys.clone(), ..ApiConfig::default() },
    };
    let prepared = router_node::server::prepare(options, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let router_node::server::PreparedRouter { state, engine, cluster } = prepared.context("starting the router")?;
    let name = state.config.model_name.clone();

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        if let Some(identity) = &router_tls {
            identity.watch();
        }
        let membership = match cluster {
            Some(join) => {
                let membership = router_node::cluster::join_prepared(join, format!("router-{}", addr.port()), format!("http://{addr}")).await?;
                let bar = spinner("waiting for the controller to place the experts".into());
                let waited = Instant::now();
                while (state.experts_ready)().is_err() && waited.elapsed() < Duration::from_secs(120) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                bar.finish_and_clear();
                if let Err(e) = (state.experts_ready)() {
                    bail!("the experts were not placed within 120 s: {e}");
                }
                Some(membership)
            }
            None => None,
        };
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let url = format!("http://{addr}");
        let key = args.api_keys.first().map(|k| format!(" -H 'Authorization: Bearer {k}'")).unwrap_or_default();
        println!("moe-mesh is up in {:.1} s: model `{name}` at {url}/v1 ({} expert nodes)", started.elapsed().as_secs_f64(), nodes.len());
        println!(
            "try:\n  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{key} \\\n    -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 32}}'"
        );
        println!("Ctrl-C stops the cluster.");
        let drain = Arc::clone(&state);
        let limits = state.config.connections;
        router_node::http::serve(listener, router_node::http::router(Arc::clone(&state)), limits, async move {
            moe_telemetry::shutdown_signal().await;
            drain.draining.store(true, Ordering::Release);
            eprintln!("\nstopping: requests in flight finish, then the expert nodes stop");
        })
        .await?;
        if let Some(m) = membership {
            m.leave().await;
        }
        anyhow::Ok(())
    })?;
    // The router's streams close before the nodes stop, so nothing reports them as failed.
    drop(state);
    let _ = engine.join();
    drop(nodes);
    eprintln!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::split_threads;

    #[test]
    fn threads_split_without_oversubscribing() {
        assert_eq!(split_threads(2, 2, 1), (2, 1), "turns: the router takes all, the nodes share");
        assert_eq!(split_threads(16, 4, 1), (16, 4));
        assert_eq!(split_threads(16, 4, 2), (8, 2), "overlap: half each");
        assert_eq!(split_threads(2, 3, 1), (2, 1), "every node gets at least one");
        assert_eq!(split_threads(8, 0, 1), (8, 0));
    }
}
