//! Gated DeltaNet linear attention (spec §3.4): input projections, causal depthwise conv with SiLU, L2-normalised
//! q/k, the gated delta rule (chunked for prefill, recurrent for single-token steps; algebraically identical),
//! RMSNormGated and the output projection.
//!
//! The delta rule runs on the fp32 state as in the reference. Both of its forms are exact in exact arithmetic but
//! round differently (the chunked form solves a triangular system, which amplifies rounding: all-f32 showed 4e-5
//! logit differences between a prefill and the same tokens decoded one by one). So the chunked form solves its small
//! triangular system in f64, carries the state in f64 within a chunk, and computes the outputs in f64; the two
//! products that only feed the state's correction (`W·S` and `Kᵀ·V'`) run in f32 ([`gemm`]). The recurrence is f64
//! arithmetic on the f32 state. Both are vectorised for the CPU ([`crate::cpu::simd`]).
//!
//! Qwen3-Next's grouped `in_proj_qkvz` / `in_proj_ba` are reordered into the Qwen3.5 layout on the projection
//! *outputs*, per token, so that the weights stay memory-mapped as published.

// Index loops here mirror the math (rows t, columns r, chunk positions i, j) and read better than zips.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use crate::config::{Family, ModelConfig};
use crate::cpu::matmul::Activations;
use crate::cpu::ops::{inv_rms, l2_norm_scaled, sigmoid, softplus};
use crate::cpu::profile::{self, dense_matmul as matmul, Stage};
use crate::cpu::simd;
use crate::error::Result;
use crate::layers::{split_rows, Span};
use crate::state::LayerState;
use crate::weights::{Checkpoint, Mat};

mod gemm;
use gemm::{gemm_add, Left};

/// Rows of the forward substitution solved per block (the gemm's row block).
const SOLVE_ROWS: usize = 8;
/// Tokens per chunk of the chunked delta rule. The reference uses 64; the chunk size changes only rounding, and 32
/// halves the work that grows with it (the triangles, the solve, `P·V'`): on the bench model's 512-token prefill the
/// rule took 183-196 ms instead of 242-253, with the prefill-then-decode figures unchanged or lower.
const CHUNK: usize = 32;
// Calls that start on aligned positions start on chunk boundaries.
const _: () = assert!(crate::state::ALIGN_TOKENS.is_multiple_of(CHUNK));
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
                let xa = Activations::new(x, ntok, qkv.cols);
                profile::dense(&xa, qkv, &mut m);
                profile::dense(&xa, wz, &mut z);
                profile::dense(&xa, wb, &mut b);
                profile::dense(&xa, wa, &mut a);
            }
            Projections::Grouped { qkvz, ba } => {
                let r = hv / hk;
                let gw = 2 * dk + 2 * r * dv;
                let mut p = vec![0f32; ntok * qkvz.rows];
                let mut pba = vec![0f32; ntok * ba.rows];
                let xa = Activations::new(x, ntok, qkvz.cols);
                profile::dense(&xa, qkvz, &mut p);
                profile::dense(&xa, ba, &mut pba);
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
        let mut u = vec![0f32; n * c];
        let window_row = |i: usize| -> &[f32] {
            if i < kk - 1 {
                &conv_state[i * c..(i + 1) * c]
            } else {
                &inp.m[(i - (kk - 1)) * c..(i - (kk - 1) + 1) * c]
            }
        };
        let conv_rows = |t0: usize, rows: &mut [f32]| {
            for (dt, ur) in rows.chunks_mut(c).enumerate() {
                for j in 0..kk {
                    conv_tap(ur, window_row(t0 + dt + j), &self.conv[j * c..(j + 1) * c]);
                }
                silu_in_place(ur);
            }
        };
        if n >= 2 * CONV_TOKENS {
            u.par_chunks_mut(CONV_TOKENS * c).enumerate().for_each(|(b, rows)| conv_rows(b * CONV_TOKENS, rows));
        } else {
            conv_rows(0, &mut u);
        }
        let tail: Vec<f32> = (n..n + kk - 1).flat_map(|i| window_row(i).iter().copied()).collect();
        conv_state.copy_from_slice(&tail);

        let r = hv / hk;
        let q_scale = 1.0 / (dk as f32).sqrt();
        // Each key head's normalised queries and keys, once for the r value heads that share them.
        let key_heads: Vec<(Vec<f32>, Vec<f32>)> = (0..hk)
            .into_par_iter()
            .map(|kh| {
                let mut q = Vec::with_capacity(n * dk);
                let mut k = Vec::with_capacity(n * dk);
                for t in 0..n {
                    let ur = &u[t * c..(t + 1) * c];
                    q.extend_from_slice(&ur[kh * dk..(kh + 1) * dk]);
                    l2_norm_scaled(&mut q[t * dk..(t + 1) * dk], L2_EPS, q_scale);
                    k.extend_from_slice(&ur[hk * dk + kh * dk..hk * dk + (kh + 1) * dk]);
                    l2_norm_scaled(&mut k[t * dk..(t + 1) * dk], L2_EPS, 1.0);
                }
                (q, k)
            })
            .collect();
        let outputs: Vec<Vec<f32>> = s
            .par_chunks_mut(dk * dv)
            .enumerate()
            .map(|(j, sj)| {
                let (q, k) = &key_heads[j / r];
                let mut v = Vec::with_capacity(n * dv);
                let mut beta = Vec::with_capacity(n);
                let mut g = Vec::with_capacity(n);
                for t in 0..n {
                    let ur = &u[t * c..(t + 1) * c];
                    v.extend_from_slice(&ur[2 * hk * dk + j * dv..2 * hk * dk + (j + 1) * dv]);
                    beta.push(f64::from(sigmoid(inp.b[t * hv + j])));
                    g.push(f64::from(self.neg_a[j] * softplus(inp.a[t * hv + j] + self.dt_bias[j])));
                }
                let head = HeadInputs { q, k, v: &v, beta: &beta, g: &g, dk, dv };
                let mut o = vec![0f32; n * dv];
                if n == 1 {
                    recurrent_step(&head, sj, &mut o);
                } else {
                    chunked(&head, n, sj, &mut o);
                }
                o
            })
            .collect();

        // RMSNormGated: normalise o, scale by the plain weight, gate by silu(z).
        let norm_token = |t: usize, yt: &mut [f32]| {
            for (j, oj) in outputs.iter().enumerate() {
                let o = &oj[t * dv..(t + 1) * dv];
                let inv = inv_rms(o, self.eps);
                let zr = &inp.z[(t * hv + j) * dv..(t * hv + j + 1) * dv];
                gated_norm(&mut yt[j * dv..(j + 1) * dv], o, inv, &self.norm, zr);
            }
        };
        if n >= 2 * CONV_TOKENS {
            y.par_chunks_mut(hv * dv).enumerate().for_each(|(t, yt)| norm_token(t, yt));
        } else {
            y.chunks_mut(hv * dv).enumerate().for_each(|(t, yt)| norm_token(t, yt));
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
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    beta: &'a [f64],
    g: &'a [f64],
    dk: usize,
    dv: usize,
}

/// Tokens per parallel task of the conv and the gated norm.
const CONV_TOKENS: usize = 16;

/// `acc += w · x` lane by lane (a product then a sum, not fused: the same bits on every vector level).
#[inline(always)]
fn conv_tap_body(acc: &mut [f32], x: &[f32], w: &[f32]) {
    for ((a, x), w) in acc.iter_mut().zip(x).zip(w) {
        *a += w * x;
    }
}

/// `x ← silu(x)` with the vectorisable exp.
#[inline(always)]
fn silu_body(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = simd::silu(*v);
    }
}

/// RMSNormGated for one head and token: `y = w · (o · inv) · silu(z)`.
#[inline(always)]
fn gated_norm_body(y: &mut [f32], o: &[f32], inv: f32, w: &[f32], z: &[f32]) {
    for (((y, o), w), z) in y.iter_mut().zip(o).zip(w).zip(z) {
        *y = w * (o * inv) * simd::silu(*z);
    }
}

crate::multiversion!(fn conv_tap(acc: &mut [f32], x: &[f32], w: &[f32]) => conv_tap_body);
crate::multiversion!(fn silu_in_place(x: &mut [f32]) => silu_body);
crate::multiversion!(fn gated_norm(y: &mut [f32], o: &[f32], inv: f32, w: &[f32], z: &[f32]) => gated_norm_body);
/// Decays below e^-600 (about 1e-261) are taken as zero, and state values below f32's smallest normal are stored as
/// zero. Strong decays otherwise leave subnormal numbers in the state and its products, and every operation on a
/// subnormal takes a microcode assist on x86 (measured: a chunk rule with decays of e^-30 to e^-180 per token ran
/// at 0.6× the speed, a recurrent step at batch 64 alike). What is dropped is below 1e-37 of the values kept.
const EXP_FLOOR: f64 = -600.0;

#[inline(always)]
fn exp_flushed(x: f64) -> f64 {
    if x < EXP_FLOOR {
        0.0
    } else {
        x.exp()
    }
}

#[inline(always)]
fn state_f32(x: f64) -> f32 {
    if x.abs() < f64::from(f32::MIN_POSITIVE) {
        0.0
    } else {
        x as f32
    }
}

/// An operand of the f32 products: values below 2⁻⁶³ are taken as zero, so that the product of any two operands is
/// a normal f32 (≥ 2⁻¹²⁶). Strong decays make keys, weights and state entries tiny, and a subnormal product costs a
/// microcode assist (measured: the rule at 0.8× the speed on the bench model's random weights). What is dropped is
/// below 1e-19 in sums whose terms f32 resolves to 6e-8 of the largest.
#[inline(always)]
fn product_f32(x: f64) -> f32 {
    const FLOOR: f64 = 1.0 / (1u64 << 63) as f64;
    if x.abs() < FLOOR {
        0.0
    } else {
        x as f32
    }
}

crate::multiversion!(fn recurrent_step(h: &HeadInputs<'_>, s: &mut [f32], o: &mut [f32]) => recurrent_body);
crate::multiversion!(fn chunked(h: &HeadInputs<'_>, n: usize, s: &mut [f32], out: &mut [f32]) => chunked_body);

/// One step of the gated delta rule on the f32 state, in f64 arithmetic (vectorised; the step reads and writes the
/// state once, which bounds its cost, not the arithmetic): decay, predict, correct, read. The decayed state is never
/// stored in between, so the state is rounded to f32 once per step, as after a chunked call. Writes `o [dv]`.
#[inline(always)]
fn recurrent_body(h: &HeadInputs<'_>, s: &mut [f32], o: &mut [f32]) {
    let (dk, dv) = (h.dk, h.dv);
    let alpha = exp_flushed(h.g[0]);
    // Predict with the decayed state: e = β (v − (αS)ᵀk).
    let mut e: Vec<f64> = h.v[..dv].iter().map(|&x| f64::from(x)).collect();
    for i in 0..dk {
        let ki = -f64::from(h.k[i]) * alpha;
        for (ec, sc) in e.iter_mut().zip(&s[i * dv..(i + 1) * dv]) {
            *ec = ki.mul_add(f64::from(*sc), *ec);
        }
    }
    for x in e.iter_mut() {
        *x *= h.beta[0];
    }
    // Correct and read: S ← αS + k ⊗ e, o = Sᵀq.
    let mut acc = vec![0f64; dv];
    for i in 0..dk {
        let (ki, qi) = (f64::from(h.k[i]), f64::from(h.q[i]));
        for ((sc, ec), oc) in s[i * dv..(i + 1) * dv].iter_mut().zip(&e).zip(acc.iter_mut()) {
            let updated = alpha.mul_add(f64::from(*sc), ki * ec);
            *oc = qi.mul_add(updated, *oc);
            *sc = state_f32(updated);
        }
    }
    for (o, a) in o.iter_mut().zip(&acc) {
        *o = *a as f32;
    }
}

/// The chunked gated delta rule over `n` tokens, updating the f32 state `s` `[dk, dv]` in place; writes `out [n, dv]`.
///
/// Per chunk of up to [`CHUNK`] tokens: the decays `e^{Γi−Γj}`, the strictly lower `A = β KKᵀ ⊙ D`, the forward
/// substitution that solves `(I + A)`, then four matrix products: `V' = U − W·S`, the inter-chunk read `e^Γ Q·S`,
/// the intra-chunk read `(QKᵀ ⊙ D)·V'` and the state update `S ← e^{Γ_l} S + (K ⊙ e^{Γ_l−Γ})ᵀ·V'`.
///
/// Precision where it matters: the triangular solve amplifies rounding, so `A`, `U` and `W` are f64; the state is
/// rounded to f32 at every chunk's end, as at a call's end, so that a prompt fed in calls that start on multiples of
/// [`CHUNK`] gives the same bits as one call (which the prefix cache relies on). Carrying it in f64 across a call's
/// chunks instead left the fixtures' prefill-versus-decode logits where they are (3.4e-6 to 4.3e-6 on Qwen3.5,
/// 1.8e-6 to 2.3e-6 on Qwen3-Next, the same figures either way). A last chunk of one token runs the recurrent step.
/// The outputs `O` are f64 products rounded once,
/// like the recurrence's: computed in f32 they moved the same test from 4e-6 to 7.6e-6 on the f32 kernel and from
/// 4.4e-5 to 1.4e-4 on the matrix units' split precision, whose bf16 split turns every last-bit difference into one
/// of 2⁻¹⁷. The two products that only feed the state's correction, `W·S` and `Kᵀ·V'` (half the work), run in f32
/// with 16 lanes and enter the f64 values by one addition; that left the same test where it was. Only the
/// triangles' nonzero row bands are multiplied.
#[inline(always)]
fn chunked_body(h: &HeadInputs<'_>, n: usize, s: &mut [f32], out: &mut [f32]) {
    let (dk, dv) = (h.dk, h.dv);
    let mut gamma = [0f64; CHUNK];
    let mut decay = vec![0f64; CHUNK * CHUNK];
    let mut a = vec![0f64; CHUNK * CHUNK];
    let mut u = vec![0f64; CHUNK * dv];
    let mut w = vec![0f64; CHUNK * dk];
    // The chunk's keys and queries in f64, keys also transposed, for KKᵀ and QKᵀ.
    let mut k64 = vec![0f64; CHUNK * dk];
    let mut q64 = vec![0f64; CHUNK * dk];
    let mut k64t = vec![0f64; dk * CHUNK];
    let mut kk = vec![0f64; CHUNK * CHUNK];
    let mut qk = vec![0f64; CHUNK * CHUNK];
    let mut neg_block = vec![0f64; SOLVE_ROWS * CHUNK];
    let mut qs = vec![0f64; CHUNK * dk];
    let mut p = vec![0f64; CHUNK * CHUNK];
    let mut o64 = vec![0f64; CHUNK * dv];
    // The f32 side of the products.
    let mut s32 = vec![0f32; dk * dv];
    let mut w32 = vec![0f32; CHUNK * dk];
    let mut ws = vec![0f32; CHUNK * dv];
    let mut v32 = vec![0f32; CHUNK * dv];
    let mut kd32 = vec![0f32; CHUNK * dk];
    let mut upd = vec![0f32; dk * dv];
    let mut s64: Vec<f64> = s.iter().map(|&x| f64::from(x)).collect();
    let mut c0 = 0;
    while c0 < n {
        let l = (n - c0).min(CHUNK);
        if l == 1 {
            // A last chunk of one token is the recurrent step, as a call of that one token would be: the state
            // between chunks is f32, so the two agree bit for bit.
            for (d, x) in s.iter_mut().zip(&s64) {
                *d = *x as f32;
            }
            let one = HeadInputs {
                q: &h.q[c0 * dk..],
                k: &h.k[c0 * dk..],
                v: &h.v[c0 * dv..],
                beta: &h.beta[c0..],
                g: &h.g[c0..],
                dk,
                dv,
            };
            recurrent_body(&one, s, &mut out[c0 * dv..(c0 + 1) * dv]);
            return;
        }
        let q = &h.q[c0 * dk..(c0 + l) * dk];
        let k = &h.k[c0 * dk..(c0 + l) * dk];
        let v = &h.v[c0 * dv..(c0 + l) * dv];
        let beta = &h.beta[c0..c0 + l];
        let mut acc = 0f64;
        for i in 0..l {
            acc += h.g[c0 + i];
            gamma[i] = acc;
        }
        for i in 0..l {
            for j in 0..=i {
                decay[i * CHUNK + j] = exp_flushed(gamma[i] - gamma[j]);
            }
        }
        // KKᵀ and QKᵀ (l × l), the row bands on and below the diagonal.
        for (d, x) in k64[..l * dk].iter_mut().zip(k) {
            *d = f64::from(*x);
        }
        for (d, x) in q64[..l * dk].iter_mut().zip(q) {
            *d = f64::from(*x);
        }
        for i in 0..l {
            for r in 0..dk {
                k64t[r * l + i] = k64[i * dk + r];
            }
        }
        let (kk, qk) = (&mut kk[..l * l], &mut qk[..l * l]);
        kk.fill(0.0);
        qk.fill(0.0);
        for i0 in (0..l).step_by(SOLVE_ROWS) {
            let i1 = (i0 + SOLVE_ROWS).min(l);
            let band = (i1 - i0, dk, i1);
            gemm_add(&mut kk[i0 * l..], l, Left::rows(&k64[i0 * dk..], dk), &k64t, l, band);
            gemm_add(&mut qk[i0 * l..], l, Left::rows(&q64[i0 * dk..], dk), &k64t, l, band);
        }
        // A_ij = β_i (k_i·k_j) e^{Γ_i−Γ_j}, j < i (strictly lower).
        for i in 0..l {
            for j in 0..i {
                a[i * CHUNK + j] = beta[i] * kk[i * l + j] * decay[i * CHUNK + j];
            }
        }
        // Forward substitution: U = (I+A)⁻¹ diag(β) V and W = (I+A)⁻¹ diag(β e^Γ) K, row i minus Σ_{j<i} A_ij row j.
        // In blocks of SOLVE_ROWS rows: the rows solved before a block enter it as one product (−A_block · rows
        // before), then the block's own triangle row by row; each element is the same FMA chain over j in order.
        for i in 0..l {
            for (x, vi) in u[i * dv..(i + 1) * dv].iter_mut().zip(&v[i * dv..(i + 1) * dv]) {
                *x = beta[i] * f64::from(*vi);
            }
            let f = beta[i] * exp_flushed(gamma[i]);
            for (x, ki) in w[i * dk..(i + 1) * dk].iter_mut().zip(&k[i * dk..(i + 1) * dk]) {
                *x = f * f64::from(*ki);
            }
        }
        for i0 in (0..l).step_by(SOLVE_ROWS) {
            let i1 = (i0 + SOLVE_ROWS).min(l);
            if i0 > 0 {
                let m = i1 - i0;
                for ii in 0..m {
                    for j in 0..i0 {
                        neg_block[ii * i0 + j] = -a[(i0 + ii) * CHUNK + j];
                    }
                }
                let minus_a = Left::rows(&neg_block[..m * i0], i0);
                let (done, rest) = u.split_at_mut(i0 * dv);
                gemm_add(rest, dv, minus_a, done, dv, (m, i0, dv));
                let (done, rest) = w.split_at_mut(i0 * dk);
                gemm_add(rest, dk, minus_a, done, dk, (m, i0, dk));
            }
            for i in i0..i1 {
                let (done, row) = u.split_at_mut(i * dv);
                let (wdone, wrow) = w.split_at_mut(i * dk);
                let (ui, wi) = (&mut row[..dv], &mut wrow[..dk]);
                for j in i0..i {
                    let aij = a[i * CHUNK + j];
                    for (x, uj) in ui.iter_mut().zip(&done[j * dv..(j + 1) * dv]) {
                        *x = (-aij).mul_add(*uj, *x);
                    }
                    for (x, wj) in wi.iter_mut().zip(&wdone[j * dk..(j + 1) * dk]) {
                        *x = (-aij).mul_add(*wj, *x);
                    }
                }
            }
        }
        // V' = U − W·S, the product in f32 and the difference in f64.
        for (d, x) in s32.iter_mut().zip(&s64) {
            *d = product_f32(*x);
        }
        for (d, x) in w32[..l * dk].iter_mut().zip(&w[..l * dk]) {
            *d = product_f32(*x);
        }
        let ws = &mut ws[..l * dv];
        ws.fill(0.0);
        gemm_add(ws, dv, Left::rows(&w32, dk), &s32, dv, (l, dk, dv));
        for ((d, x), p) in v32[..l * dv].iter_mut().zip(u[..l * dv].iter_mut()).zip(ws.iter()) {
            *x -= f64::from(*p);
            *d = product_f32(*x);
        }
        // O = e^Γ Q·S + P·V', P_ij = (q_i·k_j) e^{Γ_i−Γ_j} for j ≤ i, else 0; by row bands, P's zero columns skipped.
        for i in 0..l {
            let eg = exp_flushed(gamma[i]);
            for (d, x) in qs[i * dk..(i + 1) * dk].iter_mut().zip(&q[i * dk..(i + 1) * dk]) {
                *d = f64::from(*x) * eg;
            }
            for j in 0..l {
                p[i * l + j] = if j <= i { qk[i * l + j] * decay[i * CHUNK + j] } else { 0.0 };
            }
        }
        let o = &mut o64[..l * dv];
        o.fill(0.0);
        gemm_add(o, dv, Left::rows(&qs, dk), &s64, dv, (l, dk, dv));
        for i0 in (0..l).step_by(SOLVE_ROWS) {
            let i1 = (i0 + SOLVE_ROWS).min(l);
            gemm_add(&mut o[i0 * dv..], dv, Left::rows(&p[i0 * l..], l), &u, dv, (i1 - i0, i1, dv));
        }
        for (d, x) in out[c0 * dv..(c0 + l) * dv].iter_mut().zip(o.iter()) {
            *d = *x as f32;
        }
        // S ← e^{Γ_last} S + Σ_j e^{Γ_last−Γ_j} k_j ⊗ V'_j: the keys scaled in place, read transposed.
        let last = gamma[l - 1];
        for j in 0..l {
            let f = exp_flushed(last - gamma[j]);
            for (d, x) in kd32[j * dk..(j + 1) * dk].iter_mut().zip(&k[j * dk..(j + 1) * dk]) {
                *d = product_f32(f64::from(*x) * f);
            }
        }
        upd.fill(0.0);
        gemm_add(&mut upd, dv, Left::transposed(&kd32, dk), &v32, dv, (dk, l, dv));
        // Rounded to the f32 state at every chunk's end, as a call's end would: so the state after a chunk does not
        // depend on whether the chunks before it came in the same call (the prefix cache's exactness rests on it).
        let d = exp_flushed(last);
        for (x, p) in s64.iter_mut().zip(&upd) {
            *x = f64::from(state_f32(d.mul_add(*x, f64::from(*p))));
        }
        c0 += l;
    }
    for (d, x) in s.iter_mut().zip(&s64) {
        *d = state_f32(*x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gated delta rule token by token in f64 with an f64 state: the exact values both forms approximate.
    fn exact(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        beta: &[f64],
        g: &[f64],
        s: &mut [f64],
        (dk, dv): (usize, usize),
    ) -> Vec<f64> {
        let n = beta.len();
        let mut out = vec![0f64; n * dv];
        for t in 0..n {
            let alpha = g[t].exp();
            for x in s.iter_mut() {
                *x *= alpha;
            }
            let mut e: Vec<f64> = v[t * dv..(t + 1) * dv].iter().map(|&x| f64::from(x)).collect();
            for i in 0..dk {
                for c in 0..dv {
                    e[c] -= f64::from(k[t * dk + i]) * s[i * dv + c];
                }
            }
            for i in 0..dk {
                for c in 0..dv {
                    s[i * dv + c] += f64::from(k[t * dk + i]) * beta[t] * e[c];
                    out[t * dv + c] += f64::from(q[t * dk + i]) * s[i * dv + c];
                }
            }
        }
        out
    }

    /// The chunked form equals the recurrence token by token (spec §3.4: algebraically identical) and both equal the
    /// exact f64 recurrence, at a toy shape (vector tails) and at the models' head shape (128 × 128), across three
    /// chunks; the recurrence rounds its state to f32 after every step, hence the tolerance.
    #[test]
    fn chunked_equals_recurrent() {
        for (dk, dv, n) in [(6, 5, 150), (128, 128, 150)] {
            let mut seed = 12345u32;
            let mut rnd = move || -> f64 {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as f64 / u32::MAX as f64 - 0.5
            };
            let mut unit = |scale: f64| -> Vec<f32> {
                (0..n)
                    .flat_map(|_| {
                        let c: Vec<f64> = (0..dk).map(|_| rnd()).collect();
                        let norm = c.iter().map(|x| x * x).sum::<f64>().sqrt();
                        c.into_iter().map(move |x| (x / norm * scale) as f32)
                    })
                    .collect()
            };
            let q = unit(0.4);
            let k = unit(1.0);
            let v: Vec<f32> = (0..n * dv).map(|_| (rnd() * 4.0) as f32).collect();
            let beta: Vec<f64> = (0..n).map(|_| 1.0 / (1.0 + (-rnd() * 4.0).exp())).collect();
            let g: Vec<f64> = (0..n).map(|_| -(rnd() * 3.0).exp().ln_1p() * 0.3).collect();
            let s_init: Vec<f32> = (0..dk * dv).map(|_| rnd() as f32).collect();

            let mut s_exact: Vec<f64> = s_init.iter().map(|&x| f64::from(x)).collect();
            let want = exact(&q, &k, &v, &beta, &g, &mut s_exact, (dk, dv));
            let mut s0 = s_init.clone();
            let mut s1 = s_init.clone();
            let all = HeadInputs { q: &q, k: &k, v: &v, beta: &beta, g: &g, dk, dv };
            let mut chunk_out = vec![0f32; n * dv];
            chunked(&all, n, &mut s0, &mut chunk_out);
            let mut worst = (0f64, 0f64);
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
                let mut o = vec![0f32; dv];
                recurrent_step(&one, &mut s1, &mut o);
                for ((a, b), e) in o.iter().zip(&chunk_out[t * dv..(t + 1) * dv]).zip(&want[t * dv..(t + 1) * dv]) {
                    assert!((a - b).abs() < 1e-5, "{dk}x{dv} t={t}: recurrent {a} vs chunked {b}");
                    worst.0 = worst.0.max((f64::from(*a) - e).abs());
                    worst.1 = worst.1.max((f64::from(*b) - e).abs());
                }
            }
            for ((a, b), e) in s0.iter().zip(&s1).zip(&s_exact) {
                assert!((a - b).abs() < 1e-5, "{dk}x{dv} state: chunked {a} vs recurrent {b}");
                assert!((f64::from(*a) - e).abs() < 1e-5, "{dk}x{dv} state: chunked {a} vs exact {e}");
            }
            eprintln!(
                "{dk}x{dv}: worst output error to the exact f64 rule: recurrent {:.2e}, chunked {:.2e}",
                worst.0, worst.1
            );
            assert!(worst.0 < 1e-5 && worst.1 < 1e-5, "{dk}x{dv}: {worst:?}");

            // Calls that start on chunk boundaries give one call's bits, state and outputs; a last chunk of one
            // token gives the recurrent step's.
            for cuts in [vec![CHUNK], vec![2 * CHUNK, 3 * CHUNK], vec![CHUNK, 2 * CHUNK, 4 * CHUNK]] {
                let mut s2 = s_init.clone();
                let mut out = vec![0f32; n * dv];
                let mut from = 0;
                for to in cuts.iter().copied().chain([n]) {
                    let part = HeadInputs {
                        q: &q[from * dk..to * dk],
                        k: &k[from * dk..to * dk],
                        v: &v[from * dv..to * dv],
                        beta: &beta[from..to],
                        g: &g[from..to],
                        dk,
                        dv,
                    };
                    chunked(&part, to - from, &mut s2, &mut out[from * dv..to * dv]);
                    from = to;
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&out), bits(&chunk_out), "{dk}x{dv}: outputs fed in calls ending at {cuts:?}");
                assert_eq!(bits(&s2), bits(&s0), "{dk}x{dv}: state fed in calls ending at {cuts:?}");
            }
            let one_more = n - n % CHUNK + 1;
            let head = HeadInputs { q: &q, k: &k, v: &v, beta: &beta, g: &g, dk, dv };
            let (mut sa, mut sb) = (s_init.clone(), s_init.clone());
            let (mut oa, mut ob) = (vec![0f32; one_more * dv], vec![0f32; one_more * dv]);
            chunked(&head, one_more, &mut sa, &mut oa);
            let cut = one_more - 1;
            chunked(&head, cut, &mut sb, &mut ob[..cut * dv]);
            let last = HeadInputs {
                q: &q[cut * dk..],
                k: &k[cut * dk..],
                v: &v[cut * dv..],
                beta: &beta[cut..],
                g: &g[cut..],
                dk,
                dv,
            };
            recurrent_step(&last, &mut sb, &mut ob[cut * dv..]);
            assert!(oa.iter().zip(&ob).all(|(a, b)| a.to_bits() == b.to_bits()), "{dk}x{dv}: a last chunk of one");
            assert!(sa.iter().zip(&sb).all(|(a, b)| a.to_bits() == b.to_bits()), "{dk}x{dv}: its state");
        }
    }
}
