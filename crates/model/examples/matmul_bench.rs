//! Microbenchmark of the bf16-weight matmul: weight-read bandwidth at few tokens and GFLOP/s at many, next to the
//! machine's measured memory bandwidth and FMA peak.
//!
//! `cargo run --release -p moe-model --example matmul_bench`

use std::time::Instant;

use half::bf16;
use moe_model::cpu::matmul::{kernel_name, matmul, matmul_serial};
use moe_model::cpu::probe;
use moe_model::weights::Mat;

fn main() {
    let bw = probe::memory_bandwidth(1 << 31, 5);
    let peak = probe::fma_peak();
    println!("kernel {}, memory {:.1} GB/s, FMA peak {:.1} GFLOP/s", kernel_name(), bw / 1e9, peak / 1e9);
    // 512 MB of weights: far beyond the caches.
    let (rows, cols) = (131_072, 2048);
    let w = Mat::from_vec(rows, cols, (0..rows * cols).map(|i| bf16::from_f32((i % 7) as f32 * 0.01)).collect());
    for ntok in [1, 4, 16] {
        let x = vec![0.5f32; ntok * cols];
        let mut y = vec![0f32; ntok * rows];
        matmul(&x, ntok, &w, &mut y);
        let reps = 5;
        let t = Instant::now();
        for _ in 0..reps {
            matmul(&x, ntok, &w, &mut y);
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "ntok {ntok:>3}: {:.1} GB/s of weights ({:.0}% of memory bandwidth), {:.1} GFLOP/s",
            w.bytes() as f64 / s / 1e9,
            100.0 * w.bytes() as f64 / s / bw,
            2.0 * (rows * cols * ntok) as f64 / s / 1e9
        );
    }
    // Expert-sized matmuls with many tokens, one per thread (as the MoE layer runs them in prefill).
    let (er, ec) = (512, 2048);
    let ew = Mat::from_vec(er, ec, (0..er * ec).map(|i| bf16::from_f32((i % 5) as f32 * 0.01)).collect());
    for ntok in [64, 256] {
        let x = vec![0.25f32; ntok * ec];
        let threads = rayon::current_num_threads();
        let reps = 20;
        let t = Instant::now();
        rayon::scope(|s| {
            for _ in 0..threads {
                s.spawn(|_| {
                    let mut y = vec![0f32; ntok * er];
                    for _ in 0..reps {
                        matmul_serial(&x, ntok, &ew, &mut y);
                    }
                });
            }
        });
        let flops = 2.0 * (er * ec * ntok * reps * threads) as f64;
        let gf = flops / t.elapsed().as_secs_f64();
        println!(
            "expert 512x2048, {ntok} tokens per thread: {:.1} GFLOP/s = {:.0}% of FMA peak",
            gf / 1e9,
            100.0 * gf / peak
        );
    }
}
