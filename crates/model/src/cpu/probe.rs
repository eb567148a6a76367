//! Measurements of the machine itself, so that benchmarks can report achieved figures next to what the hardware
//! allows on the same run: memory read bandwidth and the f32 FMA peak of all cores.

use std::time::Instant;

use rayon::prelude::*;

/// Reads a buffer of `bytes` bytes with all threads of the rayon pool, `repeats` times, and returns the best read
/// bandwidth in bytes per second. Use a buffer several times the last-level cache.
pub fn memory_bandwidth(bytes: usize, repeats: usize) -> f64 {
    let n = bytes / 4;
    let threads = rayon::current_num_threads().max(1);
    let per = n.div_ceil(threads);
    // Fill in parallel so that pages land near the threads that read them.
    let mut buf = vec![0f32; n];
    buf.par_chunks_mut(per).enumerate().for_each(|(i, c)| c.fill(i as f32 * 1e-9));
    let mut best = 0f64;
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        let total: f32 = buf.par_chunks(per).map(sum_wide).sum();
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(total);
        best = best.max(bytes as f64 / secs);
    }
    best
}

/// A sum with 16 independent accumulators, which the compiler vectorises; memory is the limit, not the adds.
fn sum_wide(x: &[f32]) -> f32 {
    let mut acc = [0f32; 64];
    let mut chunks = x.chunks_exact(64);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Returns the f32 FMA peak of all threads of the rayon pool in FLOP/s (2 per multiply-add), measured with
/// independent vector FMAs at the widest width the CPU supports.
pub fn fma_peak() -> f64 {
    let threads = rayon::current_num_threads().max(1);
    let iters = 20_000_000u64;
    let mut best = 0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let flops: u64 = (0..threads).into_par_iter().map(|_| fma_loop(iters)).sum();
        best = best.max(flops as f64 / start.elapsed().as_secs_f64());
    }
    best
}

/// Runs `iters` iterations of 12 independent FMAs and returns the FLOPs done.
fn fma_loop(iters: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: avx512f was detected.
            unsafe { x86::fma512(iters) };
            return iters * 12 * 16 * 2;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: avx2 and fma were detected.
            unsafe { x86::fma256(iters) };
            return iters * 12 * 8 * 2;
        }
    }
    let mut acc = [1.0f32; 12];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    iters * 12 * 2
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma512(iters: u64) {
        let m = _mm512_set1_ps(0.999_999);
        let a = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_set1_ps(1.0); 12];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, m, a);
            }
        }
        std::hint::black_box(acc);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma256(iters: u64) {
        let m = _mm256_set1_ps(0.999_999);
        let a = _mm256_set1_ps(1e-7);
        let mut acc = [_mm256_set1_ps(1.0); 12];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, m, a);
            }
        }
        std::hint::black_box(acc);
    }
}

/// Returns the FLOP/s of this process's matmul kernel on work that stays in cache: one 512 × 2048 expert-shaped
/// matrix and 64 tokens per thread, each thread on its own (as the routed experts run in prefill). This is the
/// kernel's practical peak, against which stages' rates are read.
pub fn matmul_peak() -> f64 {
    use crate::cpu::matmul::matmul_serial;
    use crate::weights::Mat;
    let (rows, cols, ntok) = (512, 2048, 64);
    let threads = rayon::current_num_threads().max(1);
    let w = crate::cpu::matmul::resident_copy(&Mat::from_vec(
        rows,
        cols,
        (0..rows * cols).map(|i| half::bf16::from_f32(((i % 13) as f32 - 6.0) * 0.01)).collect(),
    ));
    let x: Vec<f32> = (0..ntok * cols).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
    // About 5 ms a try on AMX: shorter tries read the threads' start-up as much as the kernel (a run read half the
    // peak once, with 8 repetitions).
    let reps = 64;
    let mut best = 0f64;
    for _ in 0..5 {
        let start = Instant::now();
        (0..threads).into_par_iter().for_each(|_| {
            let mut y = vec![0f32; ntok * rows];
            for _ in 0..reps {
                matmul_serial(&x, ntok, &w, &mut y);
            }
            std::hint::black_box(&y);
        });
        let flops = 2.0 * (rows * cols * ntok * reps * threads) as f64;
        best = best.max(flops / start.elapsed().as_secs_f64());
    }
    best
}
