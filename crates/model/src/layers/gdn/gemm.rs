//! The delta rule's small matrix products: `C += A·B` on row-major blocks of up to 128 × 128, in f64 (the triangular
//! solve's inputs) and in f32 (the products with the state), with FMAs.
//!
//! Every element of `C` is one chain of FMAs over the inner index in order, starting from its old value, on every
//! path: the AVX-512 register blocks and the portable loops give the same bits. Operands are views with a leading
//! dimension, so that a product can run on a triangle's row band or read `A` transposed without a copy.

use crate::cpu::simd;

/// An element type of the products.
pub(super) trait Elem: Copy + Default {
    fn fma(self, b: Self, c: Self) -> Self;
}

impl Elem for f64 {
    #[inline(always)]
    fn fma(self, b: f64, c: f64) -> f64 {
        self.mul_add(b, c)
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn fma(self, b: f32, c: f32) -> f32 {
        self.mul_add(b, c)
    }
}

/// The left operand: element `(i, r)` at `data[i * ld + r]`, or with `transposed`, at `data[r * ld + i]`.
#[derive(Clone, Copy)]
pub(super) struct Left<'a, T> {
    pub data: &'a [T],
    pub ld: usize,
    pub transposed: bool,
}

impl<'a, T> Left<'a, T> {
    pub fn rows(data: &'a [T], ld: usize) -> Self {
        Left { data, ld, transposed: false }
    }

    pub fn transposed(data: &'a [T], ld: usize) -> Self {
        Left { data, ld, transposed: true }
    }

    /// The strides of `(i, r)`.
    fn strides(&self) -> (usize, usize) {
        if self.transposed {
            (1, self.ld)
        } else {
            (self.ld, 1)
        }
    }
}

/// `c[i·ldc + j] += Σ_r a(i, r) · b[r·ldb + j]` for `i < m`, `r < k`, `j < n`.
#[inline(always)]
pub(super) fn gemm_add<T: Elem + Simd>(
    c: &mut [T],
    ldc: usize,
    a: Left<'_, T>,
    b: &[T],
    ldb: usize,
    (m, k, n): (usize, usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    let (ars, acs) = a.strides();
    assert!(c.len() >= (m - 1) * ldc + n && b.len() >= k.saturating_sub(1) * ldb + n);
    assert!(k == 0 || a.data.len() > (m - 1) * ars + (k - 1) * acs);
    if k == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if simd::level() == simd::Level::Avx512 {
        // SAFETY: the CPU has AVX-512F (the level was detected from its features); the views were bounds-checked.
        unsafe { T::gemm_avx512(c, ldc, a.data, (ars, acs), b, ldb, (m, k, n)) };
        return;
    }
    for i in 0..m {
        for r in 0..k {
            let av = a.data[i * ars + r * acs];
            let (row, brow) = (&mut c[i * ldc..i * ldc + n], &b[r * ldb..r * ldb + n]);
            for (x, bv) in row.iter_mut().zip(brow) {
                *x = av.fma(*bv, *x);
            }
        }
    }
}

/// The AVX-512 body of [`gemm_add`] for one element type.
pub(super) trait Simd: Sized {
    /// # Safety
    /// The CPU has AVX-512F; the operands hold the elements the sizes and strides address.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_avx512(
        c: &mut [Self],
        ldc: usize,
        a: &[Self],
        a_strides: (usize, usize),
        b: &[Self],
        ldb: usize,
        mkn: (usize, usize, usize),
    );
}

#[cfg(target_arch = "x86_64")]
macro_rules! avx512_gemm {
    ($t:ty, $lanes:expr, $vec:ty, $mask:ty, $zero:ident, $load:ident, $store:ident, $set1:ident, $fmadd:ident) => {
        impl Simd for $t {
            #[target_feature(enable = "avx512f")]
            unsafe fn gemm_avx512(
                c: &mut [$t],
                ldc: usize,
                a: &[$t],
                (ars, acs): (usize, usize),
                b: &[$t],
                ldb: usize,
                (m, k, n): (usize, usize, usize),
            ) {
                use std::arch::x86_64::*;
                const W: usize = 2 * $lanes;
                /// The operands' pointers and strides.
                #[derive(Clone, Copy)]
                struct Ops {
                    c: *mut $t,
                    ldc: usize,
                    a: *const $t,
                    ars: usize,
                    acs: usize,
                    b: *const $t,
                    ldb: usize,
                }
                /// Rows `i..i+R`, columns `j..j+W` (the lanes past `n` masked off).
                #[inline]
                #[target_feature(enable = "avx512f")]
                unsafe fn block<const R: usize>(o: Ops, (i, j, k): (usize, usize, usize), (m0, m1): ($mask, $mask)) {
                    let Ops { c, ldc, a, ars, acs, b, ldb } = o;
                    // SAFETY: the caller's bounds; masked lanes are neither read nor written.
                    unsafe {
                        let mut lo: [$vec; R] = [$zero(); R];
                        let mut hi: [$vec; R] = [$zero(); R];
                        for ii in 0..R {
                            let row = c.add((i + ii) * ldc + j);
                            lo[ii] = $load(lo[ii], m0, row);
                            hi[ii] = $load(hi[ii], m1, row.add($lanes));
                        }
                        for r in 0..k {
                            let brow = b.add(r * ldb + j);
                            let b0 = $load($zero(), m0, brow);
                            let b1 = $load($zero(), m1, brow.add($lanes));
                            for ii in 0..R {
                                let av = $set1(*a.add((i + ii) * ars + r * acs));
                                lo[ii] = $fmadd(av, b0, lo[ii]);
                                hi[ii] = $fmadd(av, b1, hi[ii]);
                            }
                        }
                        for ii in 0..R {
                            let row = c.add((i + ii) * ldc + j);
                            $store(row, m0, lo[ii]);
                            $store(row.add($lanes), m1, hi[ii]);
                        }
                    }
                }
                let lane_mask = |from: usize| -> $mask {
                    let left = n.saturating_sub(from).min($lanes);
                    ((1u32 << left) - 1) as $mask
                };
                let ops = Ops { c: c.as_mut_ptr(), ldc, a: a.as_ptr(), ars, acs, b: b.as_ptr(), ldb };
                // Row blocks outermost: a block's rows of `a` (the broadcasts) stay in L1 while `b` streams by.
                let strips = |i: usize, rows: usize| {
                    for j in (0..n).step_by(W) {
                        let masks = (lane_mask(j), lane_mask(j + $lanes));
                        // SAFETY: rows i..i+rows ≤ m, unmasked columns < n, r < k: inside what the caller checked.
                        unsafe {
                            match rows {
                                8 => block::<8>(ops, (i, j, k), masks),
                                4 => block::<4>(ops, (i, j, k), masks),
                                _ => block::<1>(ops, (i, j, k), masks),
                            }
                        }
                    }
                };
                let mut i = 0;
                while i + 8 <= m {
                    strips(i, 8);
                    i += 8;
                }
                while i + 4 <= m {
                    strips(i, 4);
                    i += 4;
                }
                while i < m {
                    strips(i, 1);
                    i += 1;
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
avx512_gemm!(
    f64,
    8,
    __m512d,
    u8,
    _mm512_setzero_pd,
    _mm512_mask_loadu_pd,
    _mm512_mask_storeu_pd,
    _mm512_set1_pd,
    _mm512_fmadd_pd
);
#[cfg(target_arch = "x86_64")]
avx512_gemm!(
    f32,
    16,
    __m512,
    u16,
    _mm512_setzero_ps,
    _mm512_mask_loadu_ps,
    _mm512_mask_storeu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps
);

#[cfg(not(target_arch = "x86_64"))]
impl Simd for f64 {}
#[cfg(not(target_arch = "x86_64"))]
impl Simd for f32 {}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(c: &mut [f64], ldc: usize, a: Left<'_, f64>, b: &[f64], ldb: usize, (m, k, n): (usize, usize, usize)) {
        let (ars, acs) = a.strides();
        for i in 0..m {
            for j in 0..n {
                let mut x = c[i * ldc + j];
                for r in 0..k {
                    x = a.data[i * ars + r * acs].mul_add(b[r * ldb + j], x);
                }
                c[i * ldc + j] = x;
            }
        }
    }

    /// Every shape, tail and stride gives the same bits as the element-by-element FMA chain, in both types.
    #[test]
    fn blocks_equal_the_plain_chain() {
        let mut seed = 99u32;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            f64::from(seed) / f64::from(u32::MAX) - 0.5
        };
        for (m, k, n) in [(1, 1, 1), (3, 5, 7), (8, 17, 16), (13, 64, 33), (64, 128, 128), (9, 3, 47)] {
            for transposed in [false, true] {
                let (ldc, ldb) = (n + 3, n + 1);
                let lda = if transposed { m + 2 } else { k + 2 };
                let a: Vec<f64> = (0..lda * if transposed { k } else { m }).map(|_| rnd()).collect();
                let b: Vec<f64> = (0..k * ldb).map(|_| rnd()).collect();
                let c0: Vec<f64> = (0..m * ldc).map(|_| rnd()).collect();
                let view = |d| if transposed { Left::transposed(d, lda) } else { Left::rows(d, lda) };
                let mut want = c0.clone();
                reference(&mut want, ldc, view(&a), &b, ldb, (m, k, n));
                let mut got = c0.clone();
                gemm_add(&mut got, ldc, view(&a), &b, ldb, (m, k, n));
                assert_eq!(got, want, "f64 {m}x{k}x{n} transposed={transposed}");

                let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
                let (a32, b32, c32) = (f(&a), f(&b), f(&c0));
                let view32 = |d| if transposed { Left::transposed(d, lda) } else { Left::rows(d, lda) };
                let mut want32 = c32.clone();
                let (ars, acs) = view32(&a32).strides();
                for i in 0..m {
                    for j in 0..n {
                        let mut x = want32[i * ldc + j];
                        for r in 0..k {
                            x = a32[i * ars + r * acs].mul_add(b32[r * ldb + j], x);
                        }
                        want32[i * ldc + j] = x;
                    }
                }
                let mut got32 = c32.clone();
                gemm_add(&mut got32, ldc, view32(&a32), &b32, ldb, (m, k, n));
                assert_eq!(got32, want32, "f32 {m}x{k}x{n} transposed={transposed}");
            }
        }
    }
}
