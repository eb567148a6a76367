//! `moectl init-model`: write a random-weight model in the official Qwen3.5 layout.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use moe_model::synth::{self, Preset, SynthOptions};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// tiny (tests), demo (the local cluster's default), bench (benchmarks), qwen3.5-35b-a3b, qwen3.5-397b-a17b.
    #[arg(long, value_parser = parse_preset)]
    preset: Preset,
    /// Output directory (created; must be empty unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random weights; the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Override the preset's number of layers (keeps the 3 linear : 1 full attention pattern).
    #[arg(long)]
    layers: Option<usize>,
    /// Largest safetensors shard, in GiB.
    #[arg(long, default_value_t = 4.0)]
    shard_gib: f64,
    /// Overwrite files in a non-empty output directory.
    #[arg(long)]
    force: bool,
    /// Bias the gating towards a tenth of each layer's experts, for load-balancing benchmarks: 0 is unbiased, about
    /// 2 sends half of the tokens to the hot tenth.
    #[arg(long, default_value_t = 0.0)]
    router_skew: f32,
}

fn parse_preset(s: &str) -> Result<Preset, String> {
    Preset::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
        format!("unknown preset {s:?} (choose from {})", names.join(", "))
    })
}

pub fn run(args: Args) -> Result<()> {
    if args.out.exists() && !args.force && args.out.read_dir().map(|mut d| d.next().is_some()).unwrap_or(false) {
        bail!("{} is not empty (use --force to overwrite)", args.out.display());
    }
    if args.shard_gib.is_nan() || args.shard_gib <= 0.0 {
        bail!("--shard-gib must be positive");
    }
    let opts = SynthOptions {
        preset: args.preset,
        layers: args.layers,
        seed: args.seed,
        max_shard_bytes: (args.shard_gib * (1u64 << 30) as f64) as u64,
        router_skew: args.router_skew,
    };
    let total = synth::tensor_bytes(&opts);
    eprintln!("writing {} ({:.2} GB of weights) to {}", args.preset.name(), total as f64 / 1e9, args.out.display());
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} writing weights [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let summary = synth::write_model(&args.out, &opts, &|done, _| bar.set_position(done))
        .with_context(|| format!("writing {}", args.out.display()))?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} ({} parameters, {:.2} GB of bf16 in {} file{}) to {} in {:.1} s",
        args.preset.name(),
        summary.parameters,
        summary.tensor_bytes as f64 / 1e9,
        summary.files.len(),
        if summary.files.len() == 1 { "" } else { "s" },
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes `preset` with its defaults into `out` (which must not exist or be empty), with the same progress bar.
pub fn write_preset(preset: Preset, out: &std::path::Path) -> Result<()> {
    run(Args { preset, out: out.to_owned(), seed: 0, layers: None, shard_gib: 4.0, force: false, router_skew: 0.0 })
}
