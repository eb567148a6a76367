//! The AVX512-BF16 kernel: `VDPBF16PS` multiplies 16 pairs of bf16 and adds them into 16 f32 lanes.
//!
//! Weights come in packed groups of [`GROUP`] rows (`[chunk][row][32]`), activations as bf16 rows padded to whole
//! chunks (high parts, and low parts in the split precision). The micro-kernel computes up to 4 tokens × 4 rows: per
//! chunk it loads the 4 rows' 32 values (one contiguous 256-byte run per group) and, per token, the activation
//! chunk, then one `VDPBF16PS` per (token, row) and part, high before low. Each output element is one vector
//! accumulator over the chunks in order, reduced by a fixed tree: the same operations for every token count.

use super::{Aligned, Out, Weights, CHUNK, TOKEN_BLOCK};

/// Rows per packed group: the rows one micro-kernel call reads.
pub(super) const GROUP: usize = 4;

/// Converts `ntok × k` activations to bf16 rows of whole chunks: `(hi, lo)`, `lo` empty unless `split`.
pub(super) fn prepare(x: &[f32], ntok: usize, k: usize, split: bool) -> (Aligned, Aligned) {
    let kp = k.div_ceil(CHUNK) * CHUNK;
    let mut hi = super::scratch(ntok * kp);
    let mut lo = if split { super::scratch(ntok * kp) } else { Aligned::default() };
    for t in 0..ntok {
        let src = &x[t * k..(t + 1) * k];
        let h = &mut hi[t * kp..t * kp + k];
        if split {
            let l = &mut lo[t * kp..t * kp + k];
            for ((v, h), l) in src.iter().zip(h).zip(l) {
                (*h, *l) = super::split_bf16(*v);
            }
        } else {
            for (v, h) in src.iter().zip(h) {
                *h = super::round_bf16(*v);
            }
        }
    }
    (hi, lo)
}

/// Writes output columns `r0..r1` of every token.
///
/// # Safety
/// The CPU has AVX512-BF16; `y` points to `ntok × w.rows` values, no other thread writes columns `r0..r1`
/// meanwhile, and `r0` is a multiple of [`GROUP`]; `hi` (and `lo`) come from [`prepare`] with `w.cols` columns.
pub(super) unsafe fn matmul_rows(
    w: &Weights<'_>,
    hi: &[u16],
    lo: Option<&[u16]>,
    ntok: usize,
    (r0, r1): (usize, usize),
    y: Out,
) {
    let kp = w.chunks * CHUNK;
    assert!(hi.len() >= ntok * kp && lo.is_none_or(|l| l.len() >= ntok * kp));
    let mut buf = Aligned::default();
    let mut out = [[0f32; 4]; 4];
    for tb in (0..ntok).step_by(TOKEN_BLOCK) {
        let tb_end = (tb + TOKEN_BLOCK).min(ntok);
        for g in r0 / GROUP..r1.div_ceil(GROUP) {
            let panel = w.group(g, GROUP, &mut buf);
            let rows_here = (r1 - g * GROUP).min(GROUP);
            let mut t = tb;
            while t < tb_end {
                let nt = (tb_end - t).min(4);
                let xh = &hi[t * kp..(t + nt) * kp];
                let xl = lo.map(|l| &l[t * kp..(t + nt) * kp]);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has AVX512-BF16 (the caller's promise); the slices hold nt rows of kp values and
                // the panel `chunks × GROUP × CHUNK` values.
                unsafe {
                    x86::block(panel, w.chunks, xh, xl, kp, nt, &mut out)
                };
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("the AVX512-BF16 kernel is only selected on x86-64 ({xh:p}, {xl:?}, {panel:p})");
                for (i, row) in out.iter().take(nt).enumerate() {
                    for (j, v) in row.iter().take(rows_here).enumerate() {
                        // SAFETY: (t+i, g·GROUP+j) is inside y and the column belongs to this call.
                        unsafe { *y.0.add((t + i) * w.rows + g * GROUP + j) = *v };
                    }
                }
                t += nt;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::bf16;

    use super::{CHUNK, GROUP};

    /// `out[t][r]` for `nt` tokens and the group's 4 rows.
    ///
    /// # Safety
    /// The CPU has AVX512-BF16; `panel` holds `chunks × GROUP × CHUNK` values, `xh` (and `xl`) `nt` rows of `kp ≥
    /// chunks × CHUNK`.
    pub(super) unsafe fn block(
        panel: &[bf16],
        chunks: usize,
        xh: &[u16],
        xl: Option<&[u16]>,
        kp: usize,
        nt: usize,
        out: &mut [[f32; 4]; 4],
    ) {
        assert!(panel.len() >= chunks * GROUP * CHUNK && xh.len() >= nt * kp && kp >= chunks * CHUNK);
        let (p, h) = (panel.as_ptr().cast::<u16>(), xh.as_ptr());
        // SAFETY: bounds asserted above; the CPU feature is the caller's promise.
        unsafe {
            match (nt, xl) {
                (1, None) => kernel::<1, false>(p, chunks, h, h, kp, out),
                (2, None) => kernel::<2, false>(p, chunks, h, h, kp, out),
                (3, None) => kernel::<3, false>(p, chunks, h, h, kp, out),
                (4, None) => kernel::<4, false>(p, chunks, h, h, kp, out),
                (n, Some(l)) => {
                    assert!(l.len() >= nt * kp);
                    let l = l.as_ptr();
                    match n {
                        1 => kernel::<1, true>(p, chunks, h, l, kp, out),
                        2 => kernel::<2, true>(p, chunks, h, l, kp, out),
                        3 => kernel::<3, true>(p, chunks, h, l, kp, out),
                        _ => kernel::<4, true>(p, chunks, h, l, kp, out),
                    }
                }
                _ => unreachable!("1 to 4 tokens per block"),
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn load(p: *const u16) -> __m512bh {
        // SAFETY: the caller points at 32 readable values.
        unsafe { std::ptr::read_unaligned(p.cast::<__m512bh>()) }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel<const NT: usize, const SPLIT: bool>(
        panel: *const u16,
        chunks: usize,
        xh: *const u16,
        xl: *const u16,
        kp: usize,
        out: &mut [[f32; 4]; 4],
    ) {
        let mut acc = [[_mm512_setzero_ps(); GROUP]; NT];
        // SAFETY: every load reads inside the panel (chunks × GROUP × CHUNK) or the NT activation rows (kp each).
        unsafe {
            for c in 0..chunks {
                let mut w = [load(panel); GROUP];
                for (r, v) in w.iter_mut().enumerate() {
                    *v = load(panel.add((c * GROUP + r) * CHUNK));
                }
                for (t, acc_t) in acc.iter_mut().enumerate() {
                    let h = load(xh.add(t * kp + c * CHUNK));
                    if SPLIT {
                        let l = load(xl.add(t * kp + c * CHUNK));
                        for (a, v) in acc_t.iter_mut().zip(&w) {
                            *a = _mm512_dpbf16_ps(_mm512_dpbf16_ps(*a, h, *v), l, *v);
                        }
                    } else {
                        for (a, v) in acc_t.iter_mut().zip(&w) {
                            *a = _mm512_dpbf16_ps(*a, h, *v);
                        }
                    }
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            for (o, a) in o.iter_mut().zip(a) {
                *o = _mm512_reduce_add_ps(*a);
            }
        }
    }
}
