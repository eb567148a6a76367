//! Gated full attention (spec §3.3): per-head interleaved query and output gate, zero-centred q/k norms, partial
//! NeoX RoPE, causal softmax attention over the sequence's KV cache with GQA, `o ⊙ sigmoid(gate)`, output projection.

use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::cpu::ops::{dot, rms_norm_offset, sigmoid, Rope};
use crate::cpu::profile::{self, dense_matmul as matmul, Stage};
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
        matmul(x, ntok, &self.q_proj, &mut qg);
        matmul(x, ntok, &self.k_proj, &mut k);
        matmul(x, ntok, &self.v_proj, &mut v);

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
        let group = nh / nkv;
        let k_cache = &*k_cache;
        let v_cache = &*v_cache;
        let qg = &*qg;
        o.par_chunks_mut(nh * hd).enumerate().for_each(|(t, o_row)| {
            let ctx = span.pos + t + 1;
            let mut scores = vec![0f32; ctx];
            for h in 0..nh {
                let base = (t * nh + h) * 2 * hd;
                let q = &qg[base..base + hd];
                let gate = &qg[base + hd..base + 2 * hd];
                let g = h / group;
                let mut max = f32::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate() {
                    let kr = &k_cache.row(j)[g * hd..(g + 1) * hd];
                    *s = dot(q, kr) * scale;
                    max = max.max(*s);
                }
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let inv = 1.0 / sum;
                let out = &mut o_row[h * hd..(h + 1) * hd];
                out.fill(0.0);
                for (j, s) in scores.iter().enumerate() {
                    let p = s * inv;
                    let vr = &v_cache.row(j)[g * hd..(g + 1) * hd];
                    for (a, b) in out.iter_mut().zip(vr) {
                        *a += p * b;
                    }
                }
                for (a, gt) in out.iter_mut().zip(gate) {
                    *a *= sigmoid(*gt);
                }
            }
        });
    }
}
