//! `moectl bench-model`: decode and prefill throughput of one model in this process, printed next to the machine's
//! memory bandwidth, f32 FMA peak and matmul-kernel peak as measured by the same run (ratios survive noisy, shared
//! machines), with the time of each stage of the step ([`moe_model::cpu::profile`]).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{bail, Result};
use moe_model::cpu::profile::{self, Stage, StageTotals};
use moe_model::cpu::{matmul, probe};
use moe_model::{LogitsFor, Segment, SequenceState};
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model directory (e.g. one written by `moectl init-model --preset bench`).
    #[arg(long)]
    model: PathBuf,
    /// Read the weights in place from the memory-mapped files instead of copying them into process memory: starts
    /// faster, decodes slower.
    #[arg(long)]
    mapped: bool,
    /// Decode batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    batch: Vec<usize>,
    /// Timed decode steps per round.
    #[arg(long, default_value_t = 16)]
    decode_steps: usize,
    /// Timed prefill rounds, and rounds per decode batch size (each paired with its own bandwidth probe); the median
    /// round is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Prompt lengths of the prefill measurements. The JSON's `prefill` is the first; `prefills` has every one
    /// (`moectl plan calibrate` reads them all: give the prompt lengths the cluster will see, e.g. `128,512`).
    #[arg(long, value_delimiter = ',', default_value = "512")]
    prompt_len: Vec<usize>,
    /// Buffer for the memory-bandwidth probe, in GiB (make it several times the last-level cache).
    #[arg(long, default_value_t = 2.0)]
    bandwidth_gib: f64,
    /// Print the results as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    cpu: moe_model::cpu::CpuArgs,
}

/// `n` pseudo-random token ids below `vocab`, the same for the same seed (the benchmarks' inputs).
pub(crate) fn tokens(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}

pub fn run(args: Args) -> Result<()> {
    if args.decode_steps == 0 || args.rounds == 0 || args.prompt_len.contains(&0) || args.batch.contains(&0) {
        bail!("--decode-steps, --rounds, every --prompt-len and every --batch must be positive");
    }
    if args.prompt_len.is_empty() {
        bail!("--prompt-len needs at least one length");
    }
    let selection = args.cpu.apply()?;
    let threads = rayon::current_num_threads();
    eprintln!(
        "measuring memory bandwidth ({:.1} GiB buffer), FMA peak and the {} {} matmul peak on {threads} threads...",
        args.bandwidth_gib,
        selection.kernel.name(),
        selection.precision.name()
    );
    // Shared machines are noisy: the bandwidth probe runs before every measurement and the best figure of the run
    // is the denominator, so ratios err on the low side.
    let probe_bytes = (args.bandwidth_gib * (1u64 << 30) as f64) as usize;
    let mut bandwidth = probe::memory_bandwidth(probe_bytes, 5);
    let peak = probe::fma_peak();
    let kernel_peak = probe::matmul_peak();
    profile::enable(true);

    let t0 = Instant::now();
    let lm = crate::load_model(&args.model, args.mapped, true)?;
    let load_s = t0.elapsed().as_secs_f64();
    let model = &lm.model;
    let experts = &lm.experts;
    let cfg = model.config();
    let vocab = cfg.vocab_size;
    eprintln!("loaded {} in {load_s:.2} s; matmul kernel {}", args.model.display(), matmul::kernel_name());

    let forward = |segs: &mut [Segment<'_>]| model.forward(segs, experts);

    // Prefill, per prompt length: once to fault the weights in from the page cache, then `--rounds` timed rounds;
    // the median is reported.
    let mut prefills = Vec::with_capacity(args.prompt_len.len());
    for &len in &args.prompt_len {
        let prompt = tokens(len, 1, vocab);
        let mut rounds = Vec::with_capacity(args.rounds);
        for round in 0..=args.rounds {
            let mut st = model.new_state();
            let p0 = profile::snapshot();
            let f0 = experts.stats.flops.load(Ordering::Relaxed);
            let n0 = experts.stats.nanos.load(Ordering::Relaxed);
            let t = Instant::now();
            forward(&mut [Segment { state: &mut st, tokens: &prompt, logits: LogitsFor::Last }])?;
            let secs = t.elapsed().as_secs_f64();
            if round > 0 {
                let stages = profile::delta(&p0, &profile::snapshot());
                let flops = experts.stats.flops.load(Ordering::Relaxed) - f0;
                let nanos = experts.stats.nanos.load(Ordering::Relaxed) - n0;
                rounds.push((secs, stages, flops, nanos as f64 * 1e-9));
            }
        }
        rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        prefills.push(Prefill { len, rounds });
    }

    let mut decode = Vec::new();
    for &batch in &args.batch {
        let mut states: Vec<SequenceState> = (0..batch).map(|_| model.new_state()).collect();
        let prompts: Vec<Vec<u32>> = (0..batch).map(|i| tokens(16 + i % 7, 10 + i as u64, vocab)).collect();
        let mut segs: Vec<Segment<'_>> = states
            .iter_mut()
            .zip(&prompts)
            .map(|(s, p)| Segment { state: s, tokens: p, logits: LogitsFor::Last })
            .collect();
        forward(&mut segs)?;
        let feed = tokens(args.rounds * args.decode_steps + 2, 99, vocab);
        let mut step = |i: usize| -> Result<()> {
            let toks: Vec<u32> = (0..batch).map(|b| (feed[i] + b as u32) % vocab as u32).collect();
            let mut segs: Vec<Segment<'_>> = states
                .iter_mut()
                .zip(&toks)
                .map(|(s, t)| Segment { state: s, tokens: std::slice::from_ref(t), logits: LogitsFor::Last })
                .collect();
            forward(&mut segs)?;
            Ok(())
        };
        step(0)?;
        step(1)?;
        // Each round probes the bandwidth right before its timed steps, so that each ratio compares two figures taken
        // under the same load from other tenants; the median round is reported.
        let mut rounds = Vec::with_capacity(args.rounds);
        let mut stage_sum = [StageTotals::default(); 5];
        for round in 0..args.rounds {
            let probe_now = probe::memory_bandwidth(probe_bytes, 2);
            bandwidth = bandwidth.max(probe_now);
            let b0 = experts.stats.weight_bytes.load(Ordering::Relaxed);
            let p0 = profile::snapshot();
            let t = Instant::now();
            for i in 0..args.decode_steps {
                step(2 + round * args.decode_steps + i)?;
            }
            let d = profile::delta(&p0, &profile::snapshot());
            for (sum, x) in stage_sum.iter_mut().zip(&d) {
                sum.nanos += x.nanos;
                sum.flops += x.flops;
                sum.weight_bytes += x.weight_bytes;
            }
            let step_s = t.elapsed().as_secs_f64() / args.decode_steps as f64;
            let expert_bytes =
                (experts.stats.weight_bytes.load(Ordering::Relaxed) - b0) as f64 / args.decode_steps as f64;
            let bytes_per_step = model.dense_weight_bytes() as f64 + expert_bytes;
            rounds.push((step_s, bytes_per_step, probe_now));
        }
        rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (step_s, bytes_per_step, probe_now) = rounds[rounds.len() / 2];
        let ratios: Vec<f64> = rounds.iter().map(|(s, b, p)| b / s / p).collect();
        decode.push(json!({
            "batch": batch,
            "tokens_per_s": batch as f64 / step_s,
            "tokens_per_s_rounds": rounds.iter().map(|r| batch as f64 / r.0).collect::<Vec<_>>(),
            "step_ms": step_s * 1e3,
            "weight_bytes_per_step": bytes_per_step,
            "weight_read_gbps": bytes_per_step / step_s / 1e9,
            "bandwidth_probe_gbps": probe_now / 1e9,
            "fraction_of_paired_probe": bytes_per_step / step_s / probe_now,
            "fraction_of_paired_probe_rounds": ratios,
            "stages": stages_json(&stage_sum, step_s * (args.rounds * args.decode_steps) as f64, kernel_peak, bandwidth),
            "stage_seconds_are": "per step",
        }));
        // Per step, as the other decode figures.
        let n = (args.rounds * args.decode_steps) as f64;
        if let Some(stages) = decode.last_mut().and_then(|d| d["stages"].as_object_mut()) {
            for v in stages.values_mut() {
                if let Some(secs) = v["seconds"].as_f64() {
                    v["seconds"] = json!(secs / n);
                }
            }
        }
    }
    bandwidth = bandwidth.max(probe::memory_bandwidth(probe_bytes, 3));
    for d in decode.iter_mut() {
        let gbps = d["weight_read_gbps"].as_f64().unwrap_or(0.0);
        d["fraction_of_best_probe"] = json!(gbps * 1e9 / bandwidth);
    }

    let report = json!({
        "model": args.model.display().to_string(),
        "threads": threads,
        "kernel": matmul::kernel_name(),
        "memory_bandwidth_gbps": bandwidth / 1e9,
        "fma_peak_gflops": peak / 1e9,
        "matmul_precision": selection.precision.name(),
        "matmul_kernel_peak_gflops": kernel_peak / 1e9,
        "load_s": load_s,
        "prefill": prefills[0].json(peak, kernel_peak, bandwidth),
        "prefills": prefills.iter().map(|p| p.json(peak, kernel_peak, bandwidth)).collect::<Vec<_>>(),
        "decode": decode,
    });
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!(
        "machine: {threads} threads, memory read {:.1} GB/s (best probe of the run), f32 FMA peak {:.1} GFLOP/s ({})",
        bandwidth / 1e9,
        peak / 1e9,
        matmul::kernel_name()
    );
    for p in &prefills {
        let (secs, _, expert_flops, expert_s) = p.median();
        let tps = |r: &(f64, [StageTotals; 5], u64, f64)| p.len as f64 / r.0;
        println!(
            "prefill {} tokens: {:.1} tokens/s ({:.2} s; rounds {:.1}-{:.1}); expert matmuls {:.1} GFLOP/s = {:.0}% of FMA peak, {:.0}% of the time",
            p.len,
            p.len as f64 / secs,
            secs,
            p.rounds.last().map(tps).unwrap_or(0.0),
            p.rounds.first().map(tps).unwrap_or(0.0),
            expert_flops as f64 / expert_s.max(1e-12) / 1e9,
            100.0 * expert_flops as f64 / expert_s.max(1e-12) / peak,
            100.0 * expert_s / secs
        );
    }
    println!(
        "matmul kernel {} ({} precision): {:.1} GFLOP/s on expert-shaped work in cache (the kernel peak below)",
        selection.kernel.name(),
        selection.precision.name(),
        kernel_peak / 1e9
    );
    for p in report["prefills"].as_array().into_iter().flatten() {
        print_stages(&format!("prefill {} tokens", p["prompt_tokens"]), &p["stages"]);
    }
    for d in &decode {
        let f = |k: &str| d[k].as_f64().unwrap_or(0.0);
        let range = |k: &str| {
            let v: Vec<f64> =
                d[k].as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default();
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (lo, hi)
        };
        let (tlo, thi) = range("tokens_per_s_rounds");
        let (rlo, rhi) = range("fraction_of_paired_probe_rounds");
        println!(
            "decode batch {:>3}: {:>7.1} tokens/s (rounds {tlo:.1}-{thi:.1}), step {:>7.2} ms, weights {:>5.0} MB/step = {:>5.1} GB/s = {:>3.0}% of the probe beside it (rounds {:.0}-{:.0}%), {:>3.0}% of the best probe",
            d["batch"],
            f("tokens_per_s"),
            f("step_ms"),
            f("weight_bytes_per_step") / 1e6,
            f("weight_read_gbps"),
            100.0 * f("fraction_of_paired_probe"),
            100.0 * rlo,
            100.0 * rhi,
            100.0 * f("fraction_of_best_probe"),
        );
    }
    for d in &decode {
        print_stages(&format!("decode batch {}, per step", d["batch"]), &d["stages"]);
    }
    Ok(())
}

/// One prompt length's prefill rounds, fastest first: seconds, stage totals, expert FLOPs and expert seconds.
struct Prefill {
    len: usize,
    rounds: Vec<(f64, [StageTotals; 5], u64, f64)>,
}

impl Prefill {
    fn median(&self) -> (f64, [StageTotals; 5], u64, f64) {
        self.rounds[self.rounds.len() / 2]
    }

    fn json(&self, fma_peak: f64, kernel_peak: f64, bandwidth: f64) -> serde_json::Value {
        let (secs, stages, expert_flops, expert_s) = self.median();
        json!({
            "prompt_tokens": self.len,
            "tokens_per_s": self.len as f64 / secs,
            "tokens_per_s_rounds": self.rounds.iter().map(|r| self.len as f64 / r.0).collect::<Vec<_>>(),
            "seconds": secs,
            "expert_gflops": expert_flops as f64 / expert_s.max(1e-12) / 1e9,
            "expert_fraction_of_fma_peak": expert_flops as f64 / expert_s.max(1e-12) / fma_peak,
            "expert_share_of_time": expert_s / secs,
            "stages": stages_json(&stages, secs, kernel_peak, bandwidth),
        })
    }
}

/// The stages of a phase that took `total_s`, as JSON: seconds, share, FLOP/s against the kernel peak and weight
/// bytes/s against the memory bandwidth, and the remainder as `rest`.
fn stages_json(stages: &[StageTotals; 5], total_s: f64, kernel_peak: f64, bandwidth: f64) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    let mut accounted = 0f64;
    for (stage, t) in Stage::ALL.iter().zip(stages) {
        let secs = t.nanos as f64 * 1e-9;
        accounted += secs;
        let rate = |x: u64| if secs > 0.0 { x as f64 / secs } else { 0.0 };
        out.insert(
            stage.name().into(),
            json!({
                "seconds": secs,
                "share": secs / total_s,
                "gflops": rate(t.flops) / 1e9,
                "fraction_of_kernel_peak": rate(t.flops) / kernel_peak,
                "weight_gbps": rate(t.weight_bytes) / 1e9,
                "fraction_of_bandwidth": rate(t.weight_bytes) / bandwidth,
            }),
        );
    }
    let rest = (total_s - accounted).max(0.0);
    out.insert("rest".into(), json!({ "seconds": rest, "share": rest / total_s }));
    serde_json::Value::Object(out)
}

fn print_stages(title: &str, stages: &serde_json::Value) {
    println!("  {title}:");
    println!(
        "    {:<20} {:>10} {:>6} {:>9} {:>11} {:>9} {:>10}",
        "stage", "ms", "share", "GFLOP/s", "of peak", "GB/s", "of bw"
    );
    let names = Stage::ALL.iter().map(|s| s.name()).chain(["rest"]);
    for name in names {
        let v = &stages[name];
        let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
        if name == "rest" {
            println!("    {:<20} {:>10.2} {:>5.0}%", name, f("seconds") * 1e3, 100.0 * f("share"));
            continue;
        }
        let weights = if f("weight_gbps") > 0.0 {
            format!("{:>9.1} {:>9.0}%", f("weight_gbps"), 100.0 * f("fraction_of_bandwidth"))
        } else {
            format!("{:>9} {:>10}", "-", "-")
        };
        println!(
            "    {:<20} {:>10.2} {:>5.0}% {:>9.1} {:>10.0}% {weights}",
            name,
            f("seconds") * 1e3,
            100.0 * f("share"),
            f("gflops"),
            100.0 * f("fraction_of_kernel_peak"),
        );
    }
}
