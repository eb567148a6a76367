//! Gated DeltaNet linear attention (spec §3.4): input projections, causal depthwise conv with SiLU, L2-normalised
//! q/k, the gated delta rule (chunked for prefill, recurrent for single-token steps; algebraically identical),
//! RMSNormGated and the output projection.
//!
//! The delta rule runs in f64 on the fp32 state. Both of its forms are exact in exact arithmetic but round differently
//! in f32 (the chunked form solves a triangular system), which showed as 4e-5 logit differences between a prefill and
//! the same tokens decoded one by one; in f64 the two agree to f32 rounding. The core is a small part of a step's
//! cost (the projections dominate), and the state stays fp32 in memory as in the reference.
//!
//! Qwen3-Next's grouped `in_proj_qkvz` / `in_proj_ba` are reordered into the Qwen3.5 layout on the projection
//! *outputs*, per token, so that the weights stay memory-mapped as published.

// Index loops here mirror the math (rows t, columns r, chunk positions i, j) and read better than zips.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use crate::config::{Family, ModelConfig};
use crate::cpu::ops::{dot64 as dot, inv_rms, l2_norm_scaled, sigmoid, silu, softplus};
use crate::cpu::profile::{self, dense_matmul as matmul, Stage};
use crate::error::Result;
use crate::layers::{split_rows, Span};
use crate::state::LayerState;
use crate::weights::{Checkpoint, Mat};

/// Tokens per chunk of the chunked delta rule, as in the reference.
const CHUNK: usize = 64;
/// The eps of the q/k L2 normalisation (fixed in the reference, not rms_norm_eps).
const L2_EPS: f32 = 1e-6;

#[derive(Debug)]
enum Projections {
    /// Qwen3.5: contiguous `[q | k | v]`, then z, b, a.
    Split { qkv: Mat, z: Mat, b: Mat, a: Mat },
    /// Qwen3-Next: grouped per key head, `[q k v z]` and `[b a]` per group.
    Grouped { qkvz: Mat, ba: Mat },
}

#[derive(Debug)]
pub(crate) struct GatedDeltaNet {
    proj: Projections,
    /// Depthwise conv weights, transposed to `[K][C]` so that the conv runs along contiguous channels.
    conv: Vec<f32>,
    /// `−exp(A_log)` per value head.
    neg_a: Vec<f32>,
    dt_bias: Vec<f32>,
    norm: Vec<f32>,
    out_proj: Mat,
    hk: usize,
    hv: usize,
    dk: usize,
    dv: usize,
    kernel: usize,
    eps: f32,
}

impl GatedDeltaNet {
    pub(crate) fn load(ckpt: &Checkpoint, cfg: &ModelConfig, layer: usize) -> Result<Self> {
        let p = format!("layers.{layer}.linear_attn.");
        let h = cfg.hidden_size;
        let (hk, hv, dk, dv) =
            (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim);
        let c = cfg.linear_conv_channels();
        let kernel = cfg.linear_conv_kernel_dim;
        let proj = match cfg.family {
            Family::Qwen35Moe => Projections::Split {
                qkv: ckpt.matrix(&format!("{p}in_proj_qkv.weight"), &[c, h])?,
                z: ckpt.matrix(&format!("{p}in_proj_z.weight"), &[hv * dv, h])?,
                b: ckpt.matrix(&format!("{p}in_proj_b.weight"), &[hv, h])?,
                a: ckpt.matrix(&format!("{p}in_proj_a.weight"), &[hv, h])?,
            },
            Family::Qwen3Next => Projections::Grouped {
                qkvz: ckpt.matrix(&format!("{p}in_proj_qkvz.weight"), &[2 * hk * dk + 2 * hv * dv, h])?,
                ba: ckpt.matrix(&format!("{p}in_proj_ba.weight"), &[2 * hv, h])?,
            },
        };
        let a_log = ckpt.vector(&format!("{p}A_log"), &[hv])?;
        let conv_ck = ckpt.vector(&format!("{p}conv1d.weight"), &[c, 1, kernel])?;
        let conv =
            (0..kernel).flat_map(|j| (0..c).map(move |ch| (ch, j))).map(|(ch, j)| conv_ck[ch * kernel + j]).collect();
        Ok(GatedDeltaNet {
            proj,
            conv,
            neg_a: a_log.iter().map(|v| -v.exp()).collect(),
            dt_bias: ckpt.vector(&format!("{p}dt_bias"), &[hv])?,
            norm: ckpt.vector(&format!("{p}norm.weight"), &[dv])?,
            out_proj: ckpt.matrix(&format!("{p}out_proj.weight"), &[h, hv * dv])?,
            hk,
            hv,
            dk,
            dv,
            kernel,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    pub(crate) fn weight_bytes(&self) -> usize {
        let proj = match &self.proj {
            Projections::Split { qkv, z, b, a } => qkv.bytes() + z.bytes() + b.bytes() + a.bytes(),
            Projections::Grouped { qkvz, ba } => qkvz.bytes() + ba.bytes(),
        };
        proj + self.out_proj.bytes()
    }

    /// FLOPs of the delta rule over `spans` (the conv and norms are small beside it): 7·dk·dv per head and token
    /// for the recurrence; per chunk of l tokens about l²·(3dk + 2dv) + 6·l·dk·dv for the chunked form.
    fn rule_flops(&self, spans: &[Span]) -> u64 {
        let (dk, dv) = (self.dk, self.dv);
        let per_head: usize = spans
            .iter()
            .map(|s| {
                if s.len == 1 {
                    return 7 * dk * dv;
                }
                let (full, rest) = (s.len / CHUNK, s.len % CHUNK);
                let chunk = |l: usize| l * l * (3 * dk + 2 * dv) + 6 * l * dk * dv;
                full * chunk(CHUNK) + if rest > 0 { chunk(rest) } else { 0 }
            })
            .sum();
        (per_head * self.hv) as u64
    }

    fn channels(&self) -> usize {
        2 * self.hk * self.dk + self.hv * self.dv
    }

    /// Returns `(m, z, b, a)` in the Qwen3.5 layout: m `[ntok, C]`, z `[ntok, Hv·dv]`, b and a `[ntok, Hv]`.
    fn project(&self, x: &[f32], ntok: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let (hk, hv, dk, dv) = (self.hk, self.hv, self.dk, self.dv);
        let c = self.channels();
        let mut m = vec![0f32; ntok * c];
        let mut z = vec![0f32; ntok * hv * dv];
        let mut b = vec![0f32; ntok * hv];
        let mut a = vec![0f32; ntok * hv];
        match &self.proj {
            Projections::Split { qkv, z: wz, b: wb, a: wa } => {
                matmul(x, ntok, qkv, &mut m);
                matmul(x, ntok, wz, &mut z);
                matmul(x, ntok, wb, &mut b);
                matmul(x, ntok, wa, &mut a);
            }
            Projections::Grouped { qkvz, ba } => {
                let r = hv / hk;
                let gw = 2 * dk + 2 * r * dv;
                let mut p = vec![0f32; ntok * qkvz.rows];
                let mut pba = vec![0f32; ntok * ba.rows];
                matmul(x, ntok, qkvz, &mut p);
                matmul(x, ntok, ba, &mut pba);
                for t in 0..ntok {
                    let (pr, mr) = (&p[t * qkvz.rows..(t + 1) * qkvz.rows], &mut m[t * c..(t + 1) * c]);
                    let zr = &mut z[t * hv * dv..(t + 1) * hv * dv];
                    for g in 0..hk {
                        let grp = &pr[g * gw..(g + 1) * gw];
                        mr[g * dk..(g + 1) * dk].copy_from_slice(&grp[..dk]);
                        mr[hk * dk + g * dk..hk * dk + (g + 1) * dk].copy_from_slice(&grp[dk..2 * dk]);
                        let vo = 2 * hk * dk + g * r * dv;
                        mr[vo..vo + r * dv].copy_from_slice(&grp[2 * dk..2 * dk + r * dv]);
                        zr[g * r * dv..(g + 1) * r * dv].copy_from_slice(&grp[2 * dk + r * dv..]);
                        for i in 0..r {
                            b[t * hv + g * r + i] = pba[t * 2 * hv + g * 2 * r + i];
                            a[t * hv + g * r + i] = pba[t * 2 * hv + g * 2 * r + r + i];
                        }
                    }
                }
            }
        }
        (m, z, b, a)
    }

    /// Runs the layer on normed hidden states `x` (spans back to back) and returns the mixer output.
    pub(crate) fn forward(&self, x: &[f32], spans: &[Span], states: &mut [&mut LayerState]) -> Vec<f32> {
        let ntok = spans.iter().map(|s| s.len).sum::<usize>();
        let (m, z, b, a) = self.project(x, ntok);
        let (c, hv, dv) = (self.channels(), self.hv, self.dv);
        let mut y = vec![0f32; ntok * hv * dv];
        let y_parts = split_rows(&mut y, spans, hv * dv);
        let chunked = spans.iter().any(|s| s.len > 1);
        let stage = if chunked { Stage::DeltaChunked } else { Stage::DeltaRecurrent };
        profile::time(stage, self.rule_flops(spans), 0, || {
            spans.par_iter().zip(states.par_iter_mut()).zip(y_parts).for_each(|((span, state), y_span)| {
                let LayerState::Linear { conv, s } = &mut **state else {
                    unreachable!("layer kinds of state and model agree: both come from layer_types");
                };
                let rows = span.start..span.start + span.len;
                let inputs = SpanInputs {
                    m: &m[rows.start * c..rows.end * c],
                    z: &z[rows.start * hv * dv..rows.end * hv * dv],
                    b: &b[rows.start * hv..rows.end * hv],
                    a: &a[rows.start * hv..rows.end * hv],
                };
                self.span(span.len, inputs, conv, s, y_span);
            })
        });
        let mut out = vec![0f32; ntok * self.out_proj.rows];
        matmul(&y, ntok, &self.out_proj, &mut out);
        out
    }

    fn span(&self, n: usize, inp: SpanInputs<'_>, conv_state: &mut [f32], s: &mut [f32], y: &mut [f32]) {
        let (hk, hv, dk, dv, kk) = (self.hk, self.hv, self.dk, self.dv, self.kernel);
        let c = self.channels();
        // Causal depthwise conv over [state | inputs], then SiLU; the state keeps the last K−1 raw inputs.
        let mut window = Vec::with_capacity((kk - 1 + n) * c);
        window.extend_from_slice(conv_state);
        window.extend_from_slice(inp.m);
        let mut u = vec![0f32; n * c];
        for t in 0..n {
            let ur = &mut u[t * c..(t + 1) * c];
            for j in 0..kk {
                let wr = &window[(t + j) * c..(t + j + 1) * c];
                let taps = &self.conv[j * c..(j + 1) * c];
                for ((acc, x), w) in ur.iter_mut().zip(wr).zip(taps) {
                    *acc += w * x;
                }
            }
            for v in ur.iter_mut() {
                *v = silu(*v);
            }
        }
        conv_state.copy_from_slice(&window[n * c..]);

        let r = hv / hk;
        let q_scale = 1.0 / (dk as f32).sqrt();
        let outputs: Vec<Vec<f64>> = s
            .par_chunks_mut(dk * dv)
            .enumerate()
            .map(|(j, sj)| {
                let kh = j / r;
                let mut q = Vec::with_capacity(n * dk);
                let mut k = Vec::with_capacity(n * dk);
                let mut v = Vec::with_capacity(n * dv);
                let mut beta = Vec::with_capacity(n);
                let mut g = Vec::with_capacity(n);
                let mut qt = vec![0f32; dk];
                let mut kt = vec![0f32; dk];
                for t in 0..n {
                    let ur = &u[t * c..(t + 1) * c];
                    qt.copy_from_slice(&ur[kh * dk..(kh + 1) * dk]);
                    l2_norm_scaled(&mut qt, L2_EPS, q_scale);
                    kt.copy_from_slice(&ur[hk * dk + kh * dk..hk * dk + (kh + 1) * dk]);
                    l2_norm_scaled(&mut kt, L2_EPS, 1.0);
                    q.extend(qt.iter().map(|&x| f64::from(x)));
                    k.extend(kt.iter().map(|&x| f64::from(x)));
                    v.extend(ur[2 * hk * dk + j * dv..2 * hk * dk + (j + 1) * dv].iter().map(|&x| f64::from(x)));
                    beta.push(f64::from(sigmoid(inp.b[t * hv + j])));
                    g.push(f64::from(self.neg_a[j] * softplus(inp.a[t * hv + j] + self.dt_bias[j])));
                }
                let head = HeadInputs { q: &q, k: &k, v: &v, beta: &beta, g: &g, dk, dv };
                if n == 1 {
                    return recurrent_step(&head, sj);
                }
                let mut s64: Vec<f64> = sj.iter().map(|&x| f64::from(x)).collect();
                let o = chunked(&head, n, &mut s64);
                for (dst, src) in sj.iter_mut().zip(&s64) {
                    *dst = *src as f32;
                }
                o
            })
            .collect();

        // RMSNormGated: normalise o, scale by the plain weight, gate by silu(z).
        for t in 0..n {
            for (j, oj) in outputs.iter().enumerate() {
                let o: Vec<f32> = oj[t * dv..(t + 1) * dv].iter().map(|&x| x as f32).collect();
                let inv = inv_rms(&o, self.eps);
                let zr = &inp.z[(t * hv + j) * dv..(t * hv + j + 1) * dv];
                let yr = &mut y[(t * hv + j) * dv..(t * hv + j + 1) * dv];
                for i in 0..dv {
                    yr[i] = self.norm[i] * (o[i] * inv) * silu(zr[i]);
                }
            }
        }
    }
}

struct SpanInputs<'a> {
    m: &'a [f32],
    z: &'a [f32],
    b: &'a [f32],
    a: &'a [f32],
}

/// One value head's inputs for a span: normalised q/k `[n, dk]`, v `[n, dv]`, β and the log-decay g `[n]`.
struct HeadInputs<'a> {
    q: &'a [f64],
    k: &'a [f64],
    v: &'a [f64],
    beta: &'a [f64],
    g: &'a [f64],
    dk: usize,
    dv: usize,
}

/// One step of the gated delta rule on the fp32 state, in f64 arithmetic: decay, predict, correct, read. The decayed
/// state is never stored in between, so the state is rounded to f32 once per step, as after a chunked call. Returns
/// `o [dv]`.
fn recurrent_step(h: &HeadInputs<'_>, s: &mut [f32]) -> Vec<f64> {
    let (dk, dv) = (h.dk, h.dv);
    let alpha = h.g[0].exp();
    // Predict with the decayed state: e = v − (αS)ᵀk.
    let mut e = h.v[..dv].to_vec();
    for i in 0..dk {
        let ki = h.k[i] * alpha;
        for (ec, sc) in e.iter_mut().zip(&s[i * dv..(i + 1) * dv]) {
            *ec -= ki * f64::from(*sc);
        }
    }
    for ec in e.iter_mut() {
        *ec *= h.beta[0];
    }
    // Correct and read: S ← αS + k ⊗ e, o = Sᵀq.
    let mut o = vec![0f64; dv];
    for i in 0..dk {
        let (ki, qi) = (h.k[i], h.q[i]);
        for ((sc, ec), oc) in s[i * dv..(i + 1) * dv].iter_mut().zip(&e).zip(o.iter_mut()) {
            let updated = alpha * f64::from(*sc) + ki * ec;
            *oc += qi * updated;
            *sc = updated as f32;
        }
    }
    o
}

/// The chunked gated delta rule over `n` tokens, updating `s` `[dk, dv]` in place. Returns `o [n, dv]`.
fn chunked(h: &HeadInputs<'_>, n: usize, s: &mut [f64]) -> Vec<f64> {
    let (dk, dv) = (h.dk, h.dv);
    let mut out = vec![0f64; n * dv];
    let mut gamma = [0f64; CHUNK];
    let mut kk = vec![0f64; CHUNK * CHUNK];
    let mut u = vec![0f64; CHUNK * dv];
    let mut w = vec![0f64; CHUNK * dk];
    let mut vp = vec![0f64; CHUNK * dv];
    let mut c0 = 0;
    while c0 < n {
        let l = (n - c0).min(CHUNK);
        let q = &h.q[c0 * dk..(c0 + l) * dk];
        let k = &h.k[c0 * dk..(c0 + l) * dk];
        let v = &h.v[c0 * dv..(c0 + l) * dv];
        let beta = &h.beta[c0..c0 + l];
        let mut acc = 0f64;
        for i in 0..l {
            acc += h.g[c0 + i];
            gamma[i] = acc;
        }
        // A_ij = β_i (k_i·k_j) e^{Γ_i−Γ_j}, j < i (strictly lower).
        for i in 0..l {
            for j in 0..i {
                kk[i * CHUNK + j] =
                    beta[i] * dot(&k[i * dk..(i + 1) * dk], &k[j * dk..(j + 1) * dk]) * (gamma[i] - gamma[j]).exp();
            }
        }
        // Forward substitution: U = (I+A)⁻¹ diag(β) V and W = (I+A)⁻¹ diag(β e^Γ) K.
        for i in 0..l {
            let (done, row) = u.split_at_mut(i * dv);
            let ui = &mut row[..dv];
            for (x, vi) in ui.iter_mut().zip(&v[i * dv..(i + 1) * dv]) {
                *x = beta[i] * vi;
            }
            let (wdone, wrow) = w.split_at_mut(i * dk);
            let wi = &mut wrow[..dk];
            let f = beta[i] * gamma[i].exp();
            for (x, ki) in wi.iter_mut().zip(&k[i * dk..(i + 1) * dk]) {
                *x = f * ki;
            }
            for j in 0..i {
                let aij = kk[i * CHUNK + j];
                for (x, uj) in ui.iter_mut().zip(&done[j * dv..(j + 1) * dv]) {
                    *x -= aij * uj;
                }
                for (x, wj) in wi.iter_mut().zip(&wdone[j * dk..(j + 1) * dk]) {
                    *x -= aij * wj;
                }
            }
        }
        // V' = U − W·S; O_i = e^{Γ_i} q_i·S + Σ_{j≤i} (q_i·k_j) e^{Γ_i−Γ_j} V'_j.
        for i in 0..l {
            let vpi = &mut vp[i * dv..(i + 1) * dv];
            vpi.copy_from_slice(&u[i * dv..(i + 1) * dv]);
            let oi = &mut out[(c0 + i) * dv..(c0 + i + 1) * dv];
            let eg = gamma[i].exp();
            for r in 0..dk {
                let (wr, qr) = (w[i * dk + r], q[i * dk + r] * eg);
                for ((x, o), sc) in vpi.iter_mut().zip(oi.iter_mut()).zip(&s[r * dv..(r + 1) * dv]) {
                    *x -= wr * sc;
                    *o += qr * sc;
                }
            }
        }
        for i in 0..l {
            let qi = &q[i * dk..(i + 1) * dk];
            let oi = &mut out[(c0 + i) * dv..(c0 + i + 1) * dv];
            for j in 0..=i {
                let f = dot(qi, &k[j * dk..(j + 1) * dk]) * (gamma[i] - gamma[j]).exp();
                for (o, x) in oi.iter_mut().zip(&vp[j * dv..(j + 1) * dv]) {
                    *o += f * x;
                }
            }
        }
        // S ← e^{Γ_last} S + Σ_j e^{Γ_last−Γ_j} k_j ⊗ V'_j.
        let last = gamma[l - 1];
        let decay = last.exp();
        for x in s.iter_mut() {
            *x *= decay;
        }
        for j in 0..l {
            let f = (last - gamma[j]).exp();
            for r in 0..dk {
                let kr = k[j * dk + r] * f;
                for (sc, x) in s[r * dv..(r + 1) * dv].iter_mut().zip(&vp[j * dv..(j + 1) * dv]) {
                    *sc += kr * x;
                }
            }
        }
        c0 += l;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunked form equals the recurrence token by token (spec §3.4: algebraically identical); the recurrence
    /// rounds its state to f32 after every step, hence the tolerance.
    #[test]
    fn chunked_equals_recurrent() {
        let (dk, dv, n) = (6, 5, 150);
        let mut seed = 12345u32;
        let mut rnd = move || -> f64 {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as f64 / u32::MAX as f64 - 0.5
        };
        let unit = |v: Vec<f64>, scale: f64| -> Vec<f64> {
            v.chunks(dk)
                .flat_map(|c| {
                    let norm = c.iter().map(|x| x * x).sum::<f64>().sqrt();
                    c.iter().map(move |x| x / norm * scale).collect::<Vec<_>>()
                })
                .collect()
        };
        let q = unit((0..n * dk).map(|_| rnd()).collect(), 0.4);
        let k = unit((0..n * dk).map(|_| rnd()).collect(), 1.0);
        let v: Vec<f64> = (0..n * dv).map(|_| rnd() * 4.0).collect();
        let beta: Vec<f64> = (0..n).map(|_| 1.0 / (1.0 + (-rnd() * 4.0).exp())).collect();
        let g: Vec<f64> = (0..n).map(|_| -(rnd() * 3.0).exp().ln_1p() * 0.3).collect();
        let mut s0: Vec<f64> = (0..dk * dv).map(|_| rnd() as f32 as f64).collect();
        let mut s1: Vec<f32> = s0.iter().map(|&x| x as f32).collect();

        let all = HeadInputs { q: &q, k: &k, v: &v, beta: &beta, g: &g, dk, dv };
        let chunk_out = chunked(&all, n, &mut s0);
        for t in 0..n {
            let one = HeadInputs {
                q: &q[t * dk..(t + 1) * dk],
                k: &k[t * dk..(t + 1) * dk],
                v: &v[t * dv..(t + 1) * dv],
                beta: &beta[t..t + 1],
                g: &g[t..t + 1],
                dk,
                dv,
            };
            let o = recurrent_step(&one, &mut s1);
            for (a, b) in o.iter().zip(&chunk_out[t * dv..(t + 1) * dv]) {
                assert!((a - b).abs() < 1e-5, "t={t}: {a} vs {b}");
            }
        }
        for (a, b) in s0.iter().zip(&s1) {
            assert!((f64::from(*b) - a).abs() < 1e-5, "state: {a} vs {b}");
        }
    }
}
