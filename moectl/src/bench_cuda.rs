//! `moectl bench-cuda` (feature `cuda`): the CUDA backend on one card, in one run that fits a 5-minute device lease:
//! copy bandwidth and a square cuBLAS GEMM (what the card gives), the grouped expert GEMMs next to one dense GEMM of
//! the same work, and a decode step's routed-expert work for a model next to its HBM-bandwidth floor.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use moe_cuda::bench;
use moe_model::{Checkpoint, Experts, LogitsFor, ModelConfig, Residency, Routing, Segment};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model directory for the decode-step measurement (e.g. `moectl init-model --preset bench`); without it only
    /// the GEMMs are measured.
    #[arg(long)]
    model: Option<PathBuf>,
    /// CUDA device.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Token counts of the grouped GEMM measurement.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    tokens: Vec<usize>,
    /// Shape of the GEMM measurement: experts, top-k, hidden, expert intermediate (the bench preset's).
    #[arg(long, value_delimiter = ',', default_value = "64,8,2048,512")]
    gemm_shape: Vec<usize>,
    /// Decode batch sizes of the decode-step measurement.
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    batch: Vec<usize>,
    /// Timed repetitions of each measurement.
    #[arg(long, default_value_t = 20)]
    iters: usize,
}

pub fn run(args: Args) -> Result<()> {
    let &[experts, top_k, hidden, inter] = args.gemm_shape.as_slice() else {
        bail!("--gemm-shape takes four numbers: experts, top-k, hidden, intermediate");
    };
    if args.iters == 0 || args.tokens.contains(&0) || args.batch.contains(&0) || top_k > experts {
        bail!("--iters, --tokens and --batch must be positive and top-k at most the experts");
    }
    let found = moe_cuda::probe(&[args.device]).with_context(|| format!("--device cuda:{}", args.device))?;
    println!("device: {}", found[0]);
    let gpu = moe_cuda::Gpu::open(args.device)?;
    let bandwidth = bench::copy_bandwidth(&gpu, 1 << 30, args.iters)?;
    println!("device-to-device copy: {:.0} GB/s (read + write)", bandwidth / 1e9);
    let square = bench::square_gemm(&gpu, 8192, args.iters.min(10))?;
    println!("cuBLAS bf16 GEMM 8192³ (fp32 accumulate and output): {:.0} TFLOP/s", square.tflops);

    println!();
    println!("routed-expert GEMMs: {experts} experts of {hidden}×{inter}, top-{top_k}, rows spread evenly");
    println!(
        "{:>7} {:>6} {:>11} {:>8} {:>11} {:>8} {:>14}",
        "tokens", "rows", "grouped ms", "TFLOP/s", "dense ms", "TFLOP/s", "grouped/dense"
    );
    for &tokens in &args.tokens {
        let grouped = bench::grouped_expert_gemm(&gpu, tokens, experts, top_k, hidden, inter, args.iters)?;
        let dense = bench::dense_gemm(&gpu, grouped.rows, hidden, inter, args.iters)?;
        println!(
            "{tokens:>7} {:>6} {:>11.3} {:>8.1} {:>11.3} {:>8.1} {:>14.2}",
            grouped.rows,
            grouped.seconds * 1e3,
            grouped.tflops,
            dense.seconds * 1e3,
            dense.tflops,
            grouped.seconds / dense.seconds
        );
    }
    drop(gpu);

    let Some(dir) = &args.model else { return Ok(()) };
    decode_steps(dir, &args, bandwidth)
}

/// The routed-expert part of a decode step (every MoE layer, uniform random routing, activations in and sums out
/// through pinned buffers, one synchronisation per layer) next to the time to read the experts it touches once.
fn decode_steps(dir: &std::path::Path, args: &Args, bandwidth: f64) -> Result<()> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let ckpt = Checkpoint::open_with(dir, Residency::Mapped)?;
    let started = Instant::now();
    let experts = moe_cuda::CudaExperts::new(&cfg, &[args.device])?;
    let loaded = experts.load_more(&ckpt, &cfg, |_, _| true)?;
    println!();
    println!(
        "decode step of {}: {} experts ({:.2} GiB) uploaded in {:.1} s",
        dir.display(),
        loaded.experts,
        loaded.bytes as f64 / (1u64 << 30) as f64,
        started.elapsed().as_secs_f64()
    );
    let moe_layers: Vec<usize> = (0..cfg.num_hidden_layers).filter(|&l| cfg.is_moe_layer(l)).collect();
    let expert_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2;
    let h = cfg.hidden_size;
    println!(
        "routed experts only, uniform routing over {} MoE layers; floor = experts touched × bytes / copy bandwidth / 2",
        moe_layers.len()
    );
    println!("{:>6} {:>9} {:>14} {:>10} {:>11}", "batch", "step ms", "experts read", "floor ms", "floor/step");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for &batch in &args.batch {
        let hidden: Vec<f32> = (0..batch * h).map(|i| ((i % 13) as f32 - 6.0) / 8.0).collect();
        let routings: Vec<Routing> = moe_layers
            .iter()
            .map(|_| {
                let mut r = Routing { offsets: vec![0], experts: Vec::new(), weights: Vec::new() };
                for _ in 0..batch {
                    let mut picked: Vec<u32> = Vec::new();
                    while picked.len() < cfg.num_experts_per_tok {
                        let e = (next() % cfg.num_experts as u64) as u32;
                        if !picked.contains(&e) {
                            picked.push(e);
                        }
                    }
                    r.weights.extend(std::iter::repeat_n(1.0 / picked.len() as f32, picked.len()));
                    r.experts.extend(picked);
                    r.offsets.push(r.experts.len() as u32);
                }
                r
            })
            .collect();
        let touched: usize = routings
            .iter()
            .map(|r| {
                let mut e = r.experts.clone();
                e.sort_unstable();
                e.dedup();
                e.len()
            })
            .sum();
        let mut out = vec![0f32; batch * h];
        let step = |out: &mut [f32]| -> Result<()> {
            for (&layer, routing) in moe_layers.iter().zip(&routings) {
                experts.forward(layer, &hidden, routing, out)?;
            }
            Ok(())
        };
        step(&mut out)?;
        let t = Instant::now();
        for _ in 0..args.iters {
            step(&mut out)?;
        }
        let seconds = t.elapsed().as_secs_f64() / args.iters as f64;
        let floor = (touched * expert_bytes) as f64 / (bandwidth / 2.0);
        println!(
            "{batch:>6} {:>9.3} {:>11.0} MB {:>10.3} {:>11.2}",
            seconds * 1e3,
            (touched * expert_bytes) as f64 / 1e6,
            floor * 1e3,
            floor / seconds
        );
    }
    whole_steps(dir, args, &experts, bandwidth)
}

/// Whole decode steps on the GPU: the router's layers ([`moe_cuda::CudaModel`]) and the routed experts, next to the
/// time to read the weights a step needs once (the layers' and, under uniform routing, the experts expected to be
/// touched).
fn whole_steps(dir: &std::path::Path, args: &Args, experts: &moe_cuda::CudaExperts, bandwidth: f64) -> Result<()> {
    use moe_model::Decoder;
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let ckpt = Checkpoint::open_with(dir, Residency::Mapped)?;
    let model = moe_cuda::CudaModel::load(&ckpt, cfg.clone(), args.device, 4 << 30)?;
    let (ne, k) = (cfg.num_experts as f64, cfg.num_experts_per_tok as f64);
    let moe_layers = (0..cfg.num_hidden_layers).filter(|&l| cfg.is_moe_layer(l)).count() as f64;
    let expert_bytes = (3 * cfg.hidden_size * cfg.moe_intermediate_size * 2) as f64;
    println!(
        "whole decode steps on the GPU (16-token prompts first); layers read {:.0} MB per step",
        model.weight_bytes() as f64 / 1e6
    );
    println!("{:>6} {:>9} {:>9} {:>10} {:>11}", "batch", "step ms", "tok/s", "floor ms", "floor/step");
    for &batch in &args.batch {
        let mut states: Vec<_> = (0..batch).map(|_| model.new_state()).collect();
        let prompts: Vec<Vec<u32>> =
            (0..batch).map(|b| crate::bench_model::tokens(16, b as u64, cfg.vocab_size)).collect();
        let mut segs: Vec<Segment<'_>> = states
            .iter_mut()
            .zip(&prompts)
            .map(|(state, p)| Segment { state, tokens: p, logits: LogitsFor::Last })
            .collect();
        model.forward_pipelined(&mut segs, experts, 1)?;
        drop(segs);
        let steps = 5usize;
        let t = Instant::now();
        for step in 0..steps {
            let next: Vec<[u32; 1]> = (0..batch).map(|b| [((b * 31 + step * 7) % cfg.vocab_size) as u32]).collect();
            let mut segs: Vec<Segment<'_>> = states
                .iter_mut()
                .zip(&next)
                .map(|(state, tok)| Segment { state, tokens: tok, logits: LogitsFor::Last })
                .collect();
            model.forward_pipelined(&mut segs, experts, 1)?;
        }
        let seconds = t.elapsed().as_secs_f64() / steps as f64;
        let touched = moe_layers * ne * (1.0 - (1.0 - k / ne).powi(batch as i32));
        let floor = (model.weight_bytes() as f64 + touched * expert_bytes) / (bandwidth / 2.0);
        println!(
            "{batch:>6} {:>9.2} {:>9.1} {:>10.3} {:>11.2}",
            seconds * 1e3,
            batch as f64 / seconds,
            floor * 1e3,
            floor / seconds
        );
    }
    Ok(())
}
