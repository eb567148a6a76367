//! `y = x · Wᵀ` with f32 activations and bf16 weights that stay bf16 in memory.
//!
//! **Batch invariance.** Every output element is computed by the same sequence of floating-point operations whatever
//! the number of tokens, the tile it falls in, or the thread that runs it: one vector accumulator per element, summed
//! over K in lane-sized chunks in order, reduced by a fixed tree, then the K tail added in order. So a sequence gets
//! bit-identical results decoded alone, in a batch of 64, or as part of a prefill chunk, which is what makes greedy
//! outputs independent of load (and what lets the scheduler batch freely).
//!
//! **Speed.** The micro-kernel computes a block of up to 4 tokens × 4 weight rows: each chunk of each weight row is
//! loaded once and widened from bf16 to f32 in registers (a 16-bit shift: exact), then multiplied into 4 token rows
//! — 16 independent accumulators, enough to keep the FMA pipes full. No bf16 dot-product instructions: they would round
//! the activations to bf16, and the numbers must match an f32 reference. At batch 1 the weights stream once from
//! memory; for many tokens the tokens are processed in blocks of [`TOKEN_BLOCK`] that stay in L2 while a 4-row weight
//! block stays in L1.
//!
//! Kernels: AVX-512F when the CPU has it, AVX2+FMA otherwise, scalar as the last resort, chosen once per process.
//! [`matmul`] splits the output rows over the rayon pool; [`matmul_serial`] runs on the calling thread, for callers that
//! already parallelise at a coarser grain (one expert per task).

// Index loops here mirror the math (rows t, columns r, chunk positions i, j) and read better than zips.
#![allow(clippy::needless_range_loop)]

use half::bf16;
use rayon::prelude::*;

use crate::weights::Mat;

/// Tokens per block in the many-token regime (a block of activations stays in L2 while weight rows stream by).
const TOKEN_BLOCK: usize = 64;
/// Weight rows per parallel task.
const TASK_ROWS: usize = 64;

/// Computes `y[t, r] = Σ_k x[t, k] · w[r, k]` for `t < ntok`, overwriting `y` (`ntok × w.rows`), in parallel.
pub fn matmul(x: &[f32], ntok: usize, w: &Mat, y: &mut [f32]) {
    check(x, ntok, w, y);
    let rows = w.rows;
    let out = SharedOut(y.as_mut_ptr());
    let tasks = rows.div_ceil(TASK_ROWS);
    if tasks <= 1 || ntok * rows * w.cols < 1 << 16 {
        // SAFETY: `check` verified the sizes; the whole output is ours.
        unsafe { matmul_rows(x, ntok, w, 0, rows, out) };
        return;
    }
    (0..tasks).into_par_iter().for_each(|task| {
        let r0 = task * TASK_ROWS;
        let r1 = (r0 + TASK_ROWS).min(rows);
        // SAFETY: tasks write disjoint column ranges r0..r1 of every output row; sizes were checked.
        unsafe { matmul_rows(x, ntok, w, r0, r1, out) };
    });
}

/// Same as [`matmul`], on the calling thread.
pub fn matmul_serial(x: &[f32], ntok: usize, w: &Mat, y: &mut [f32]) {
    check(x, ntok, w, y);
    // SAFETY: sizes checked; the whole output is ours.
    unsafe { matmul_rows(x, ntok, w, 0, w.rows, SharedOut(y.as_mut_ptr())) };
}

fn check(x: &[f32], ntok: usize, w: &Mat, y: &[f32]) {
    assert_eq!(x.len(), ntok * w.cols, "matmul: x has {} values, expected {ntok}×{}", x.len(), w.cols);
    assert_eq!(y.len(), ntok * w.rows, "matmul: y has {} values, expected {ntok}×{}", y.len(), w.rows);
}

#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: used only to write disjoint regions from parallel tasks, as documented at each use.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// A block of up to 4 tokens × 4 weight rows: `out[t][r] = x_t · w_r`.
struct Block<'a> {
    /// `nt` token rows of `k` values each, back to back.
    x: &'a [f32],
    nt: usize,
    /// `nr` weight rows of `k` values each, back to back.
    w: &'a [bf16],
    nr: usize,
    k: usize,
}

type Kernel = fn(&Block<'_>, &mut [[f32; 4]; 4]);

/// Writes output columns `r0..r1` (weight rows) for all tokens.
///
/// # Safety
/// `y` must point to `ntok × w.rows` values and no other thread may write columns `r0..r1` meanwhile.
unsafe fn matmul_rows(x: &[f32], ntok: usize, w: &Mat, r0: usize, r1: usize, y: SharedOut) {
    let k = w.cols;
    let rows = w.rows;
    let wd = w.data();
    let kernel = kernel();
    let mut out = [[0f32; 4]; 4];
    let mut tb = 0;
    while tb < ntok {
        let tb_end = (tb + TOKEN_BLOCK).min(ntok);
        let mut r = r0;
        // One token: one weight row at a time, a single sequential stream per thread, which the hardware prefetcher
        // follows best (measured 28-31 GB/s against 21-28 with 4 interleaved rows). More tokens: 4 rows, so that
        // each widened weight vector feeds 16 FMAs. The per-element order of operations is the same either way.
        let row_block = if ntok == 1 { 1 } else { 4 };
        while r < r1 {
            let nr = (r1 - r).min(row_block);
            let mut t = tb;
            while t < tb_end {
                let nt = (tb_end - t).min(4);
                let block = Block { x: &x[t * k..(t + nt) * k], nt, w: &wd[r * k..(r + nr) * k], nr, k };
                kernel(&block, &mut out);
                for (i, row) in out.iter().take(nt).enumerate() {
                    for (j, v) in row.iter().take(nr).enumerate() {
                        // SAFETY: (t+i, r+j) is inside y and column r+j belongs to this call.
                        unsafe { *y.0.add((t + i) * rows + r + j) = *v };
                    }
                }
                t += nt;
            }
            r += nr;
        }
        tb = tb_end;
    }
}

fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static KERNEL: OnceLock<Kernel> = OnceLock::new();
        *KERNEL.get_or_init(|| {
            if std::arch::is_x86_feature_detected!("avx512f") {
                x86::block_avx512
            } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                x86::block_avx2
            } else {
                block_scalar
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        block_scalar
    }
}

/// Returns the name of the kernel this CPU runs (for benchmark reports).
pub fn kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        let k = kernel() as usize;
        if k == x86::block_avx512 as Kernel as usize {
            return "avx512f";
        }
        if k == x86::block_avx2 as Kernel as usize {
            return "avx2+fma";
        }
    }
    "scalar"
}

/// Widens bf16 to f32 (exact: bf16 is the top half of an f32).
pub fn widen(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}

fn block_scalar(b: &Block<'_>, out: &mut [[f32; 4]; 4]) {
    let k = b.k;
    for t in 0..b.nt {
        for r in 0..b.nr {
            let xr = &b.x[t * k..(t + 1) * k];
            let wr = &b.w[r * k..(r + 1) * k];
            out[t][r] = xr.iter().zip(wr).fold(0.0, |acc, (a, w)| a.mul_add(w.to_f32(), acc));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::bf16;

    use super::Block;

    pub(super) fn block_avx512(b: &Block<'_>, out: &mut [[f32; 4]; 4]) {
        assert!(b.nt >= 1 && b.nt <= 4 && b.nr >= 1 && b.nr <= 4);
        assert!(b.x.len() >= b.nt * b.k && b.w.len() >= b.nr * b.k);
        macro_rules! dispatch {
            ($($nt:literal),*; $($nr:literal),*) => {
                dispatch!(@t [$($nt),*] [$($nr),*])
            };
            (@t [$($nt:literal),*] $nrs:tt) => {
                match b.nt {
                    $($nt => dispatch!(@r $nt $nrs),)*
                    _ => unreachable!("nt checked above"),
                }
            };
            (@r $nt:literal [$($nr:literal),*]) => {
                match b.nr {
                    // SAFETY: selected only when avx512f was detected at run time; bounds asserted above.
                    $($nr => unsafe { avx512::<$nt, $nr>(b, out) },)*
                    _ => unreachable!("nr checked above"),
                }
            };
        }
        dispatch!(1, 2, 3, 4; 1, 2, 3, 4)
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn avx512<const NT: usize, const NR: usize>(b: &Block<'_>, out: &mut [[f32; 4]; 4]) {
        let k = b.k;
        let xp = b.x.as_ptr();
        let wp = b.w.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); NR]; NT];
        let chunks = k / 16;
        // SAFETY: every load reads indices < k of the NT token rows and NR weight rows (asserted by the caller).
        unsafe {
            for c in 0..chunks {
                let mut wv = [_mm512_setzero_ps(); NR];
                for (r, v) in wv.iter_mut().enumerate() {
                    let p = wp.add(r * k + c * 16);
                    *v = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                        p.cast(),
                    ))));
                }
                for (t, acc_t) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(xp.add(t * k + c * 16));
                    for (a, v) in acc_t.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(*v, xv, *a);
                    }
                }
            }
            for t in 0..NT {
                for r in 0..NR {
                    let mut s = _mm512_reduce_add_ps(acc[t][r]);
                    for j in chunks * 16..k {
                        s = (*xp.add(t * k + j)).mul_add((*wp.add(r * k + j)).to_f32(), s);
                    }
                    out[t][r] = s;
                }
            }
        }
    }

    pub(super) fn block_avx2(b: &Block<'_>, out: &mut [[f32; 4]; 4]) {
        assert!(b.nt >= 1 && b.nt <= 4 && b.nr >= 1 && b.nr <= 4);
        assert!(b.x.len() >= b.nt * b.k && b.w.len() >= b.nr * b.k);
        // The AVX2 path keeps 8-lane accumulators; NT×NR ≤ 16 of them plus 4 weight vectors fit in 16 registers
        // only partly, which the compiler spills cheaply. Run it per (token, row-block) for simplicity.
        for t in 0..b.nt {
            let xb = &b.x[t * b.k..(t + 1) * b.k];
            let mut row = [0f32; 4];
            // SAFETY: selected only when avx2 and fma were detected at run time; bounds asserted above.
            unsafe {
                match b.nr {
                    1 => avx2::<1>(xb, b.w, b.k, &mut row),
                    2 => avx2::<2>(xb, b.w, b.k, &mut row),
                    3 => avx2::<3>(xb, b.w, b.k, &mut row),
                    _ => avx2::<4>(xb, b.w, b.k, &mut row),
                }
            }
            out[t] = row;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2<const NR: usize>(x: &[f32], w: &[bf16], k: usize, out: &mut [f32; 4]) {
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let mut acc = [_mm256_setzero_ps(); NR];
        let chunks = k / 8;
        // SAFETY: every load reads indices < k of x and of the NR weight rows (asserted by the caller).
        unsafe {
            for c in 0..chunks {
                let xv = _mm256_loadu_ps(xp.add(c * 8));
                for (r, a) in acc.iter_mut().enumerate() {
                    let p = wp.add(r * k + c * 8);
                    let wv =
                        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()))));
                    *a = _mm256_fmadd_ps(wv, xv, *a);
                }
            }
            for r in 0..NR {
                let lo = _mm256_castps256_ps128(acc[r]);
                let hi = _mm256_extractf128_ps::<1>(acc[r]);
                let s4 = _mm_add_ps(lo, hi);
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2));
                let mut s = _mm_cvtss_f32(s1);
                for j in chunks * 8..k {
                    s = (*xp.add(j)).mul_add((*wp.add(r * k + j)).to_f32(), s);
                }
                out[r] = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], ntok: usize, w: &Mat) -> Vec<f32> {
        let wd = w.data();
        let mut y = vec![0f32; ntok * w.rows];
        for t in 0..ntok {
            for r in 0..w.rows {
                let mut s = 0f64;
                for c in 0..w.cols {
                    s += x[t * w.cols + c] as f64 * wd[r * w.cols + c].to_f64();
                }
                y[t * w.rows + r] = s as f32;
            }
        }
        y
    }

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn matches_f64_reference() {
        // Odd sizes exercise the vector tails and every block shape; 70 and 130 tokens cross token blocks.
        for &(rows, cols) in &[(7, 45), (130, 96), (65, 1000)] {
            let w = Mat::from_vec(rows, cols, pseudo(rows * cols, 7).into_iter().map(bf16::from_f32).collect());
            for ntok in [1, 2, 3, 4, 5, 9, 70, 130] {
                let x = pseudo(ntok * cols, ntok as u32);
                let want = reference(&x, ntok, &w);
                for parallel in [false, true] {
                    let mut y = vec![f32::NAN; ntok * rows];
                    if parallel {
                        matmul(&x, ntok, &w, &mut y);
                    } else {
                        matmul_serial(&x, ntok, &w, &mut y);
                    }
                    for (a, b) in y.iter().zip(&want) {
                        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{rows}x{cols} ntok={ntok}: {a} vs {b}");
                    }
                }
            }
        }
    }

    /// A token's output is bit-identical whatever else is in the batch.
    #[test]
    fn batch_invariant() {
        let (rows, cols) = (300, 520);
        let w = Mat::from_vec(rows, cols, pseudo(rows * cols, 11).into_iter().map(bf16::from_f32).collect());
        let x = pseudo(150 * cols, 3);
        let mut all = vec![0f32; 150 * rows];
        matmul(&x, 150, &w, &mut all);
        for t in [0, 1, 63, 64, 65, 149] {
            let mut one = vec![0f32; rows];
            matmul(&x[t * cols..(t + 1) * cols], 1, &w, &mut one);
            assert_eq!(one, all[t * rows..(t + 1) * rows], "token {t}");
            let mut three = vec![0f32; 3 * rows];
            let s = t.min(147);
            matmul_serial(&x[s * cols..(s + 3) * cols], 3, &w, &mut three);
            assert_eq!(three[(t - s) * rows..(t - s + 1) * rows], all[t * rows..(t + 1) * rows], "token {t} in 3");
        }
    }

    #[test]
    fn every_kernel_matches_scalar() {
        let k = 77;
        let w: Vec<bf16> = pseudo(4 * k, 3).into_iter().map(bf16::from_f32).collect();
        let x = pseudo(4 * k, 4);
        let block = |nt, nr| Block { x: &x[..nt * k], nt, w: &w[..nr * k], nr, k };
        let mut want = [[0f32; 4]; 4];
        block_scalar(&block(4, 4), &mut want);
        #[cfg(target_arch = "x86_64")]
        {
            let mut kernels: Vec<Kernel> = Vec::new();
            if std::arch::is_x86_feature_detected!("avx512f") {
                kernels.push(x86::block_avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                kernels.push(x86::block_avx2);
            }
            for kernel in kernels {
                for nt in 1..=4 {
                    for nr in 1..=4 {
                        let mut got = [[0f32; 4]; 4];
                        kernel(&block(nt, nr), &mut got);
                        for t in 0..nt {
                            for r in 0..nr {
                                assert!((got[t][r] - want[t][r]).abs() < 1e-5, "{nt}x{nr} ({t},{r})");
                            }
                        }
                    }
                }
            }
        }
    }
}
