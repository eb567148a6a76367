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
    // Decode-shaped expert work: 8 of 64 experts (gate, up: 512x2048; down: 2048x512) per step, one expert per task,
    // as the MoE layer runs them at batch 1.
    let mk = |r: usize, c: usize, seed: usize| {
        Mat::from_vec(r, c, (0..r * c).map(|i| bf16::from_f32(((i + seed) % 11) as f32 * 0.01)).collect())
    };
    let experts: Vec<[Mat; 3]> =
        (0..64).map(|e| [mk(512, 2048, e), mk(512, 2048, e + 1), mk(2048, 512, e + 2)]).collect();
    let x = vec![0.5f32; 2048];
    let steps = 40;
    let t = Instant::now();
    let mut bytes = 0usize;
    for step in 0..steps {
        let chosen: Vec<usize> = (0..8).map(|i| (step * 13 + i * 7) % 64).collect();
        bytes += chosen.iter().map(|&e| experts[e].iter().map(Mat::bytes).sum::<usize>()).sum::<usize>();
        use rayon::prelude::*;
        chosen.par_iter().for_each(|&e| {
            let [g, u, d] = &experts[e];
            let mut a = vec![0f32; 512];
            let mut b = vec![0f32; 512];
            matmul_serial(&x, 1, g, &mut a);
            matmul_serial(&x, 1, u, &mut b);
            let mut y = vec![0f32; 2048];
            matmul_serial(&a, 1, d, &mut y);
            std::hint::black_box(y);
        });
    }
    let s = t.elapsed().as_secs_f64();
    println!("decode-shaped experts (8 of 64 per step): {:.1} GB/s of weights", bytes as f64 / s / 1e9);
}
