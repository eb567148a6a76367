//! `moectl plan`: how many routers and expert nodes of which hardware a load needs under an SLO, what each holds
//! in memory, what it costs, and the trade-off between throughput per node and per-user speed ([`moe_plan`]);
//! `moectl plan calibrate` writes the hardware profile of this machine from its own benchmark reports.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use moe_plan::calibrate::{self, MachineFacts, ServingRun};
use moe_plan::{
    Arrivals, Candidate, EngineLimits, ExpertLoad, HardwareFile, Inputs, Layout, Length, Network, Plan, Shape, Slo,
    Space, Traffic,
};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<PlanCommand>,
    #[command(flatten)]
    plan: PlanArgs,
}

#[derive(Debug, clap::Subcommand)]
enum PlanCommand {
    /// Write a hardware profile of this machine from `moectl bench-model --json` (and `bench-dataplane --json`,
    /// `bench --json`) reports measured on it.
    Calibrate(CalibrateArgs),
}

#[derive(Debug, clap::Args)]
struct PlanArgs {
    /// The model: its directory or its config.json.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Hardware profiles (JSON; `moectl plan calibrate` writes one, deploy/profiles/ has shipped ones).
    #[arg(long)]
    hardware: Option<PathBuf>,
    /// The profile routers run on (default: the file's first).
    #[arg(long)]
    router_hw: Option<String>,
    /// The profile expert nodes run on (default: the router's).
    #[arg(long)]
    expert_hw: Option<String>,
    /// Latency objectives, e.g. `ttft=2s,tpot=150ms,p=90` (p: the percentile, 50, 90 or 99; default 90).
    #[arg(long, default_value = "")]
    slo: String,
    /// The load: `rate=R` (requests/s, Poisson) or `concurrency=C` (closed loop), with `prompt=N` or `prompt=LO..HI`,
    /// `output=...` and `requests=N` (simulated requests, default 200).
    #[arg(long, default_value = "concurrency=8,prompt=128,output=64")]
    traffic: String,
    /// Hot-expert skew as a Zipf exponent over the experts (0: uniform).
    #[arg(long, default_value_t = 0.0)]
    skew: f64,
    /// Measured loads instead of --skew: a JSON array of per-expert counts (e.g. from `moectl placement show --json`).
    #[arg(long)]
    loads: Option<PathBuf>,
    /// Router counts to try.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    routers: Vec<usize>,
    /// Expert-node counts to try (0: the experts in the routers' processes).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,4,8")]
    expert_nodes: Vec<usize>,
    /// Numbers of hottest experts to give a second copy.
    #[arg(long, value_delimiter = ',', default_value = "0,4")]
    replicas: Vec<usize>,
    /// Micro-batch depths to try.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    micro_batches: Vec<usize>,
    /// Every process on one machine of the router's profile, as `moectl up` runs them (one router).
    #[arg(long)]
    one_machine: bool,
    /// Element type on the wire (f32 or bf16).
    #[arg(long, default_value = "f32")]
    wire_dtype: String,
    /// The engine's token budget per step.
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// The engine's most running sequences.
    #[arg(long, default_value_t = 256)]
    max_running: usize,
    /// Print every configuration as JSON.
    #[arg(long)]
    json: bool,
    /// Write the trade-off plot (SVG) here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// `current`: cost the running cluster as etcd holds it (its routers, expert nodes, replicas and measured
    /// expert load) with one change at a time: one more expert node, one more router, a second copy of the hottest
    /// experts. --traffic is the load to cost it under; the search-space flags are not used.
    #[arg(long, value_parser = ["current"], requires = "etcd")]
    placement: Option<String>,
    /// etcd endpoints of the cluster (`host:port[,host:port...]`), with --placement.
    #[arg(long, env = "MOE_ETCD")]
    etcd: Option<String>,
    /// Name of the cluster in etcd.
    #[arg(long, env = "MOE_CLUSTER", default_value = "default")]
    cluster: String,
    /// With --placement: how many more of the hottest experts the replica change copies [default: a tenth].
    #[arg(long)]
    hot: Option<usize>,
}

#[derive(Debug, clap::Args)]
struct CalibrateArgs {
    /// `moectl bench-model --batch 1,8,32,64 --prompt-len 128,512 --json` output measured on this machine (each
    /// prompt length is a point of the correction tables: give the lengths the cluster will see).
    #[arg(long)]
    bench_model: PathBuf,
    /// `moectl bench-dataplane --json` output: the expert link's round trip and codec rate.
    #[arg(long)]
    dataplane: Option<PathBuf>,
    /// `moectl bench --json` outputs against `moectl up` on this machine, to fit the serving overhead (per step and
    /// per sampled token: give runs at two or more concurrencies); each as FILE:EXPERT_NODES:MICRO_BATCHES:PROMPT:OUTPUT.
    #[arg(long)]
    serving: Vec<String>,
    /// The model bench-model ran (default: the path its report names).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The profile's name.
    #[arg(long)]
    name: String,
    /// Price of the machine, $/hour.
    #[arg(long, default_value_t = 0.0)]
    cost_per_hour: f64,
    /// Memory for the server, GB (default: this machine's available memory).
    #[arg(long)]
    memory_gb: Option<f64>,
    /// Bandwidth of the machine's link to other nodes, Gbit/s.
    #[arg(long, default_value_t = 10.0)]
    network_gbps: f64,
    /// Round trip to another node when no dataplane report is given, µs.
    #[arg(long, default_value_t = 60.0)]
    round_trip_us: f64,
    /// Write the hardware file here (a file with one profile).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Some(PlanCommand::Calibrate(c)) => calibrate(c),
        None => plan(args.plan),
    }
}

/// The model's shape from a directory or a config.json.
fn shape_of(path: &Path) -> Result<Shape> {
    let file = if path.is_dir() { path.join("config.json") } else { path.to_owned() };
    let config = moe_model::ModelConfig::from_file(&file)?;
    Ok(Shape::of(&config))
}

fn seconds(s: &str, key: &str) -> Result<f64> {
    let (num, scale) = if let Some(v) = s.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = s.strip_suffix("us") {
        (v, 1e-6)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.parse().with_context(|| format!("--slo {key}={s}: not a duration (e.g. 2s, 150ms)"))?;
    if !(v.is_finite() && v > 0.0) {
        bail!("--slo {key}={s}: must be positive");
    }
    Ok(v * scale)
}

fn parse_slo(text: &str) -> Result<Slo> {
    let mut slo = Slo { ttft_s: None, tpot_s: None, percentile: 90 };
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').with_context(|| format!("--slo {part}: expected key=value"))?;
        match k {
            "ttft" => slo.ttft_s = Some(seconds(v, k)?),
            "tpot" => slo.tpot_s = Some(seconds(v, k)?),
            "p" => slo.percentile = v.trim_start_matches('p').parse().with_context(|| format!("--slo p={v}"))?,
            _ => bail!("--slo {k}: ttft, tpot or p"),
        }
    }
    Ok(slo)
}

fn parse_length(v: &str, key: &str) -> Result<Length> {
    let n = |s: &str| -> Result<usize> {
        let x: usize = s.parse().with_context(|| format!("--traffic {key}={v}: not a token count"))?;
        if x == 0 {
            bail!("--traffic {key}={v}: must be at least 1");
        }
        Ok(x)
    };
    match v.split_once("..") {
        Some((lo, hi)) => {
            let (lo, hi) = (n(lo)?, n(hi)?);
            if lo > hi {
                bail!("--traffic {key}={v}: the low end is above the high end");
            }
            Ok(Length::Uniform(lo, hi))
        }
        None => Ok(Length::Fixed(n(v)?)),
    }
}

fn parse_traffic(text: &str) -> Result<Traffic> {
    let mut t = Traffic {
        arrivals: Arrivals::Concurrency(8),
        prompt: Length::Fixed(128),
        output: Length::Fixed(64),
        requests: 200,
    };
    let mut arrivals = None;
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').with_context(|| format!("--traffic {part}: expected key=value"))?;
        match k {
            "rate" => {
                let r: f64 = v.parse().with_context(|| format!("--traffic rate={v}: not a number"))?;
                if !(r.is_finite() && r > 0.0) {
                    bail!("--traffic rate={v}: requests per second must be positive");
                }
                arrivals = Some(Arrivals::Rate(r));
            }
            "concurrency" => {
                let c: usize = v.parse().with_context(|| format!("--traffic concurrency={v}: not a count"))?;
                if c == 0 {
                    bail!("--traffic concurrency=0: at least 1");
                }
                arrivals = Some(Arrivals::Concurrency(c));
            }
            "prompt" => t.prompt = parse_length(v, k)?,
            "output" => t.output = parse_length(v, k)?,
            "requests" => {
                t.requests = v.parse().with_context(|| format!("--traffic requests={v}: not a count"))?;
                if t.requests == 0 || t.requests > 100_000 {
                    bail!("--traffic requests={v}: 1 to 100000");
                }
            }
            _ => bail!("--traffic {k}: rate, concurrency, prompt, output or requests"),
        }
    }
    if let Some(a) = arrivals {
        t.arrivals = a;
    }
    Ok(t)
}

fn plan(args: PlanArgs) -> Result<()> {
    let model = args.model.as_deref().context("--model is needed (a model directory or its config.json)")?;
    let hardware = args.hardware.as_deref().context("--hardware is needed (a profile file: deploy/profiles/)")?;
    let shape = shape_of(model)?;
    let file = HardwareFile::load(hardware)?;
    let router = file.get(args.router_hw.as_deref())?;
    let expert = match &args.expert_hw {
        Some(name) => file.get(Some(name))?,
        None => router,
    };
    let slo = parse_slo(&args.slo)?;
    let traffic = parse_traffic(&args.traffic)?;
    let load = match &args.loads {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let counts: Vec<f64> = serde_json::from_str(&text)
                .with_context(|| format!("{}: expected a JSON array of per-expert counts", path.display()))?;
            if counts.len() != shape.experts || counts.iter().any(|c| !c.is_finite() || *c < 0.0) {
                bail!("{}: {} counts of zero or more are needed, one per expert", path.display(), shape.experts);
            }
            ExpertLoad::from_counts(&counts)
        }
        None => {
            if !(args.skew.is_finite() && args.skew >= 0.0 && args.skew <= 10.0) {
                bail!("--skew {}: a Zipf exponent from 0 to 10", args.skew);
            }
            ExpertLoad::zipf(shape.experts, args.skew)
        }
    };
    let wire_value_bytes = match args.wire_dtype.as_str() {
        "f32" => 4.0,
        "bf16" => 2.0,
        other => bail!("--wire-dtype {other}: f32 or bf16"),
    };
    let routers = if args.one_machine { vec![1] } else { args.routers.clone() };
    let mut inputs = Inputs {
        shape: &shape,
        router,
        expert,
        traffic,
        slo,
        load,
        limits: EngineLimits { max_batch_tokens: args.max_batch_tokens, max_running: args.max_running },
        space: Space {
            routers,
            expert_nodes: args.expert_nodes.clone(),
            replicas: args.replicas.clone(),
            micro_batches: args.micro_batches.clone(),
        },
        one_machine: args.one_machine,
        wire_value_bytes,
    };
    if args.placement.is_some() {
        let (current, live_load, summary) = live_cluster(&args, &shape)?;
        if let Some(load) = live_load {
            inputs.load = load;
        }
        let hot = args.hot.unwrap_or(shape.experts.div_ceil(10));
        let changes = moe_plan::what_if(&inputs, current, hot)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({"cluster": summary, "changes": changes}))?);
        } else {
            print_what_if(&summary, &changes, inputs.slo.percentile);
        }
        return Ok(());
    }
    let plan = inputs.plan()?;
    if let Some(path) = &args.plot {
        moe_plan::plot::write_svg(&plan, &format!("{} on {}", model.display(), router.name), path)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print_plan(&plan, &inputs, router.name.as_str(), expert.name.as_str());
        if let Some(path) = &args.plot {
            println!("plot: {}", path.display());
        }
    }
    if plan.best.is_none() {
        let closest = plan
            .candidates
            .iter()
            .filter(|c| c.router_memory.fits)
            .min_by(|a, b| a.outcome.tpot_s.p90.total_cmp(&b.outcome.tpot_s.p90));
        match closest {
            Some(c) => bail!(
                "no configuration meets the SLO at this load; the closest ({} routers, {} expert nodes): {}",
                c.routers,
                c.expert_nodes,
                c.verdict
            ),
            None => bail!("no configuration fits in memory: {}", plan.candidates.first().map_or("", |c| &c.verdict)),
        }
    }
    Ok(())
}

fn layout_name(c: &Candidate) -> String {
    if c.colocated {
        format!("{}r co-located", c.routers)
    } else {
        format!("{}r+{}e rep{} mb{}", c.routers, c.expert_nodes, c.replicas, c.micro_batches)
    }
}

fn print_plan(plan: &Plan, inputs: &Inputs<'_>, router: &str, expert: &str) {
    let q = inputs.slo.percentile;
    println!(
        "routers on {router}, expert nodes on {expert}; {} KV bytes/token, {:.1} MB DeltaNet slot/sequence, {:.2} GB of experts",
        inputs.shape.kv_bytes_per_token(),
        inputs.shape.deltanet_slot_bytes() / 1e6,
        inputs.shape.all_expert_bytes() / 1e9
    );
    println!(
        "{:<24} {:>5} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>7} {:>8}  verdict",
        "layout",
        "nodes",
        "router GB",
        "expert GB",
        "out tok/s",
        "per node",
        "TTFT p50",
        &format!("TTFT p{q}"),
        "TPOT p50",
        &format!("TPOT p{q}"),
        "wire B/t",
        "link",
        "$/h",
        "$/M out"
    );
    for (i, c) in plan.candidates.iter().enumerate() {
        let mark = if Some(i) == plan.best {
            "* "
        } else if Some(i) == plan.best_colocated {
            "+ "
        } else if c.pareto {
            "p "
        } else {
            "  "
        };
        println!(
            "{mark}{:<22} {:>5} {:>9.2} {:>9.2} {:>8.1} {:>8.1} {:>7.0}ms {:>7.0}ms {:>7.1}ms {:>7.1}ms {:>8.0} {:>5.0}% {:>7.2} {:>8.2}  {}",
            layout_name(c),
            c.nodes,
            c.router_memory.total / 1e9,
            c.expert_node_memory.total / 1e9,
            c.outcome.output_tokens_per_s,
            c.output_tokens_per_s_per_node,
            c.outcome.ttft_s.p50 * 1e3,
            c.outcome.ttft_s.at(q) * 1e3,
            c.outcome.tpot_s.p50 * 1e3,
            c.outcome.tpot_s.at(q) * 1e3,
            c.outcome.wire_bytes_per_output_token,
            c.outcome.link_utilisation * 100.0,
            c.cost_per_hour,
            c.dollars_per_million_output_tokens,
            c.verdict
        );
    }
    println!("* the cheapest layout that meets the SLO; + the cheapest co-located one; p on the Pareto set");
    if let (Some(b), Some(c)) = (plan.best, plan.best_colocated) {
        let (b, c) = (&plan.candidates[b], &plan.candidates[c]);
        if !b.colocated {
            println!(
                "disaggregation pays here: {} at ${:.2}/h against co-located {} at ${:.2}/h",
                layout_name(b),
                b.cost_per_hour,
                layout_name(c),
                c.cost_per_hour
            );
        }
    } else if let (Some(b), None) = (plan.best, plan.best_colocated) {
        if plan.candidates.iter().any(|c| c.expert_nodes == 0) {
            println!("no co-located layout meets the SLO; {} does", layout_name(&plan.candidates[b]));
        }
    }
}

/// What etcd says of the running cluster: its layout, its measured expert load (None before any was reported), and
/// a summary for the output.
fn live_cluster(args: &PlanArgs, shape: &Shape) -> Result<(Layout, Option<ExpertLoad>, serde_json::Value)> {
    let etcd = args.etcd.as_deref().context("--placement current needs --etcd")?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let view = runtime.block_on(async {
        let store = moe_placement::open_store_with(Some(etcd), None).await?;
        let cluster = moe_placement::Cluster::new(store, &args.cluster)?;
        anyhow::Ok(cluster.snapshot().await?)
    })?;
    let model = view.model.as_ref().with_context(|| {
        format!("cluster {:?} in etcd has no model yet: start a router (its controller writes it)", args.cluster)
    })?;
    if model.num_experts as usize != shape.experts || model.moe_layers.len() != shape.moe_layers {
        bail!(
            "cluster {:?} serves {} experts in {} MoE layers; --model has {} in {}",
            args.cluster,
            model.num_experts,
            model.moe_layers.len(),
            shape.experts,
            shape.moe_layers
        );
    }
    let placement =
        view.placement.as_ref().with_context(|| format!("cluster {:?} has no placement yet", args.cluster))?;
    let routers = view.members.values().filter(|m| m.role == moe_placement::Role::Router).count();
    // The planner's replicas: extra copies per layer, averaged over the layers.
    let copies: usize = placement.hosted.iter().flatten().map(Vec::len).sum();
    let layers = placement.hosted.len().max(1);
    let replicas =
        (copies.saturating_sub(shape.experts * placement.hosted.len()) as f64 / layers as f64).round() as usize;
    let layout = Layout {
        routers: routers.max(1),
        expert_nodes: placement.nodes.len(),
        replicas,
        micro_batches: args.micro_batches.first().copied().unwrap_or(1).max(1),
        one_machine: args.one_machine,
    };
    let load = view.total_load(model);
    let pairs_per_s: f64 = load.iter().flatten().sum();
    let live = (pairs_per_s > 0.0).then(|| ExpertLoad::from_layers(&load));
    let top_tenth = live.as_ref().map(|l| l.shares.iter().take(shape.experts.div_ceil(10)).sum::<f64>());
    let summary = serde_json::json!({
        "cluster": args.cluster,
        "epoch": placement.epoch,
        "routers": layout.routers,
        "expert_nodes": layout.expert_nodes,
        "replicas_per_layer": layout.replicas,
        "measured_pairs_per_s": pairs_per_s,
        "hottest_tenth_share": top_tenth,
    });
    Ok((layout, live, summary))
}

fn print_what_if(summary: &serde_json::Value, changes: &[moe_plan::Change], q: u32) {
    println!(
        "cluster {} at epoch {}: {} routers, {} expert nodes, {} replicas per layer; {}",
        summary["cluster"].as_str().unwrap_or("?"),
        summary["epoch"],
        summary["routers"],
        summary["expert_nodes"],
        summary["replicas_per_layer"],
        match summary["hottest_tenth_share"].as_f64() {
            Some(s) => format!(
                "measured load {:.0} (token, expert) pairs/s, the hottest tenth of the experts take {:.0} %",
                summary["measured_pairs_per_s"].as_f64().unwrap_or(0.0),
                s * 100.0
            ),
            None => "no load measured yet (costed as uniform, or as --skew / --loads say)".to_owned(),
        }
    );
    println!(
        "{:<44} {:>5} {:>9} {:>7} {:>9} {:>7} {:>9} {:>7} {:>7}",
        "change",
        "nodes",
        "out tok/s",
        "ratio",
        &format!("TPOT p{q}"),
        "ratio",
        &format!("TTFT p{q}"),
        "ratio",
        "$/h"
    );
    for c in changes {
        let o = &c.candidate.outcome;
        println!(
            "{:<44} {:>5} {:>9.1} {:>6.2}x {:>7.1}ms {:>6.2}x {:>7.0}ms {:>6.2}x {:>7.2}  {}",
            c.change,
            c.candidate.nodes,
            o.output_tokens_per_s,
            c.throughput_ratio,
            o.tpot_s.at(q) * 1e3,
            c.tpot_ratio,
            o.ttft_s.at(q) * 1e3,
            c.ttft_ratio,
            c.candidate.cost_per_hour,
            c.candidate.verdict
        );
    }
}

fn calibrate(args: CalibrateArgs) -> Result<()> {
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&args.bench_model)
            .with_context(|| format!("reading {}", args.bench_model.display()))?,
    )
    .with_context(|| format!("{}: not JSON", args.bench_model.display()))?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => PathBuf::from(report["model"].as_str().context("the report names no model: give --model")?),
    };
    let shape = shape_of(&model)?;
    let memory_bytes = match args.memory_gb {
        Some(g) if g.is_finite() && g > 0.0 => g * 1e9,
        Some(g) => bail!("--memory-gb {g}: must be positive"),
        None => available_memory().context("reading /proc/meminfo: give --memory-gb")?,
    };
    if !(args.network_gbps.is_finite() && args.network_gbps > 0.0) {
        bail!("--network-gbps {}: must be positive", args.network_gbps);
    }
    let facts = MachineFacts {
        name: args.name.clone(),
        source: format!(
            "measured by moectl plan calibrate from {} ({} threads, kernel {})",
            args.bench_model.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            report["threads"],
            report["kernel"].as_str().unwrap_or("?")
        ),
        cost_per_hour: args.cost_per_hour,
        memory_bytes,
        cores: 0,
        network: Network {
            bandwidth_bytes_per_s: args.network_gbps * 1e9 / 8.0,
            round_trip_s: args.round_trip_us * 1e-6,
            codec_bytes_per_s: 0.0,
        },
    };
    let mut profile = calibrate::from_reports(&shape, &args.bench_model, args.dataplane.as_deref(), facts)?;
    let mut runs = Vec::new();
    for spec in &args.serving {
        let parts: Vec<&str> = spec.split(':').collect();
        let [file, nodes, micro, prompt, output] = parts[..] else {
            bail!("--serving {spec}: FILE:EXPERT_NODES:MICRO_BATCHES:PROMPT:OUTPUT");
        };
        let num =
            |s: &str| -> Result<usize> { s.parse().with_context(|| format!("--serving {spec}: {s} is not a count")) };
        let layout = Layout {
            routers: 1,
            expert_nodes: num(nodes)?,
            replicas: 0,
            micro_batches: num(micro)?.max(1),
            one_machine: true,
        };
        runs.push(ServingRun::read(Path::new(file), layout, num(prompt)?, num(output)?)?);
    }
    calibrate::fit_serving(&shape, &mut profile, &runs);
    let file = HardwareFile { profiles: vec![profile] };
    std::fs::write(&args.out, serde_json::to_string_pretty(&file)? + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    let p = &file.profiles[0];
    eprintln!(
        "wrote {} ({}): {:.1} GB/s, matmul {:.0} GFLOP/s, vector {:.0} GFLOP/s, {} correction tables, serving {:.2} ms/step + {:.2} ms/sampled token",
        args.out.display(),
        p.name,
        p.memory_bandwidth_bytes_per_s / 1e9,
        p.matmul_flops_per_s / 1e9,
        p.vector_flops_per_s / 1e9,
        p.corrections.len(),
        p.serving.per_step_s * 1e3,
        p.serving.per_token_s * 1e3
    );
    Ok(())
}

/// MemAvailable of /proc/meminfo, in bytes.
fn available_memory() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0)
}
