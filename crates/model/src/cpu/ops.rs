//! Elementwise and row-wise operations, f32 in and out. Names follow the spec (`spec/qwen35-architecture.md` §3).

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// `log(1 + e^x)`, with torch's threshold (x > 20 returns x) to stay finite.
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// Zero-centred RMSNorm of each `w.len()`-wide row of `x`, in place: `x / rms(x) · (1 + w)`.
pub fn rms_norm_offset(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for row in x.chunks_exact_mut(n) {
        let inv = inv_rms(row, eps);
        for (v, g) in row.iter_mut().zip(w) {
            *v *= inv * (1.0 + g);
        }
    }
}

/// Same as [`rms_norm_offset`] writing into `out` (so the residual stream stays intact).
pub fn rms_norm_offset_into(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    out.copy_from_slice(x);
    rms_norm_offset(out, w, eps);
}

/// `1 / sqrt(mean(x²) + eps)`.
#[inline]
pub fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|v| v * v).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

/// L2 normalisation with the eps inside the root of the sum (`y · rsqrt(Σy² + eps)`), then a scale.
pub fn l2_norm_scaled(x: &mut [f32], eps: f32, scale: f32) {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    let f = scale / (ss + eps).sqrt();
    for v in x {
        *v *= f;
    }
}

/// Dot product with 16 independent lane sums (so that the compiler vectorises it), then a fixed reduction: the
/// same inputs always give the same bits, whatever the caller.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// [`dot`] in f64, with 8 lane sums.
#[inline]
pub fn dot64(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// In-place softmax of one row.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x {
        *v *= inv;
    }
}

/// Log-softmax of one row into a new vector, accumulated in f64 so that log-probs are exact to f32.
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    x.iter().map(|&v| (v as f64 - lse) as f32).collect()
}

/// Rotary tables for partial NeoX RoPE: `inv_freq[i] = θ^(−2i/R)` for `i < R/2` (R = rotated dims).
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(rotary_dim: usize, theta: f64) -> Self {
        let inv_freq = (0..rotary_dim / 2)
            // transformers computes this in f32 from an int64 arange: base ** (arange(0, R, 2).float() / R).
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / rotary_dim as f32))
            .collect();
        Rope { inv_freq }
    }

    /// Rotates the first R dims of one head vector at `pos`; dim i pairs with dim i + R/2.
    pub fn apply(&self, head: &mut [f32], pos: usize) {
        let half = self.inv_freq.len();
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let angle = pos as f32 * f;
            let (s, c) = angle.sin_cos();
            let a = head[i];
            let b = head[i + half];
            head[i] = a * c - b * s;
            head[i + half] = b * c + a * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_and_keeps_norm() {
        let rope = Rope::new(4, 10_000.0);
        let mut v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let before: f32 = v[..4].iter().map(|x| x * x).sum();
        rope.apply(&mut v, 3);
        let after: f32 = v[..4].iter().map(|x| x * x).sum();
        assert!((before - after).abs() < 1e-4);
        assert_eq!(&v[4..], &[5.0, 6.0], "dims past R pass through");
        // Pair (0, 2) at frequency 1: rotation by 3 radians.
        let (s, c) = 3f32.sin_cos();
        assert!((v[0] - (c - 3.0 * s)).abs() < 1e-5);
        assert!((v[2] - (3.0 * c + s)).abs() < 1e-5);
    }

    #[test]
    fn log_softmax_normalises() {
        let lp = log_softmax(&[1.0, 2.0, 3.0, -100.0]);
        let total: f32 = lp.iter().map(|v| v.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(lp[2] > lp[1] && lp[1] > lp[0]);
    }
}
