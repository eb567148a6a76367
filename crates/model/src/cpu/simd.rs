//! Vector width for the model's elementwise and small-matrix loops (the delta rule, attention, activations).
//!
//! The crate is compiled for baseline x86-64 (SSE2), so loops that matter are written once as `#[inline(always)]`
//! bodies and instantiated under `#[target_feature]` for AVX-512 and AVX2+FMA; [`level`] picks one per process at
//! the first call, so every computation of a process runs the same instructions (a sequence's numbers never depend
//! on which path ran it). Explicit `mul_add` becomes one FMA in both vector paths.

/// The instruction set the vectorised loops run with in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Avx512,
    Avx2Fma,
    Generic,
}

/// The level of this process, detected once.
pub fn level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
                return Level::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Level::Avx2Fma;
            }
        }
        Level::Generic
    })
}

/// Defines `$name(args) -> ret` that runs `$body` (an `#[inline(always)]` function) compiled for the process's
/// [`level`].
#[macro_export]
#[doc(hidden)]
macro_rules! multiversion {
    ($vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:path) => {
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                match $crate::cpu::simd::level() {
                    // SAFETY: the level was detected from this CPU's features.
                    $crate::cpu::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::cpu::simd::Level::Avx2Fma => return unsafe { avx2($($arg),*) },
                    $crate::cpu::simd::Level::Generic => {}
                }
            }
            $body($($arg),*)
        }
    };
}

/// `y += a · x`, with FMAs.
#[inline(always)]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = a.mul_add(*x, *y);
    }
}

/// `Σ a·b` with 16 lane sums (vectorisable), reduced in a fixed order.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    for i in 0..8 {
        acc[i] += acc[i + 8];
    }
    for i in 0..4 {
        acc[i] += acc[i + 4];
    }
    (acc[0] + acc[2]) + (acc[1] + acc[3]) + s
}

/// `Σ a·b` of f32 values accumulated in f64, 8 lane sums.
#[inline(always)]
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = f64::from(x[i]).mul_add(f64::from(y[i]), acc[i]);
        }
    }
    let mut s = 0f64;
    for (x, y) in ra.iter().zip(rb) {
        s = f64::from(*x).mul_add(f64::from(*y), s);
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + s
}

/// `e^x` in f32 to within 2 ulp for |x| < 87 (range reduction by ln 2 in two parts, a degree-6 polynomial), written so
/// that it vectorises; inputs below −87.3 give a value under 2e-38 instead of 0, above 88.3 the largest finite power.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.3, 88.3);
    let n = x.mul_add(LOG2E, 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    // Taylor coefficients 1/k! for k = 6 down to 0 (|r| ≤ ln2/2, so the truncation error is under 2⁻²⁴).
    let mut p = 1.0 / 720.0f32;
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    p * pow2(n)
}

/// `2^n` for an integral `n` in −126..=127, from the bits of `n + 127 + 2²³` (whose low mantissa bits are then
/// `n + 127`): the same value as `((n as i32 + 127) as u32) << 23`, without a float-to-integer conversion, whose
/// saturating semantics kept LLVM from vectorising it (the lanes went one by one).
#[inline(always)]
fn pow2(n: f32) -> f32 {
    const SHIFTED_BIAS: f32 = 127.0 + (1u32 << 23) as f32;
    f32::from_bits(((n + SHIFTED_BIAS).to_bits() & 0x7f_ffff) << 23)
}

/// `x · sigmoid(x)` with [`exp`].
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// SwiGLU's product in place: `g ← silu(g) · u`.
#[inline(always)]
fn swiglu_body(g: &mut [f32], u: &[f32]) {
    for (a, b) in g.iter_mut().zip(u) {
        *a = silu(*a) * b;
    }
}

crate::multiversion!(pub fn swiglu(g: &mut [f32], u: &[f32]) => swiglu_body);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pow2_is_the_integer_conversion() {
        for n in -126..=127 {
            let want = f32::from_bits(((n + 127) as u32) << 23);
            assert_eq!(pow2(n as f32).to_bits(), want.to_bits(), "2^{n}");
        }
    }

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            let ulp = f64::from(f32::EPSILON) * want;
            worst = worst.max((got - want).abs() / ulp);
            x += 0.013_7;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-200.0) < 2e-38 && exp(200.0).is_finite());
    }

    #[test]
    fn swiglu_matches_the_scalar_formula() {
        let g0: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) * 0.37).collect();
        let u: Vec<f32> = (0..100).map(|i| (i as f32) * 0.01 - 0.3).collect();
        let mut g = g0.clone();
        swiglu(&mut g, &u);
        for ((got, x), y) in g.iter().zip(&g0).zip(&u) {
            let want = f64::from(*x) / (1.0 + (-f64::from(*x)).exp()) * f64::from(*y);
            assert!((f64::from(*got) - want).abs() <= 1e-6 * (1.0 + want.abs()), "{x}: {got} vs {want}");
        }
    }
}
