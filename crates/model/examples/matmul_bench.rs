//! Microbenchmark of the bf16-weight matmul, every kernel and precision this CPU runs side by side, interleaved
//! over rounds: weight-read bandwidth at few tokens and GFLOP/s at many, next to the machine's measured memory
//! bandwidth and f32 FMA peak.
//!
//! `cargo run --release -p moe-model --example matmul_bench [rounds]`

use std::time::Instant;

use half::bf16;
use moe_model::cpu::matmul::{matmul_with, Kernel, Precision, Selection};
use moe_model::cpu::probe;
use moe_model::weights::Mat;
use rayon::prelude::*;

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let bw = probe::memory_bandwidth(1 << 31, 5);
    let peak = probe::fma_peak();
    let threads = rayon::current_num_threads();
    println!("{threads} threads, memory {:.1} GB/s, f32 FMA peak {:.1} GFLOP/s", bw / 1e9, peak / 1e9);
    let mut sels = Vec::new();
    for kernel in Kernel::available() {
        if kernel == Kernel::Scalar || kernel == Kernel::Avx2 {
            continue;
        }
        sels.push(Selection { kernel, precision: Precision::Split });
        if kernel.group().is_some() {
            sels.push(Selection { kernel, precision: Precision::Bf16 });
        }
    }
    // Packed as resident weights are for the bf16 kernels; row-major for the f32 ones.
    let weights = |rows: usize, cols: usize, seed: usize| {
        let w = Mat::from_vec(
            rows,
            cols,
            (0..rows * cols).map(|i| bf16::from_f32(((i + seed) % 7) as f32 * 0.01)).collect(),
        );
        let packed: Vec<Mat> =
            sels.iter().map(|s| s.kernel.group().map_or_else(|| w.clone(), |g| w.packed_copy(g))).collect();
        packed
    };
    let name = |s: &Selection| format!("{} {}", s.kernel.name(), s.precision.name());

    // 256 MB of weights: far beyond the caches.
    let (rows, cols) = (65_536, 2048);
    let big = weights(rows, cols, 0);
    // Expert-sized matmuls with many tokens, one per thread (as the MoE layer runs them in prefill).
    let (er, ec) = (512, 2048);
    let expert = weights(er, ec, 3);
    let mut results: Vec<Vec<(String, Vec<f64>)>> = Vec::new();
    for round in 0..rounds {
        let mut row = Vec::new();
        for (i, sel) in sels.iter().enumerate() {
            let mut figures = Vec::new();
            for ntok in [1, 4, 16] {
                let x = vec![0.5f32; ntok * cols];
                let mut y = vec![0f32; ntok * rows];
                matmul_with(*sel, &x, ntok, &big[i], &mut y, true);
                let reps = 3;
                let t = Instant::now();
                for _ in 0..reps {
                    matmul_with(*sel, &x, ntok, &big[i], &mut y, true);
                }
                figures.push(big[i].bytes() as f64 / (t.elapsed().as_secs_f64() / reps as f64) / 1e9);
            }
            for ntok in [64, 256] {
                let x = vec![0.25f32; ntok * ec];
                let reps = 10;
                let t = Instant::now();
                (0..threads).into_par_iter().for_each(|_| {
                    let mut y = vec![0f32; ntok * er];
                    for _ in 0..reps {
                        matmul_with(*sel, &x, ntok, &expert[i], &mut y, false);
                    }
                });
                let flops = 2.0 * (er * ec * ntok * reps * threads) as f64;
                figures.push(flops / t.elapsed().as_secs_f64() / 1e9);
            }
            row.push((name(sel), figures));
        }
        eprintln!("round {} of {rounds} done", round + 1);
        results.push(row);
    }
    println!(
        "{:<20} {:>10} {:>10} {:>10} {:>14} {:>14}   (median of {rounds} interleaved rounds)",
        "kernel", "1 tok GB/s", "4 tok GB/s", "16 tok GB/s", "64 tok GFLOP/s", "256 tok GFLOP/s"
    );
    // Ratios against the f32 kernel (today's reference path).
    let base_i = sels.iter().position(|s| s.kernel.group().is_none()).unwrap_or(0);
    let base = median_row(&results, base_i);
    for (i, sel) in sels.iter().enumerate() {
        let m = median_row(&results, i);
        let ratios: Vec<String> = m.iter().zip(&base).map(|(a, b)| format!("{:.2}x", a / b)).collect();
        println!(
            "{:<20} {:>10.1} {:>10.1} {:>10.1} {:>14.1} {:>14.1}   vs {}: {}",
            name(sel),
            m[0],
            m[1],
            m[2],
            m[3],
            m[4],
            name(&sels[base_i]),
            ratios.join(" ")
        );
    }
    println!(
        "(GB/s of weights against {:.1} GB/s measured; GFLOP/s against an f32 FMA peak of {:.1})",
        bw / 1e9,
        peak / 1e9
    );
}

fn median_row(results: &[Vec<(String, Vec<f64>)>], i: usize) -> Vec<f64> {
    (0..results[0][i].1.len())
        .map(|j| {
            let mut v: Vec<f64> = results.iter().map(|r| r[i].1[j]).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect()
}
