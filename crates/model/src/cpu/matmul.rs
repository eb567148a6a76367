//! `y = x · Wᵀ` with f32 activations and bf16 weights that stay bf16 in memory.
//!
//! Two regimes:
//! - **Few tokens** (decode): the cost is reading the weights, so each weight row is streamed once, widened from
//!   bf16 to f32 in registers (a 16-bit shift) and multiplied into up to four token rows at a time. AVX-512F when
//!   the CPU has it, AVX2+FMA otherwise, scalar as the last resort. No bf16 dot-product instructions: they would round
//!   the activations to bf16, and the numbers must match an f32 reference.
//! - **Many tokens** (prefill, large batches): the weights are widened tile by tile (64 rows, which fit in L2 as
//!   f32) into a per-thread buffer and multiplied by the `gemm` crate's f32 kernels.
//!
//! [`matmul`] splits the output rows over the rayon pool; [`matmul_serial`] runs on the calling thread, for callers
//! that already parallelise at a coarser grain (one expert per task).

use half::bf16;
use rayon::prelude::*;

use crate::weights::Mat;

/// At or below this many tokens the streaming kernel is used; above it, widened tiles and `gemm`.
const STREAM_MAX_TOKENS: usize = 8;
/// Rows per widened tile in the tiled regime.
const TILE_ROWS: usize = 64;
/// Rows per parallel task in the streaming regime (large enough to amortise scheduling).
const STREAM_TASK_ROWS: usize = 64;

/// Computes `y[t, r] = Σ_k x[t, k] · w[r, k]` for `t < ntok`, overwriting `y` (`ntok × w.rows`), in parallel.
pub fn matmul(x: &[f32], ntok: usize, w: &Mat, y: &mut [f32]) {
    check(x, ntok, w, y);
    let rows = w.rows;
    let out = SharedOut(y.as_mut_ptr());
    let task_rows = if ntok <= STREAM_MAX_TOKENS { STREAM_TASK_ROWS } else { TILE_ROWS };
    let tasks = rows.div_ceil(task_rows);
    if tasks <= 1 || ntok * rows * w.cols < 1 << 15 {
        // SAFETY: `check` verified the sizes; the whole output is ours.
        unsafe { matmul_rows(x, ntok, w, 0, rows, out) };
        return;
    }
    (0..tasks).into_par_iter().for_each(|task| {
        let r0 = task * task_rows;
        let r1 = (r0 + task_rows).min(rows);
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

/// Writes output columns `r0..r1` (weight rows) for all tokens.
///
/// # Safety
/// `y` must point to `ntok × w.rows` values and no other thread may write columns `r0..r1` meanwhile.
unsafe fn matmul_rows(x: &[f32], ntok: usize, w: &Mat, r0: usize, r1: usize, y: SharedOut) {
    let k = w.cols;
    let rows = w.rows;
    let wd = w.data();
    if ntok <= STREAM_MAX_TOKENS {
        let kernel = stream_kernel();
        for r in r0..r1 {
            let wrow = &wd[r * k..(r + 1) * k];
            let mut t = 0;
            while t < ntok {
                let nt = (ntok - t).min(4);
                let mut acc = [0f32; 4];
                kernel(&x[t * k..(t + nt) * k], nt, wrow, &mut acc);
                for (i, a) in acc.iter().take(nt).enumerate() {
                    // SAFETY: (t+i, r) is inside y and column r belongs to this call.
                    unsafe { *y.0.add((t + i) * rows + r) = *a };
                }
                t += nt;
            }
        }
        return;
    }
    TILE.with(|tile| {
        let mut tile = tile.borrow_mut();
        let mut r = r0;
        while r < r1 {
            let nb = (r1 - r).min(TILE_ROWS);
            tile.resize(nb * k, 0.0);
            widen(&wd[r * k..(r + nb) * k], &mut tile[..nb * k]);
            // SAFETY: dst (t, j) = y[t·rows + r + j] for t < ntok, j < nb lies in y and in our columns; lhs is x
            // (ntok × k, row-major); rhs (kk, j) = tile[j·k + kk], i.e. the transposed tile.
            unsafe {
                gemm::gemm(
                    ntok,
                    nb,
                    k,
                    y.0.add(r),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    tile.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            r += nb;
        }
    });
}

thread_local! {
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Widens bf16 to f32 (exact: bf16 is the top half of an f32).
pub fn widen(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}

/// `acc[t] = x_t · w` for `t < nt ≤ 4`; `x` holds `nt` rows of `w.len()` values.
type StreamKernel = fn(&[f32], usize, &[bf16], &mut [f32; 4]);

fn stream_kernel() -> StreamKernel {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static KERNEL: OnceLock<StreamKernel> = OnceLock::new();
        *KERNEL.get_or_init(|| {
            if std::arch::is_x86_feature_detected!("avx512f") {
                x86::dots_avx512
            } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                x86::dots_avx2
            } else {
                dots_scalar
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        dots_scalar
    }
}

/// Returns the name of the streaming kernel this CPU runs (for benchmark reports).
pub fn kernel_name() -> &'static str {
    let k = stream_kernel() as usize;
    #[cfg(target_arch = "x86_64")]
    {
        if k == x86::dots_avx512 as StreamKernel as usize {
            return "avx512f";
        }
        if k == x86::dots_avx2 as StreamKernel as usize {
            return "avx2+fma";
        }
    }
    let _ = k;
    "scalar"
}

fn dots_scalar(x: &[f32], nt: usize, w: &[bf16], acc: &mut [f32; 4]) {
    let k = w.len();
    for t in 0..nt {
        let xr = &x[t * k..(t + 1) * k];
        acc[t] = xr.iter().zip(w).map(|(a, b)| a * b.to_f32()).sum();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::bf16;

    pub(super) fn dots_avx512(x: &[f32], nt: usize, w: &[bf16], acc: &mut [f32; 4]) {
        assert!(x.len() >= nt * w.len() && nt <= 4);
        // SAFETY: selected only when avx512f was detected at run time; bounds asserted above.
        unsafe {
            match nt {
                1 => dots_avx512_n::<1>(x, w, acc),
                2 => dots_avx512_n::<2>(x, w, acc),
                3 => dots_avx512_n::<3>(x, w, acc),
                _ => dots_avx512_n::<4>(x, w, acc),
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn widen16(p: *const bf16) -> __m512 {
        // SAFETY: the caller guarantees 16 readable values at p.
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())))) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn dots_avx512_n<const NT: usize>(x: &[f32], w: &[bf16], acc: &mut [f32; 4]) {
        let k = w.len();
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        let mut a0 = [_mm512_setzero_ps(); NT];
        let mut a1 = [_mm512_setzero_ps(); NT];
        let mut i = 0;
        // SAFETY: every load reads indices < k of w and of each of the NT rows of x (checked by the caller).
        unsafe {
            while i + 32 <= k {
                let w0 = widen16(wp.add(i));
                let w1 = widen16(wp.add(i + 16));
                for t in 0..NT {
                    let xr = xp.add(t * k + i);
                    a0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), a0[t]);
                    a1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr.add(16)), a1[t]);
                }
                i += 32;
            }
            if i + 16 <= k {
                let w0 = widen16(wp.add(i));
                for t in 0..NT {
                    a0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp.add(t * k + i)), a0[t]);
                }
                i += 16;
            }
            for t in 0..NT {
                let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0[t], a1[t]));
                for j in i..k {
                    s += *xp.add(t * k + j) * (*wp.add(j)).to_f32();
                }
                acc[t] = s;
            }
        }
    }

    pub(super) fn dots_avx2(x: &[f32], nt: usize, w: &[bf16], acc: &mut [f32; 4]) {
        assert!(x.len() >= nt * w.len() && nt <= 4);
        // SAFETY: selected only when avx2 and fma were detected at run time; bounds asserted above.
        unsafe {
            match nt {
                1 => dots_avx2_n::<1>(x, w, acc),
                2 => dots_avx2_n::<2>(x, w, acc),
                3 => dots_avx2_n::<3>(x, w, acc),
                _ => dots_avx2_n::<4>(x, w, acc),
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn widen8(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable values at p.
        unsafe { _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())))) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots_avx2_n<const NT: usize>(x: &[f32], w: &[bf16], acc: &mut [f32; 4]) {
        let k = w.len();
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        let mut a0 = [_mm256_setzero_ps(); NT];
        let mut a1 = [_mm256_setzero_ps(); NT];
        let mut i = 0;
        // SAFETY: every load reads indices < k of w and of each of the NT rows of x (checked by the caller).
        unsafe {
            while i + 16 <= k {
                let w0 = widen8(wp.add(i));
                let w1 = widen8(wp.add(i + 8));
                for t in 0..NT {
                    let xr = xp.add(t * k + i);
                    a0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), a0[t]);
                    a1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr.add(8)), a1[t]);
                }
                i += 16;
            }
            for t in 0..NT {
                let mut s = hsum256(_mm256_add_ps(a0[t], a1[t]));
                for j in i..k {
                    s += *xp.add(t * k + j) * (*wp.add(j)).to_f32();
                }
                acc[t] = s;
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
    fn all_regimes_match_f64_reference() {
        // Odd sizes exercise the vector tails; 1..=9 and 70 tokens cover both regimes and every group width.
        for &(rows, cols) in &[(7, 45), (130, 96), (65, 1000)] {
            let w = Mat::from_vec(rows, cols, pseudo(rows * cols, 7).into_iter().map(bf16::from_f32).collect());
            for ntok in [1, 2, 3, 4, 5, 9, 70] {
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

    #[test]
    fn every_kernel_matches_scalar() {
        let k = 77;
        let w: Vec<bf16> = pseudo(k, 3).into_iter().map(bf16::from_f32).collect();
        let x = pseudo(4 * k, 4);
        let mut want = [0f32; 4];
        dots_scalar(&x, 4, &w, &mut want);
        #[cfg(target_arch = "x86_64")]
        {
            let mut kernels: Vec<StreamKernel> = Vec::new();
            if std::arch::is_x86_feature_detected!("avx512f") {
                kernels.push(x86::dots_avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                kernels.push(x86::dots_avx2);
            }
            for kernel in kernels {
                for nt in 1..=4 {
                    let mut got = [0f32; 4];
                    kernel(&x, nt, &w, &mut got);
                    for t in 0..nt {
                        assert!((got[t] - want[t]).abs() < 1e-5, "nt={nt} t={t}: {} vs {}", got[t], want[t]);
                    }
                }
            }
        }
    }
}
