//! moectl: the operator's command-line tool for moe-mesh.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
#[cfg(feature = "cuda")]
mod bench_cuda;
mod bench_dataplane;
mod bench_model;
mod certs;
mod cluster;
mod generate;
mod init_model;
mod placement;
mod plan;
mod remote;
mod up;

/// moe-mesh: expert-parallel serving of Qwen3.5-MoE / Qwen3-Next models.
#[derive(Debug, Parser)]
#[command(name = "moectl", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Bring up a local cluster: expert-node processes and an OpenAI-compatible router (the demo model by default).
    Up(up::Args),
    /// Load-test an OpenAI-compatible endpoint (this one or another) and report throughput, TTFT, TPOT and ITL.
    Bench(bench::Args),
    /// Generate text from a prompt with a model directory (in this process, or with the experts on expert nodes).
    Generate(generate::Args),
    /// Create a development CA and issue the role certificates the cluster's links are authenticated with.
    Certs(certs::Args),
    /// Write a random-weight model in the official Qwen3.5 checkpoint layout.
    InitModel(init_model::Args),
    /// Show and change where a cluster's experts live (etcd): show, plan, apply, rebalance, drain.
    Placement(placement::Args),
    /// Measure decode and prefill speed of a model next to this machine's memory bandwidth and FMA peak.
    BenchModel(bench_model::Args),
    /// Measure the expert data plane: per-layer round trip on loopback, and decode throughput with the experts on
    /// expert-node processes next to the single-process engine.
    BenchDataplane(bench_dataplane::Args),
    /// Plan capacity: routers, expert nodes, replicas and micro-batches for a load under an SLO, with memory, cost
    /// and the throughput/latency trade-off; `plan calibrate` writes this machine's hardware profile.
    Plan(Box<plan::Args>),
    /// Measure the CUDA backend on one card: grouped expert GEMMs next to cuBLAS dense GEMMs, and a decode step's
    /// routed-expert work next to the HBM-bandwidth floor (builds with `--features cuda`).
    #[cfg(feature = "cuda")]
    BenchCuda(bench_cuda::Args),
}

/// Loads a model directory with a progress bar on stderr (shown only when loading takes more than a moment); the
/// routed experts only when `with_experts` (not when they live on expert nodes).
fn load_model(dir: &std::path::Path, mapped: bool, with_experts: bool) -> anyhow::Result<moe_model::LoadedModel> {
    use anyhow::Context;
    let bar = indicatif::ProgressBar::hidden();
    bar.set_style(
        indicatif::ProgressStyle::with_template("loading weights [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let shown = std::sync::atomic::AtomicBool::new(false);
    let residency = if mapped { moe_model::Residency::Mapped } else { moe_model::Residency::Resident };
    let lm = moe_model::LoadedModel::load_selected(
        dir,
        residency,
        &|done, total| {
            if !shown.load(std::sync::atomic::Ordering::Relaxed) && started.elapsed().as_millis() > 500 {
                shown.store(true, std::sync::atomic::Ordering::Relaxed);
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            }
            bar.set_length(total);
            bar.set_position(done);
        },
        &|_, _| with_experts,
    )
    .with_context(|| format!("loading the model in {}", dir.display()))?;
    bar.finish_and_clear();
    tracing::info!(elapsed = ?started.elapsed(), model = %dir.display(), "model loaded");
    Ok(lm)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    moe_telemetry::init_logging("warn");
    let result = match cli.command {
        Command::Up(args) => up::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Generate(args) => generate::run(args),
        Command::InitModel(args) => init_model::run(args),
        Command::Certs(args) => certs::run(args),
        Command::BenchModel(args) => bench_model::run(args),
        Command::Placement(args) => placement::run(args),
        Command::BenchDataplane(args) => bench_dataplane::run(args),
        Command::Plan(args) => plan::run(*args),
        #[cfg(feature = "cuda")]
        Command::BenchCuda(args) => bench_cuda::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
