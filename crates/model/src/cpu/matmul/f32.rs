//! The f32 kernels: bf16 weights widened to f32 in registers (a 16-bit shift: exact) and multiplied with f32
//! FMAs, so the results are those of an f32 matmul. The portable fallback and the reference of the faster paths.
//!
//! The micro-kernel computes a block of up to 4 tokens × 4 weight rows: each chunk of each weight row is loaded once
//! and widened, then multiplied into 4 token rows — 16 independent accumulators, enough to keep the FMA pipes full.
//! Each output element is one vector accumulator summed over K in lane-sized chunks in order, reduced by a fixed
//! tree, then the K tail added in order, whatever the block it falls in (batch invariance).

// Index loops here mirror the math (rows t, columns r, chunk positions i, j) and read better than zips.
#![allow(clippy::needless_range_loop)]

use half::bf16;

use super::{Out, TOKEN_BLOCK};

/// A block of up to 4 tokens × 4 weight rows: `out[t][r] = x_t · w_r`.
pub(crate) struct Block<'a> {
    /// `nt` token rows of `k` values each, back to back.
    pub x: &'a [f32],
    pub nt: usize,
    /// `nr` weight rows of `k` values each, back to back.
    pub w: &'a [bf16],
    pub nr: usize,
    pub k: usize,
}

pub(super) type Kernel = fn(&Block<'_>, &mut [[f32; 4]; 4]);

/// Writes output columns `r0..r1` (weight rows) for all tokens; `wd` is the row-major `rows × k` weight matrix.
///
/// # Safety
/// `y` must point to `ntok × rows` values and no other thread may write columns `r0..r1` meanwhile.
pub(super) unsafe fn matmul_rows(
    kernel: Kernel,
    x: &[f32],
    ntok: usize,
    wd: &[bf16],
    (rows, k): (usize, usize),
    (r0, r1): (usize, usize),
    y: Out,
) {
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

pub(super) fn block_scalar(b: &Block<'_>, out: &mut [[f32; 4]; 4]) {
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
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use half::bf16;

    use super::Block;

    pub(crate) fn block_avx512(b: &Block<'_>, out: &mut [[f32; 4]; 4]) {
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

    pub(crate) fn block_avx2(b: &Block<'_>, out: &mut [[f32; 4]; 4]) {
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
