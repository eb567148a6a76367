//! `moectl placement`: look at and change where a cluster's experts live.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use moe_placement::controller::{eligible, plan_balanced};
use moe_placement::{Cluster, ClusterView, ModelShape, Placement, RequestKind, Role};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
    /// etcd endpoints of the cluster (`host:port[,host:port...]`).
    #[arg(long, env = "MOE_ETCD", global = true)]
    etcd: Option<String>,
    /// Name of the cluster.
    #[arg(long, env = "MOE_CLUSTER", default_value = "default", global = true)]
    cluster: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// For an `https://` etcd: the certificate (a controller's, say), key and CA shown to it.
    #[arg(long, global = true, value_name = "FILE")]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long, global = true, value_name = "FILE")]
    tls_key: Option<std::path::PathBuf>,
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// The current epoch: nodes, what they host and how loaded they are; routers and the controller.
    Show,
    /// What `rebalance` would do now: the placement balanced for the measured load, next to the current one
    /// (`--json` prints the placement itself, for `apply`).
    Plan,
    /// Have the controller switch to the placement in FILE (as `plan --json` prints it), and wait until it serves.
    Apply { file: std::path::PathBuf },
    /// Have the controller re-place the experts by the measured load, and wait until the new epoch serves.
    Rebalance,
    /// Move every expert off NODE; the node exits once routers no longer need it.
    Drain {
        node: String,
        /// Return once the drain is requested instead of waiting for it to finish.
        #[arg(long)]
        no_wait: bool,
    },
}

pub fn run(args: Args) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: Args) -> Result<()> {
    let Some(etcd) = args.etcd.as_deref() else {
        bail!("--etcd is required: the cluster's state lives in etcd (or set MOE_ETCD)");
    };
    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            Some(moe_placement::EtcdTls { ca: read(ca)?, cert: read(cert)?, key: read(key)?, source: None })
        }
        (None, None, None) => None,
        _ => bail!("--tls-cert, --tls-key and --tls-ca go together"),
    };
    let store = moe_placement::open_store_with(Some(etcd), tls.as_ref()).await?;
    let cluster = Cluster::new(store, &args.cluster)?;
    let view = cluster.snapshot().await?;
    match args.command {
        Command::Show => show(&view, args.json),
        Command::Plan => plan(&view, args.json),
        Command::Apply { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let placement: Placement =
                serde_json::from_str(&text).with_context(|| format!("{} is not a placement", file.display()))?;
            let shape = shape(&view)?;
            placement.validate(&shape).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            request(&cluster, RequestKind::Apply { placement }, args.json).await
        }
        Command::Rebalance => request(&cluster, RequestKind::Rebalance, args.json).await,
        Command::Drain { node, no_wait } => drain(&cluster, &view, &node, no_wait, args.json).await,
    }
}

fn shape(view: &ClusterView) -> Result<ModelShape> {
    view.model.clone().context("the cluster has no model yet: start a router (its controller writes it)")
}

/// Per MoE layer and node of `p`, the share of `load` it serves (an expert's load split evenly over its replicas).
fn node_loads(p: &Placement, load: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let mut all = Vec::with_capacity(p.hosted.len());
    for (rows, load) in p.hosted.iter().zip(load) {
        let mut out = vec![0.0; p.nodes.len()];
        let mut replicas = vec![0usize; load.len()];
        for experts in rows {
            for &e in experts {
                if let Some(r) = replicas.get_mut(e as usize) {
                    *r += 1;
                }
            }
        }
        for (n, experts) in rows.iter().enumerate() {
            for &e in experts {
                out[n] += load.get(e as usize).copied().unwrap_or(0.0) / replicas[e as usize].max(1) as f64;
            }
        }
        all.push(out);
    }
    all
}

/// Each node's load summed over the layers.
fn summed(per_layer: &[Vec<f64>]) -> Vec<f64> {
    let mut out = vec![0.0; per_layer.first().map_or(0, Vec::len)];
    for row in per_layer {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
    out
}

/// The load-weighted mean over layers of each layer's max/mean node load: every layer waits for its slowest node,
/// so this (not the imbalance of the sums) is what costs time.
fn layer_imbalance(per_layer: &[Vec<f64>]) -> f64 {
    let (mut weighted, mut total) = (0.0, 0.0);
    for row in per_layer {
        let sum: f64 = row.iter().sum();
        weighted += imbalance(row) * sum;
        total += sum;
    }
    if total > 0.0 {
        weighted / total
    } else {
        1.0
    }
}

/// max / mean of the nodes' loads (1.0 when there is no load).
fn imbalance(loads: &[f64]) -> f64 {
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    if mean > 0.0 {
        loads.iter().copied().fold(0.0, f64::max) / mean
    } else {
        1.0
    }
}

fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b as f64 / 1024.0),
    }
}

/// The share of tokens that the busiest tenth of each layer's experts receive, averaged over layers.
fn hot_share(load: &[Vec<f64>]) -> f64 {
    let shares: Vec<f64> = load
        .iter()
        .filter_map(|row| {
            let total: f64 = row.iter().sum();
            (total > 0.0).then(|| {
                let mut sorted = row.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                sorted.iter().take(row.len().div_ceil(10)).sum::<f64>() / total
            })
        })
        .collect();
    if shares.is_empty() {
        return 0.0;
    }
    shares.iter().sum::<f64>() / shares.len() as f64
}

/// Per MoE layer and node of `p`, the (token, expert) pairs per second the node reports having computed over its
/// window.
fn served_rates(view: &ClusterView, p: &Placement) -> Vec<Vec<f64>> {
    (0..p.moe_layers.len())
        .map(|l| {
            p.nodes
                .iter()
                .map(|n| {
                    view.served.get(&n.id).map_or(0.0, |r| {
                        r.counts.get(l).map_or(0, |c| c.iter().sum::<u64>()) as f64 / r.window_secs.max(1e-3)
                    })
                })
                .collect()
        })
        .collect()
}

fn show(view: &ClusterView, json: bool) -> Result<()> {
    let load = view.model.as_ref().map(|s| view.total_load(s)).unwrap_or_default();
    let layer_loads = view.placement.as_ref().map(|p| node_loads(p, &load)).unwrap_or_default();
    let loads = summed(&layer_loads);
    let layer_served = view.placement.as_ref().map(|p| served_rates(view, p)).unwrap_or_default();
    let served = summed(&layer_served);
    if json {
        let out = serde_json::json!({
            "model": view.model,
            "leader": view.leader,
            "placement": view.placement,
            "members": view.members,
            "ready": view.ready,
            "using": view.using,
            "drains": view.drains,
            "node_load_tokens_per_s": view.placement.as_ref().map(|p| p.nodes.iter().map(|n| n.id.clone()).zip(loads.iter().copied()).collect::<std::collections::BTreeMap<_, _>>()),
            "imbalance": imbalance(&loads),
            "layer_imbalance": layer_imbalance(&layer_loads),
            "served_imbalance": imbalance(&served),
            "served_layer_imbalance": layer_imbalance(&layer_served),
            "served_layer_totals": view.served.iter().map(|(id, r)| (id.clone(), r.layer_totals.clone())).collect::<std::collections::BTreeMap<_, _>>(),
            "hot_share": hot_share(&load),
            "problems": view.problems,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    match &view.model {
        Some(m) => println!(
            "model {} (fingerprint {:016x}): {} MoE layers x {} experts, {} each",
            m.name,
            m.fingerprint,
            m.moe_layers.len(),
            m.num_experts,
            human_bytes(m.expert_bytes)
        ),
        None => println!("no model yet (no router has led the cluster)"),
    }
    println!("controller: {}", view.leader.as_deref().unwrap_or("none elected"));
    match &view.placement {
        None => println!("no placement yet"),
        Some(p) => {
            println!(
                "placement epoch {} ({}), {}",
                p.epoch,
                p.reason,
                if view.is_ready(p) { "ready" } else { "loading" }
            );
            let counts = p.counts();
            let total: f64 = loads.iter().sum();
            println!(
                "{:<20} {:<22} {:>8} {:>7} {:>10} {:>8}  state",
                "NODE", "ADDRESS", "EXPERTS", "READY", "MEM GiB", "LOAD %"
            );
            for (i, n) in p.nodes.iter().enumerate() {
                let member = view.members.get(&n.id);
                let state = match (member, view.drains.contains(&n.id)) {
                    (None, _) => "gone",
                    (Some(_), true) => "draining",
                    (Some(_), false) => "up",
                };
                println!(
                    "{:<20} {:<22} {:>8} {:>7} {:>10.2} {:>7.1}% {:>10.0}  {state}",
                    n.id,
                    n.addr,
                    counts[i],
                    view.ready.get(&n.id).map_or("-".into(), |e| e.to_string()),
                    member.map_or(0.0, |m| m.memory_bytes as f64 / (1u64 << 30) as f64),
                    if total > 0.0 { 100.0 * loads[i] / total } else { 0.0 },
                    served[i],
                );
            }
            println!(
                "node load max/mean per layer (load-weighted mean): {:.3} expected from the routed load on this \
                 placement, {:.3} measured by the nodes over their last 30 s; summed over layers: {:.3} and {:.3}",
                layer_imbalance(&layer_loads),
                layer_imbalance(&layer_served),
                imbalance(&loads),
                imbalance(&served),
            );
            println!("the busiest 10% of each layer's experts get {:.0}% of its tokens", 100.0 * hot_share(&load));
        }
    }
    let idle: Vec<_> = view
        .expert_nodes()
        .filter(|m| view.placement.as_ref().is_none_or(|p| p.node_index(&m.id).is_none()))
        .map(|m| m.id.clone())
        .collect();
    if !idle.is_empty() {
        println!("expert nodes without experts: {}", idle.join(", "));
    }
    for r in view.members.values().filter(|m| m.role == Role::Router) {
        println!(
            "router {} at {}: epoch {}",
            r.id,
            r.addr,
            view.using.get(&r.id).map_or("-".into(), |e| e.to_string())
        );
    }
    for p in &view.problems {
        println!("warning: {p}");
    }
    Ok(())
}

fn plan(view: &ClusterView, json: bool) -> Result<()> {
    let shape = shape(view)?;
    let nodes = eligible(view, &shape);
    let load = view.total_load(&shape);
    let next = view.placement.as_ref().map_or(1, |p| p.epoch + 1);
    let planned = plan_balanced(&shape, &nodes, Some(&load), next, "plan").map_err(|e| anyhow::anyhow!(e))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&planned)?);
        return Ok(());
    }
    let measured = load.iter().flatten().any(|&v| v > 0.0);
    if !measured {
        println!("no load measured yet: the plan places each expert once");
    }
    if let Some(p) = &view.placement {
        println!(
            "current epoch {}: node load max/mean per layer {:.3}, {} experts hosted",
            p.epoch,
            layer_imbalance(&node_loads(p, &load)),
            p.counts().iter().sum::<usize>()
        );
    }
    println!(
        "planned: node load max/mean per layer {:.3}, {} experts hosted (replicas included)",
        layer_imbalance(&node_loads(&planned, &load)),
        planned.counts().iter().sum::<usize>()
    );
    for (n, c) in planned.nodes.iter().zip(planned.counts()) {
        println!("  {:<20} {c} experts", n.id);
    }
    println!("apply it with `moectl placement rebalance` (or `plan --json > FILE` and `apply FILE`)");
    Ok(())
}

/// Files `kind`, waits for the controller's answer and for every router to serve the new epoch.
async fn request(cluster: &Cluster, kind: RequestKind, json: bool) -> Result<()> {
    let started = Instant::now();
    let id = cluster.request("moectl", kind).await?;
    let epoch = loop {
        let view = cluster.snapshot().await?;
        if let Some(o) = view.outcome.filter(|o| o.request == id) {
            break o.result.map_err(|e| anyhow::anyhow!("the controller refused: {e}"))?;
        }
        if started.elapsed() > Duration::from_secs(30) {
            cluster.withdraw(id).await?;
            bail!("no controller answered within 30 s (is a router of the cluster running?); request withdrawn");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let written = started.elapsed();
    let serving = wait_serving(cluster, epoch, Duration::from_secs(300)).await?;
    if json {
        println!(
            "{}",
            serde_json::json!({"epoch": epoch, "written_s": written.as_secs_f64(), "serving_s": serving.as_secs_f64() + written.as_secs_f64()})
        );
    } else {
        println!(
            "epoch {epoch} written after {:.2} s; every router serves it after {:.2} s",
            written.as_secs_f64(),
            written.as_secs_f64() + serving.as_secs_f64()
        );
    }
    Ok(())
}

/// Waits until every router dispatches with `epoch` (or newer); returns how long that took.
async fn wait_serving(cluster: &Cluster, epoch: u64, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let view = cluster.snapshot().await?;
        let routers: Vec<_> = view.members.values().filter(|m| m.role == Role::Router).collect();
        if !routers.is_empty() && routers.iter().all(|r| view.using.get(&r.id).is_some_and(|&e| e >= epoch)) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("routers did not switch to epoch {epoch} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn drain(cluster: &Cluster, view: &ClusterView, node: &str, no_wait: bool, json: bool) -> Result<()> {
    if !view.members.get(node).is_some_and(|m| m.role == Role::Expert) {
        let known: Vec<_> = view.expert_nodes().map(|m| m.id.as_str()).collect();
        bail!("no expert node {node} in cluster {} (expert nodes: {})", cluster.name(), known.join(", "));
    }
    let started = Instant::now();
    cluster.drain(node, None).await?;
    if no_wait {
        println!("drain of {node} requested");
        return Ok(());
    }
    eprintln!("draining {node}: waiting for an epoch without it ...");
    let epoch = loop {
        let view = cluster.snapshot().await?;
        if let Some(p) = view.placement.as_ref().filter(|p| p.node_index(node).is_none()) {
            break p.epoch;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("no placement without {node} after 60 s: do the other nodes have room for its experts?");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let serving = started.elapsed() + wait_serving(cluster, epoch, Duration::from_secs(300)).await?;
    eprintln!("epoch {epoch} serves without {node}; waiting for it to exit ...");
    let mut store_ok = true;
    while cluster.snapshot().await?.members.contains_key(node) {
        if started.elapsed() > Duration::from_secs(120) {
            store_ok = false;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if store_ok {
        // The mark has done its work; a node started again under this id joins afresh.
        let _ = cluster.undrain(node).await;
    }
    let out = serde_json::json!({
        "node": node, "epoch": epoch, "serving_s": serving.as_secs_f64(), "exited": store_ok,
        "total_s": started.elapsed().as_secs_f64(),
    });
    if json {
        println!("{out}");
    } else if store_ok {
        println!(
            "{node} drained: epoch {epoch} served without it after {:.2} s; it left after {:.2} s",
            serving.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
    } else {
        println!("{node}: its experts moved (epoch {epoch}), but it is still registered after 120 s");
    }
    Ok(())
}
