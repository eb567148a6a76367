//! Gated full attention (spec §3.3): per-head interleaved query and output gate, zero-centred q/k norms, partial
//! NeoX RoPE, causal softmax attention over the sequence's KV cache with GQA, `o ⊙ sigmoid(gate)`, output projection.

use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::cpu::matmul::Activations;
use crate::cpu::ops::{rms_norm_offset, sigmoid, Rope};
use crate::cpu::profile::{self, dense_matmul as matmul, Stage};
use crate::cpu::simd::{axpy, dot};
use crate::error::Result;
use crate::layers::{split_rows, Span};
use crate::state::{LayerState, PagedRows};
use crate::weights::{Checkpoint, Mat};

#[derive(Debug)]
pub(crate) struct Attention {
    q_proj: Mat,
    k_proj: Mat,
    v_proj: Mat,
    o_proj: Mat,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
}

impl Attention {
    pub(crate) fn load(ckpt: &Checkpoint, cfg: &ModelConfig, layer: usize) -> Result<Self> {
        let p = format!("layers.{layer}.self_attn.");
        let (h, nh, nkv, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        Ok(Attention {
            q_proj: ckpt.matrix(&format!("{p}q_proj.weight"), &[2 * nh * hd, h])?,
            k_proj: ckpt.matrix(&format!("{p}k_proj.weight"), &[nkv * hd, h])?,
            v_proj: ckpt.matrix(&format!("{p}v_proj.weight"), &[nkv * hd, h])?,
            o_proj: ckpt.matrix(&format!("{p}o_proj.weight"), &[h, nh * hd])?,
            q_norm: ckpt.vector(&format!("{p}q_norm.weight"), &[hd])?,
            k_norm: ckpt.vector(&format!("{p}k_norm.weight"), &[hd])?,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    pub(crate) fn weight_bytes(&self) -> usize {
        self.q_proj.bytes() + self.k_proj.bytes() + self.v_proj.bytes() + self.o_proj.bytes()
    }

    /// Runs the layer on the normed hidden states `x` (`ntok × H`, the segments of `spans` back to back) and returns
    /// the mixer output. Each span's state gets its new keys and values appended.
    pub(crate) fn forward(&self, x: &[f32], spans: &[Span], states: &mut [&mut LayerState], rope: &Rope) -> Vec<f32> {
        let ntok = spans.iter().map(|s| s.len).sum::<usize>();
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let mut qg = vec![0f32; ntok * 2 * nh * hd];
        let mut k = vec![0f32; ntok * nkv * hd];
        let mut v = vec![0f32; ntok * nkv * hd];
        let xa = Activations::new(x, ntok, self.q_proj.cols);
        profile::dense(&xa, &self.q_proj, &mut qg);
        profile::dense(&xa, &self.k_proj, &mut k);
        profile::dense(&xa, &self.v_proj, &mut v);

        let mut o = vec![0f32; ntok * nh * hd];
        // Per-span slices, so that spans run in parallel, each owning its rows and its state.
        let qg_parts = split_rows(&mut qg, spans, 2 * nh * hd);
        let o_parts = split_rows(&mut o, spans, nh * hd);
        // Scores and weighted values: 4·hd FLOPs per (query head, context position).
        let ctx: usize = spans.iter().map(|s| s.len * s.pos + s.len * (s.len + 1) / 2).sum();
        profile::time(Stage::AttentionCore, (4 * nh * hd * ctx) as u64, 0, || {
            spans.par_iter().zip(states.par_iter_mut()).zip(qg_parts.into_par_iter().zip(o_parts)).for_each(
                |((span, state), (qg_span, o_span))| {
                    let LayerState::Attention { k: k_cache, v: v_cache } = &mut **state else {
                        unreachable!("layer kinds of state and model agree: both come from layer_types");
                    };
                    let rows = span.start * nkv * hd..(span.start + span.len) * nkv * hd;
                    let new_kv = (&k[rows.clone()], &v[rows]);
                    self.attend(qg_span, new_kv, span, k_cache, v_cache, rope, o_span);
                },
            )
        });

        let mut out = vec![0f32; ntok * self.o_proj.rows];
        matmul(&o, ntok, &self.o_proj, &mut out);
        out
    }

    /// The per-sequence part: norms, RoPE, cache append, causal attention and the output gate for one span.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        qg: &mut [f32],
        (k_new, v_new): (&[f32], &[f32]),
        span: &Span,
        k_cache: &mut PagedRows,
        v_cache: &mut PagedRows,
        rope: &Rope,
        o: &mut [f32],
    ) {
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let kvw = nkv * hd;
        debug_assert_eq!(k_cache.len(), span.pos, "cache length matches the sequence position");
        for t in 0..span.len {
            let pos = span.pos + t;
            for h in 0..nh {
                let q = &mut qg[(t * nh + h) * 2 * hd..(t * nh + h) * 2 * hd + hd];
                rms_norm_offset(q, &self.q_norm, self.eps);
                rope.apply(q, pos);
            }
            v_cache.push(&v_new[t * kvw..(t + 1) * kvw]);
            let k_row = k_cache.push(&k_new[t * kvw..(t + 1) * kvw]);
            for kh in k_row.chunks_exact_mut(hd) {
                rms_norm_offset(kh, &self.k_norm, self.eps);
                rope.apply(kh, pos);
            }
        }
        let scale = 1.0 / (hd as f32).sqrt();
        let k_cache = &*k_cache;
        let v_cache = &*v_cache;
        let qg = &*qg;
        let shape = Shape { nh, nkv, hd, scale };
        o.par_chunks_mut(nh * hd).enumerate().for_each(|(t, o_row)| {
            attend_token(
                &shape,
                &qg[t * nh * 2 * hd..(t + 1) * nh * 2 * hd],
                k_cache,
                v_cache,
                span.pos + t + 1,
                o_row,
            );
        });
    }
}

/// The head layout [`attend_token`] works on.
struct Shape {
    nh: usize,
    nkv: usize,
    hd: usize,
    scale: f32,
}

crate::multiversion!(fn attend_token(shape: &Shape, qg: &[f32], k_cache: &PagedRows, v_cache: &PagedRows, ctx: usize, o: &mut [f32]) => attend_token_body);

/// One query token against the first `ctx` cached positions, all heads: `qg` holds `[q | gate]` per head, `o` gets
/// `softmax(q·Kᵀ·scale)·V ⊙ sigmoid(gate)` per head.
///
/// Blocked by key-value head: the query heads of a GQA group share each cached key and value row, so each row is read
/// once per group (not once per query head) and feeds every head of the group while it is in registers and L1.
#[inline(always)]
fn attend_token_body(shape: &Shape, qg: &[f32], k_cache: &PagedRows, v_cache: &PagedRows, ctx: usize, o: &mut [f32]) {
    let Shape { nh, nkv, hd, scale } = *shape;
    let group = nh / nkv;
    let mut scores = vec![0f32; group * ctx];
    for g in 0..nkv {
        let heads = g * group..(g + 1) * group;
        for j in 0..ctx {
            let kr = &k_cache.row(j)[g * hd..(g + 1) * hd];
            for (i, h) in heads.clone().enumerate() {
                let q = &qg[h * 2 * hd..h * 2 * hd + hd];
                scores[i * ctx + j] = dot(q, kr) * scale;
            }
        }
        for i in 0..group {
            let row = &mut scores[i * ctx..(i + 1) * ctx];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for s in row.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            for s in row.iter_mut() {
                *s *= inv;
            }
        }
        let out = &mut o[g * group * hd..(g + 1) * group * hd];
        out.fill(0.0);
        for j in 0..ctx {
            let vr = &v_cache.row(j)[g * hd..(g + 1) * hd];
            for i in 0..group {
                axpy(&mut out[i * hd..(i + 1) * hd], scores[i * ctx + j], vr);
            }
        }
        for (i, h) in heads.enumerate() {
            let gate = &qg[h * 2 * hd + hd..(h + 1) * 2 * hd];
            for (a, gt) in out[i * hd..(i + 1) * hd].iter_mut().zip(gate) {
                *a *= sigmoid(*gt);
            }
        }
    }
}
