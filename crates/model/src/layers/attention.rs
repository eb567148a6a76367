//! Gated full attention (spec §3.3): per-head interleaved query and output gate, zero-centred q/k norms, partial
//! NeoX RoPE, causal softmax attention over the sequence's KV cache with GQA, `o ⊙ sigmoid(gate)`, output projection.

use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::cpu::matmul::Activations;
use crate::cpu::ops::{rms_norm_offset, sigmoid, Rope};
use crate::cpu::profile::{self, dense_matmul as matmul, Stage};
use crate::cpu::simd::{axpy, dot, exp};
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
        // Tasks of up to ATTEND_TOKENS tokens, each group's rows for all of them in turn: a group's cached keys and
        // values (ctx · hd · 8 bytes) stay in L2 while the task's tokens read them. A short span is cut finer, so
        // that every thread gets a part (a token's numbers do not depend on its task).
        let per_task = ATTEND_TOKENS.min(span.len.div_ceil(rayon::current_num_threads())).max(1);
        o.par_chunks_mut(per_task * nh * hd).enumerate().for_each(|(b, o_rows)| {
            let t0 = b * per_task;
            let rows = Rows { qg, first_ctx: span.pos + t0 + 1, t0 };
            attend_tokens(&shape, &rows, k_cache, v_cache, o_rows);
        });
    }
}

/// Query tokens per parallel task of the attention core.
const ATTEND_TOKENS: usize = 16;

/// The head layout the attention core works on.
struct Shape {
    nh: usize,
    nkv: usize,
    hd: usize,
    scale: f32,
}

/// A task's query tokens: the span's `[q | gate]` rows, the task's first token `t0` within them, and the context
/// length of that token (each later token sees one position more).
struct Rows<'a> {
    qg: &'a [f32],
    t0: usize,
    first_ctx: usize,
}

crate::multiversion!(fn attend_tokens(shape: &Shape, rows: &Rows<'_>, k_cache: &PagedRows, v_cache: &PagedRows, o: &mut [f32]) => attend_tokens_body);

/// Causal attention for the tokens whose outputs are `o` (`tokens × nh × hd`), all heads: per head
/// `softmax(q·Kᵀ·scale)·V ⊙ sigmoid(gate)` over the token's context.
///
/// By key-value group, then token: the query heads of a GQA group share each cached key and value row, and the
/// products run as register blocks of [`HEADS`] heads × [`KEYS`] keys (scores) and [`HEADS`] heads × 64 value
/// columns (the weighted sum), so that each row read from the cache feeds several heads from registers. Every score
/// is [`dot`]'s lane chain and reduction and every output element one FMA chain over the positions in order, for any
/// number of tokens: a token's numbers are the same alone, in a batch and in a prefill.
#[inline(always)]
fn attend_tokens_body(shape: &Shape, rows: &Rows<'_>, k_cache: &PagedRows, v_cache: &PagedRows, o: &mut [f32]) {
    let Shape { nh, nkv, hd, scale } = *shape;
    let group = nh / nkv;
    let tokens = o.len() / (nh * hd);
    let max_ctx = rows.first_ctx + tokens - 1;
    let mut scores = vec![0f32; group * max_ctx];
    for g in 0..nkv {
        for t in 0..tokens {
            let ctx = rows.first_ctx + t;
            let qg = &rows.qg[(rows.t0 + t) * nh * 2 * hd..(rows.t0 + t + 1) * nh * 2 * hd];
            let heads = g * group..(g + 1) * group;
            let q_row = |i: usize| &qg[(g * group + i) * 2 * hd..(g * group + i) * 2 * hd + hd];
            let k_row = |j: usize| &k_cache.row(j)[g * hd..(g + 1) * hd];
            let scores = &mut scores[..group * ctx];
            head_scores(&q_row, &k_row, (group, ctx), scale, scores);
            for row in scores.chunks_exact_mut(ctx) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                // The exps in a loop of their own (vectorised), then the sum in order.
                for s in row.iter_mut() {
                    *s = exp(*s - max);
                }
                let sum = row.iter().fold(0f32, |a, s| a + s);
                let inv = 1.0 / sum;
                for s in row.iter_mut() {
                    *s *= inv;
                }
            }
            let out = &mut o[(t * nh + g * group) * hd..(t * nh + (g + 1) * group) * hd];
            let v_row = |j: usize| &v_cache.row(j)[g * hd..(g + 1) * hd];
            weighted_values(scores, &v_row, (group, ctx, hd), out);
            for (i, h) in heads.enumerate() {
                let gate = &qg[h * 2 * hd + hd..(h + 1) * 2 * hd];
                for (a, gt) in out[i * hd..(i + 1) * hd].iter_mut().zip(gate) {
                    *a *= sigmoid(*gt);
                }
            }
        }
    }
}

/// Heads per register block of the attention products.
const HEADS: usize = 4;
/// Keys per register block of the scores.
const KEYS: usize = 4;

/// `scores[i · ctx + j] = dot(q_i, k_j) · scale` for `heads` query rows and `ctx` keys.
#[inline(always)]
fn head_scores<'a>(
    q: &dyn Fn(usize) -> &'a [f32],
    k: &dyn Fn(usize) -> &'a [f32],
    (heads, ctx): (usize, usize),
    scale: f32,
    scores: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::simd::level() == crate::cpu::simd::Level::Avx512 && q(0).len().is_multiple_of(16) {
        // SAFETY (all blocks): AVX-512F is present (the level was detected); the rows and keys addressed exist,
        // and every row holds a multiple of 16 values.
        let mut i = 0;
        while i < heads {
            let mut j = 0;
            if i + HEADS <= heads {
                while j + KEYS <= ctx {
                    unsafe { x86::scores::<HEADS, KEYS>(q, k, (i, j), ctx, scale, scores) };
                    j += KEYS;
                }
                while j < ctx {
                    unsafe { x86::scores::<HEADS, 1>(q, k, (i, j), ctx, scale, scores) };
                    j += 1;
                }
                i += HEADS;
            } else {
                while j + KEYS <= ctx {
                    unsafe { x86::scores::<1, KEYS>(q, k, (i, j), ctx, scale, scores) };
                    j += KEYS;
                }
                while j < ctx {
                    unsafe { x86::scores::<1, 1>(q, k, (i, j), ctx, scale, scores) };
                    j += 1;
                }
                i += 1;
            }
        }
        return;
    }
    for j in 0..ctx {
        let kr = k(j);
        for i in 0..heads {
            scores[i * ctx + j] = dot(q(i), kr) * scale;
        }
    }
}

/// `out[i] = Σ_j p[i · ctx + j] · v_j` for `heads` rows, each element one FMA chain over `j` in order from zero.
#[inline(always)]
fn weighted_values<'a>(
    p: &[f32],
    v: &dyn Fn(usize) -> &'a [f32],
    (heads, ctx, hd): (usize, usize, usize),
    out: &mut [f32],
) {
    out.fill(0.0);
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::simd::level() == crate::cpu::simd::Level::Avx512 && hd.is_multiple_of(16) {
        for i in 0..heads {
            let wide = i + HEADS <= heads && i % HEADS == 0;
            if !wide && i / HEADS * HEADS + HEADS <= heads {
                continue;
            }
            let mut c = 0;
            // SAFETY (all blocks): AVX-512F is present (the level was detected); the rows, columns c..c+16·C ≤ hd
            // and positions < ctx addressed exist.
            while c + 64 <= hd {
                unsafe {
                    if wide {
                        x86::values::<HEADS, 4>(p, v, (i, c), (ctx, hd), out);
                    } else {
                        x86::values::<1, 4>(p, v, (i, c), (ctx, hd), out);
                    }
                }
                c += 64;
            }
            while c < hd {
                unsafe {
                    if wide {
                        x86::values::<HEADS, 1>(p, v, (i, c), (ctx, hd), out);
                    } else {
                        x86::values::<1, 1>(p, v, (i, c), (ctx, hd), out);
                    }
                }
                c += 16;
            }
        }
        return;
    }
    for j in 0..ctx {
        let vr = v(j);
        for i in 0..heads {
            axpy(&mut out[i * hd..(i + 1) * hd], p[i * ctx + j], vr);
        }
    }
}

#[cfg(target_arch = "x86_64")]
// Register blocks index their accumulators by row and column, as the math does.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    /// [`crate::cpu::simd::dot`]'s reduction of its 16 lane sums: halves, quarters, then `(0+2)+(1+3)`, plus the
    /// empty remainder's zero.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn reduce(v: __m512) -> f32 {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
        let y = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
        let x = _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1));
        let t = _mm_add_ps(x, _mm_movehl_ps(x, x));
        let r = _mm_add_ss(t, _mm_shuffle_ps(t, t, 1));
        _mm_cvtss_f32(r) + 0.0
    }

    /// Scores of rows `i..i+H` against keys `j..j+K`.
    ///
    /// # Safety
    /// AVX-512F; the rows and keys exist, hold the same multiple of 16 values, and `scores` holds their entries.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores<'a, const H: usize, const K: usize>(
        q: &dyn Fn(usize) -> &'a [f32],
        k: &dyn Fn(usize) -> &'a [f32],
        (i, j): (usize, usize),
        ctx: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let qs: [*const f32; H] = std::array::from_fn(|h| q(i + h).as_ptr());
        let ks: [*const f32; K] = std::array::from_fn(|c| k(j + c).as_ptr());
        let hd = q(i).len();
        let mut acc = [[_mm512_setzero_ps(); K]; H];
        for c in (0..hd).step_by(16) {
            // SAFETY: c + 16 ≤ hd, the rows' length.
            let kv: [__m512; K] = std::array::from_fn(|x| unsafe { _mm512_loadu_ps(ks[x].add(c)) });
            for h in 0..H {
                // SAFETY: as above.
                let qv = unsafe { _mm512_loadu_ps(qs[h].add(c)) };
                for x in 0..K {
                    acc[h][x] = _mm512_fmadd_ps(qv, kv[x], acc[h][x]);
                }
            }
        }
        for h in 0..H {
            for x in 0..K {
                scores[(i + h) * ctx + j + x] = reduce(acc[h][x]) * scale;
            }
        }
    }

    /// Rows `i..i+H`, value columns `c..c+16·C` of the weighted sum.
    ///
    /// # Safety
    /// AVX-512F; `c + 16·C ≤ hd`, every value row holds `hd` values, `p` holds the rows' `ctx` weights.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn values<'a, const H: usize, const C: usize>(
        p: &[f32],
        v: &dyn Fn(usize) -> &'a [f32],
        (i, c): (usize, usize),
        (ctx, hd): (usize, usize),
        out: &mut [f32],
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; H];
        for j in 0..ctx {
            let vr = v(j).as_ptr();
            // SAFETY: c + 16·C ≤ hd, the row's length.
            let vv: [__m512; C] = std::array::from_fn(|x| unsafe { _mm512_loadu_ps(vr.add(c + 16 * x)) });
            for h in 0..H {
                let w = _mm512_set1_ps(p[(i + h) * ctx + j]);
                for x in 0..C {
                    acc[h][x] = _mm512_fmadd_ps(w, vv[x], acc[h][x]);
                }
            }
        }
        for h in 0..H {
            for x in 0..C {
                // SAFETY: (i + h) · hd + c + 16x + 16 ≤ heads · hd, inside `out`.
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add((i + h) * hd + c + 16 * x), acc[h][x]) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The register blocks give the same bits as `dot` and the `axpy` chain, at every head count, context length and
    /// head width (multiples of 16 and not).
    #[test]
    fn blocks_equal_dot_and_axpy() {
        let mut seed = 4242u32;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as f32 / u32::MAX as f32 - 0.5
        };
        for hd in [24, 32, 80, 256] {
            for heads in [1, 2, 3, 4, 5, 8, 9] {
                for ctx in [1, 3, 4, 7, 37] {
                    let q: Vec<f32> = (0..heads * hd).map(|_| rnd()).collect();
                    let k: Vec<f32> = (0..ctx * hd).map(|_| rnd()).collect();
                    let v: Vec<f32> = (0..ctx * hd).map(|_| rnd()).collect();
                    let q_row = |i: usize| &q[i * hd..(i + 1) * hd];
                    let k_row = |j: usize| &k[j * hd..(j + 1) * hd];
                    let v_row = |j: usize| &v[j * hd..(j + 1) * hd];
                    let mut got = vec![0f32; heads * ctx];
                    head_scores(&q_row, &k_row, (heads, ctx), 0.125, &mut got);
                    for i in 0..heads {
                        for j in 0..ctx {
                            let want = dot(q_row(i), k_row(j)) * 0.125;
                            assert_eq!(got[i * ctx + j].to_bits(), want.to_bits(), "scores {hd} {heads} {ctx} {i} {j}");
                        }
                    }
                    let p: Vec<f32> = (0..heads * ctx).map(|_| rnd()).collect();
                    let mut out = vec![1f32; heads * hd];
                    weighted_values(&p, &v_row, (heads, ctx, hd), &mut out);
                    let mut want = vec![0f32; heads * hd];
                    for j in 0..ctx {
                        for i in 0..heads {
                            axpy(&mut want[i * hd..(i + 1) * hd], p[i * ctx + j], v_row(j));
                        }
                    }
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&out), bits(&want), "values {hd} {heads} {ctx}");
                }
            }
        }
    }
}
