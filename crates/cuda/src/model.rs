//! The router side of the model on one GPU: [`CudaModel`], a [`Decoder`] with its weights and every sequence's state
//! (KV pages, Gated DeltaNet states) in device memory. The layer structure is the CPU model's (spec §3.2): per layer
//! the input norm, the mixer with its residual, the post-attention norm and the MoE block with its residual; then the
//! final norm and the LM head. The routed experts go through the same [`Experts`] seam (in this process, on this
//! GPU, or on expert nodes): their inputs come back to the host and their sums go up again, while the shared expert
//! runs on the GPU. Projections are cuBLAS GEMMs with bf16 operands (the activations rounded to bf16) and fp32
//! accumulation; norms, RoPE, the conv, the delta rule (f64) and attention run in fp32 kernels.
//!
//! Qwen3.5-MoE checkpoints only: Qwen3-Next's grouped projections and dense layers are refused at load.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;
use moe_model::{
    new_decoder_id, Checkpoint, Decoder, DeviceState, Experts, Family, LayerKind, ModelConfig, ModelError, Routing,
    Segment, SequenceState,
};

use crate::experts::gemm_bf16_f32;
use crate::gpu::{driver_error as driver, Gpu};
use crate::ops::{self, blocks, run, GdnDims, KvPool};
use crate::plan::linear;
use crate::{CudaError, Result};

const THREADS: u32 = 256;

struct AttentionWeights {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
    q_norm: CudaSlice<f32>,
    k_norm: CudaSlice<f32>,
    /// Index of this layer's KV pool.
    pool: usize,
}

struct DeltaNetWeights {
    qkv: CudaSlice<bf16>,
    z: CudaSlice<bf16>,
    b: CudaSlice<bf16>,
    a: CudaSlice<bf16>,
    out: CudaSlice<bf16>,
    /// `[K][C]`.
    conv: CudaSlice<f32>,
    neg_a: CudaSlice<f32>,
    dt_bias: CudaSlice<f32>,
    norm: CudaSlice<f32>,
    /// Index of this layer's state in [`GpuSequence::linear`].
    slot: usize,
}

enum Mixer {
    Attention(AttentionWeights),
    DeltaNet(DeltaNetWeights),
}

struct MoeWeights {
    router: CudaSlice<bf16>,
    /// The shared expert's gate rows, then its up rows: `[2·Is, H]`.
    shared_gate_up: CudaSlice<bf16>,
    shared_down: CudaSlice<bf16>,
    shared_gate: CudaSlice<bf16>,
}

struct Layer {
    input_norm: CudaSlice<f32>,
    post_norm: CudaSlice<f32>,
    mixer: Mixer,
    moe: MoeWeights,
}

/// Free pages of the KV pools (one pool per attention layer, all with the same pages).
type FreePages = Arc<Mutex<Vec<i32>>>;

/// One sequence's state on the GPU.
#[derive(Debug)]
pub struct GpuSequence {
    /// Its KV pages, in order (the same page ids in every attention layer's pool).
    pages: Vec<i32>,
    free: FreePages,
    /// Per Gated DeltaNet layer: conv state `[K−1, C]` and recurrent state `[Hv, dk, dv]`, allocated on first use.
    linear: Vec<Option<(CudaSlice<f32>, CudaSlice<f32>)>>,
    /// Bytes of one page over all attention layers, and of the DeltaNet states.
    page_bytes: usize,
    linear_bytes: usize,
}

impl DeviceState for GpuSequence {
    fn bytes(&self) -> usize {
        self.pages.len() * self.page_bytes + self.linear_bytes
    }
}

impl Drop for GpuSequence {
    fn drop(&mut self) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.append(&mut self.pages);
    }
}

/// The router-side model on a GPU.
pub struct CudaModel {
    gpu: Gpu,
    config: ModelConfig,
    id: u64,
    embed: CudaSlice<bf16>,
    /// `None`: tied to the embeddings.
    lm_head: Option<CudaSlice<bf16>>,
    final_norm: CudaSlice<f32>,
    layers: Vec<Layer>,
    pools: Mutex<Vec<KvPool>>,
    free: FreePages,
    page_tokens: usize,
}

impl std::fmt::Debug for CudaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaModel").field("device", &self.gpu.info).field("layers", &self.layers.len()).finish()
    }
}

fn up_bf16(gpu: &Gpu, ckpt: &Checkpoint, name: &str, shape: &[usize]) -> Result<CudaSlice<bf16>> {
    let m = ckpt.matrix_view(name, shape)?;
    gpu.stream.clone_htod(m.data()).map_err(driver)
}

fn up_f32(gpu: &Gpu, v: &[f32]) -> Result<CudaSlice<f32>> {
    gpu.stream.clone_htod(v).map_err(driver)
}

fn vector(gpu: &Gpu, ckpt: &Checkpoint, name: &str, len: usize) -> Result<CudaSlice<f32>> {
    up_f32(gpu, &ckpt.vector(name, &[len])?)
}

impl CudaModel {
    /// Uploads the router-side weights of the model in `ckpt` to device `ordinal`, with KV pools of
    /// `kv_cache_bytes` in all.
    pub fn load(ckpt: &Checkpoint, config: ModelConfig, ordinal: usize, kv_cache_bytes: usize) -> Result<Self> {
        if config.family != Family::Qwen35Moe {
            return Err(CudaError::InvalidInput(
                "only Qwen3.5-MoE checkpoints run on CUDA so far (Qwen3-Next: use --device cpu)".into(),
            ));
        }
        let gpu = Gpu::open(ordinal)?;
        let cfg = &config;
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = up_bf16(&gpu, ckpt, "embed_tokens.weight", &[v, h])?;
        let lm_head = if cfg.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            None
        } else {
            Some(up_bf16(&gpu, ckpt, "lm_head.weight", &[v, h])?)
        };
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let (hv, dv) = (cfg.linear_num_value_heads, cfg.linear_value_head_dim);
        let (c, kk) = (cfg.linear_conv_channels(), cfg.linear_conv_kernel_dim);
        let (ne, is) = (cfg.num_experts, cfg.shared_expert_intermediate_size);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let (mut pools, mut slots) = (0, 0);
        for i in 0..cfg.num_hidden_layers {
            if !cfg.is_moe_layer(i) {
                return Err(CudaError::InvalidInput(format!("layer {i} has a dense MLP: not supported on CUDA yet")));
            }
            let mixer = match cfg.layer_types[i] {
                LayerKind::Full => {
                    let p = format!("layers.{i}.self_attn.");
                    pools += 1;
                    Mixer::Attention(AttentionWeights {
                        q: up_bf16(&gpu, ckpt, &format!("{p}q_proj.weight"), &[2 * nh * hd, h])?,
                        k: up_bf16(&gpu, ckpt, &format!("{p}k_proj.weight"), &[nkv * hd, h])?,
                        v: up_bf16(&gpu, ckpt, &format!("{p}v_proj.weight"), &[nkv * hd, h])?,
                        o: up_bf16(&gpu, ckpt, &format!("{p}o_proj.weight"), &[h, nh * hd])?,
                        q_norm: vector(&gpu, ckpt, &format!("{p}q_norm.weight"), hd)?,
                        k_norm: vector(&gpu, ckpt, &format!("{p}k_norm.weight"), hd)?,
                        pool: pools - 1,
                    })
                }
                LayerKind::Linear => {
                    let p = format!("layers.{i}.linear_attn.");
                    let conv_ck = ckpt.vector(&format!("{p}conv1d.weight"), &[c, 1, kk])?;
                    let conv_ck = &conv_ck;
                    let conv: Vec<f32> = (0..kk).flat_map(|j| (0..c).map(move |ch| conv_ck[ch * kk + j])).collect();
                    let neg_a: Vec<f32> = ckpt.vector(&format!("{p}A_log"), &[hv])?.iter().map(|a| -a.exp()).collect();
                    slots += 1;
                    Mixer::DeltaNet(DeltaNetWeights {
                        qkv: up_bf16(&gpu, ckpt, &format!("{p}in_proj_qkv.weight"), &[c, h])?,
                        z: up_bf16(&gpu, ckpt, &format!("{p}in_proj_z.weight"), &[hv * dv, h])?,
                        b: up_bf16(&gpu, ckpt, &format!("{p}in_proj_b.weight"), &[hv, h])?,
                        a: up_bf16(&gpu, ckpt, &format!("{p}in_proj_a.weight"), &[hv, h])?,
                        out: up_bf16(&gpu, ckpt, &format!("{p}out_proj.weight"), &[h, hv * dv])?,
                        conv: up_f32(&gpu, &conv)?,
                        neg_a: up_f32(&gpu, &neg_a)?,
                        dt_bias: vector(&gpu, ckpt, &format!("{p}dt_bias"), hv)?,
                        norm: vector(&gpu, ckpt, &format!("{p}norm.weight"), dv)?,
                        slot: slots - 1,
                    })
                }
            };
            let p = format!("layers.{i}.mlp.");
            let gate = ckpt.matrix_view(&format!("{p}shared_expert.gate_proj.weight"), &[is, h])?;
            let up = ckpt.matrix_view(&format!("{p}shared_expert.up_proj.weight"), &[is, h])?;
            let gate_up: Vec<bf16> = gate.data().iter().chain(up.data()).copied().collect();
            layers.push(Layer {
                input_norm: vector(&gpu, ckpt, &format!("layers.{i}.input_layernorm.weight"), h)?,
                post_norm: vector(&gpu, ckpt, &format!("layers.{i}.post_attention_layernorm.weight"), h)?,
                mixer,
                moe: MoeWeights {
                    router: up_bf16(&gpu, ckpt, &format!("{p}gate.weight"), &[ne, h])?,
                    shared_gate_up: gpu.stream.clone_htod(&gate_up).map_err(driver)?,
                    shared_down: up_bf16(&gpu, ckpt, &format!("{p}shared_expert.down_proj.weight"), &[h, is])?,
                    shared_gate: up_bf16(&gpu, ckpt, &format!("{p}shared_expert_gate.weight"), &[1, h])?,
                },
            });
        }
        let page_tokens = moe_model::state::KV_PAGE_TOKENS;
        let width = nkv * hd;
        let page_bytes = (2 * page_tokens * width * 4 * pools).max(1);
        let pages = (kv_cache_bytes / page_bytes).max(1);
        let kv = (0..pools).map(|_| KvPool::new(&gpu, pages, page_tokens, width)).collect::<Result<Vec<_>>>()?;
        gpu.synchronize()?;
        tracing::info!(device = %gpu.info, kv_pages = pages, page_tokens, "router layers on CUDA");
        Ok(CudaModel {
            final_norm: vector(&gpu, ckpt, "norm.weight", h)?,
            gpu,
            id: new_decoder_id(),
            embed,
            lm_head,
            layers,
            pools: Mutex::new(kv),
            free: Arc::new(Mutex::new((0..pages as i32).rev().collect())),
            page_tokens,
            config,
        })
    }

    /// Bytes of weights one decode step reads here: every layer's projections, the router, the shared expert and the
    /// LM head (the embedding row is negligible).
    pub fn weight_bytes(&self) -> usize {
        let mut bytes = self.lm_head.as_ref().unwrap_or(&self.embed).len() * 2;
        for l in &self.layers {
            bytes += match &l.mixer {
                Mixer::Attention(a) => a.q.len() + a.k.len() + a.v.len() + a.o.len(),
                Mixer::DeltaNet(g) => g.qkv.len() + g.z.len() + g.b.len() + g.a.len() + g.out.len(),
            } * 2;
            let m = &l.moe;
            bytes += (m.router.len() + m.shared_gate_up.len() + m.shared_down.len() + m.shared_gate.len()) * 2;
        }
        bytes
    }

    /// KV pages not held by any sequence.
    pub fn free_kv_pages(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn page_bytes(&self) -> usize {
        let pools = self.layers.iter().filter(|l| matches!(l.mixer, Mixer::Attention(_))).count();
        2 * self.page_tokens * self.config.num_key_value_heads * self.config.head_dim * 4 * pools
    }

    fn linear_bytes(&self) -> usize {
        let cfg = &self.config;
        let per = (cfg.linear_conv_kernel_dim - 1) * cfg.linear_conv_channels()
            + cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim;
        per * 4 * self.layers.iter().filter(|l| matches!(l.mixer, Mixer::DeltaNet(_))).count()
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.gpu.stream.alloc_zeros::<f32>(n).map_err(driver)
    }

    /// `x` rounded to bf16, the operand of the next GEMM.
    fn bf16(&self, x: &CudaSlice<f32>) -> Result<CudaSlice<bf16>> {
        let n = x.len();
        let mut out = self.gpu.stream.alloc_zeros::<bf16>(n).map_err(driver)?;
        let n_i = n as i64;
        let mut a = self.gpu.stream.launch_builder(self.gpu.function("to_bf16")?);
        a.arg(x).arg(&mut out).arg(&n_i);
        run(a, blocks(n.div_ceil(THREADS as usize), THREADS, 0))?;
        Ok(out)
    }

    /// `out [rows, out_f] (+)= x [rows, in_f] · wᵀ`.
    fn linear(
        &self,
        w: &CudaSlice<bf16>,
        x: &CudaSlice<bf16>,
        rows: usize,
        (out_f, in_f): (usize, usize),
        out: &mut CudaSlice<f32>,
        accumulate: bool,
    ) -> Result<()> {
        gemm_bf16_f32(&self.gpu, w, x, 0, out, 0, linear(out_f, rows, in_f), accumulate)
    }

    fn project(&self, w: &CudaSlice<bf16>, x: &CudaSlice<bf16>, rows: usize, out_f: usize) -> Result<CudaSlice<f32>> {
        let mut out = self.zeros(rows * out_f)?;
        self.linear(w, x, rows, (out_f, self.config.hidden_size), &mut out, false)?;
        Ok(out)
    }

    /// Rows `rows` of `x` (`[_, width]`), in that order.
    fn gather(&self, x: &CudaSlice<f32>, rows: &CudaSlice<u32>, width: usize) -> Result<CudaSlice<f32>> {
        let n = rows.len();
        let mut out = self.zeros(n * width)?;
        let (n_i, w_i) = (n as i32, width as i32);
        let mut l = self.gpu.stream.launch_builder(self.gpu.function("gather_rows_f32")?);
        l.arg(x).arg(rows).arg(&mut out).arg(&n_i).arg(&w_i);
        run(l, blocks(n, THREADS, 0))?;
        Ok(out)
    }

    /// `dst[rows[r]] = src[r]` for rows of `width`.
    fn scatter(
        &self,
        src: &CudaSlice<f32>,
        rows: &CudaSlice<u32>,
        dst: &mut CudaSlice<f32>,
        width: usize,
    ) -> Result<()> {
        let n = rows.len();
        let (n_i, w_i) = (n as i32, width as i32);
        let mut l = self.gpu.stream.launch_builder(self.gpu.function("scatter_rows_f32")?);
        l.arg(src).arg(rows).arg(dst).arg(&n_i).arg(&w_i);
        run(l, blocks(n, THREADS, 0))
    }

    fn attention(
        &self,
        w: &AttentionWeights,
        xn: &CudaSlice<f32>,
        spans: &[Span],
        seqs: &mut [&mut GpuSequence],
        step: &Step,
        x: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let positions = &step.positions;
        let cfg = &self.config;
        let (gpu, ntok, h) = (&self.gpu, xn.len() / cfg.hidden_size, cfg.hidden_size);
        let (nh, nkv, hd, eps) =
            (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps as f32);
        let (rot, theta) = (cfg.rotary_dim(), cfg.rope_theta as f32);
        let xb = self.bf16(xn)?;
        let mut qg = self.project(&w.q, &xb, ntok, 2 * nh * hd)?;
        let mut k = self.project(&w.k, &xb, ntok, nkv * hd)?;
        let v = self.project(&w.v, &xb, ntok, nkv * hd)?;
        ops::rms_norm_offset_in_place(gpu, &mut qg, 2 * hd, &w.q_norm, ntok * nh, eps)?;
        ops::rms_norm_offset_in_place(gpu, &mut k, hd, &w.k_norm, ntok * nkv, eps)?;
        ops::rope_partial(gpu, &mut qg, positions, nh, 2 * nh * hd, 2 * hd, rot, theta)?;
        ops::rope_partial(gpu, &mut k, positions, nkv, nkv * hd, hd, rot, theta)?;
        let mut o = self.zeros(ntok * nh * hd)?;
        {
            let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
            let pool =
                pools.get_mut(w.pool).ok_or_else(|| CudaError::InvalidInput(format!("no KV pool {}", w.pool)))?;
            if let Some(decode) = &step.decode {
                let at = decode.rows();
                ops::kv_append_multi(gpu, pool, &k, &v, &at)?;
                ops::attention_paged_multi(gpu, &qg, pool, &at, (nh, nkv, hd), &mut o)?;
            }
            for (span, seq) in spans.iter().zip(seqs.iter()).filter(|(span, _)| !step.batched(span)) {
                let table = gpu.stream.clone_htod(&seq.pages).map_err(driver)?;
                let (a, b) = (span.start * nkv * hd, (span.start + span.len) * nkv * hd);
                ops::kv_append(gpu, pool, &table, &k.slice(a..b), &v.slice(a..b), span.pos)?;
                let (qa, qb) = (span.start * 2 * nh * hd, (span.start + span.len) * 2 * nh * hd);
                let (oa, ob) = (span.start * nh * hd, (span.start + span.len) * nh * hd);
                ops::attention_paged(
                    gpu,
                    &qg.slice(qa..qb),
                    pool,
                    &table,
                    span.pos,
                    (nh, nkv, hd),
                    &mut o.slice_mut(oa..ob),
                )?;
            }
        }
        let ob = self.bf16(&o)?;
        self.linear(&w.o, &ob, ntok, (h, nh * hd), x, true)
    }

    fn delta_net(
        &self,
        w: &DeltaNetWeights,
        xn: &CudaSlice<f32>,
        spans: &[Span],
        seqs: &mut [&mut GpuSequence],
        step: &Step,
        x: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let cfg = &self.config;
        let (gpu, h) = (&self.gpu, cfg.hidden_size);
        let ntok = xn.len() / h;
        let d = GdnDims {
            hk: cfg.linear_num_key_heads,
            hv: cfg.linear_num_value_heads,
            dk: cfg.linear_key_head_dim,
            dv: cfg.linear_value_head_dim,
        };
        let (c, kk, eps) = (cfg.linear_conv_channels(), cfg.linear_conv_kernel_dim, cfg.rms_norm_eps as f32);
        let xb = self.bf16(xn)?;
        let qkv = self.project(&w.qkv, &xb, ntok, c)?;
        let z = self.project(&w.z, &xb, ntok, d.hv * d.dv)?;
        let b = self.project(&w.b, &xb, ntok, d.hv)?;
        let a = self.project(&w.a, &xb, ntok, d.hv)?;
        let mut y = self.zeros(ntok * d.hv * d.dv)?;
        for seq in seqs.iter_mut() {
            let slot = seq
                .linear
                .get_mut(w.slot)
                .ok_or_else(|| CudaError::InvalidInput("sequence state without this layer".into()))?;
            if slot.is_none() {
                *slot = Some((self.zeros((kk - 1) * c)?, self.zeros(d.hv * d.dk * d.dv)?));
            }
        }
        if let Some(decode) = &step.decode {
            // One launch per kernel for every single-token sequence, their states found through pointer tables.
            let (mut convs, mut recs) = (Vec::new(), Vec::new());
            for (span, seq) in spans.iter().zip(seqs.iter_mut()) {
                if let (true, Some(Some((conv, rec)))) = (step.batched(span), seq.linear.get_mut(w.slot)) {
                    convs.push(conv);
                    recs.push(rec);
                }
            }
            let conv_table = ops::pointer_table(gpu, &mut convs)?;
            let rec_table = ops::pointer_table(gpu, &mut recs)?;
            let n = decode.len();
            let u = ops::conv_step_multi(gpu, &conv_table, &qkv, &decode.rows, &w.conv, c, kk)?;
            let b_rows = self.gather(&b, &decode.rows, d.hv)?;
            let a_rows = self.gather(&a, &decode.rows, d.hv)?;
            let z_rows = self.gather(&z, &decode.rows, d.hv * d.dv)?;
            let heads = ops::gdn_prepare(gpu, &u, &b_rows.as_view(), &a_rows.as_view(), &w.neg_a, &w.dt_bias, d)?;
            let o = ops::gated_delta_step_multi(gpu, &heads, &rec_table, d)?;
            let mut y_rows = self.zeros(n * d.hv * d.dv)?;
            ops::gdn_output_norm(gpu, &o, &z_rows.as_view(), &w.norm, d.hv, eps, &mut y_rows.as_view_mut())?;
            self.scatter(&y_rows, &decode.rows, &mut y, d.hv * d.dv)?;
        }
        for (span, seq) in spans.iter().zip(seqs.iter_mut()).filter(|(span, _)| !step.batched(span)) {
            let slot = seq
                .linear
                .get_mut(w.slot)
                .ok_or_else(|| CudaError::InvalidInput("sequence state without this layer".into()))?;
            let Some((conv, rec)) = slot.as_mut() else { continue };
            let (s0, s1) = (span.start, span.start + span.len);
            let (u, next) = ops::causal_conv_silu(gpu, conv, &qkv.slice(s0 * c..s1 * c), &w.conv, c, kk)?;
            *conv = next;
            let heads = ops::gdn_prepare(
                gpu,
                &u,
                &b.slice(s0 * d.hv..s1 * d.hv),
                &a.slice(s0 * d.hv..s1 * d.hv),
                &w.neg_a,
                &w.dt_bias,
                d,
            )?;
            let o = if span.len == 1 {
                ops::gated_delta_recurrent(gpu, &heads, rec, d)?
            } else {
                ops::gated_delta_chunked(gpu, &heads, rec, d)?
            };
            let (ya, yb) = (s0 * d.hv * d.dv, s1 * d.hv * d.dv);
            ops::gdn_output_norm(gpu, &o, &z.slice(ya..yb), &w.norm, d.hv, eps, &mut y.slice_mut(ya..yb))?;
        }
        let yb = self.bf16(&y)?;
        self.linear(&w.out, &yb, ntok, (h, d.hv * d.dv), x, true)
    }

    /// Routing on the GPU, the routed experts through `experts` (their inputs and sums via the host), the shared
    /// expert on the GPU meanwhile; the sum joins the residual stream `x`.
    fn moe(
        &self,
        layer: usize,
        w: &MoeWeights,
        xn: &CudaSlice<f32>,
        experts: &dyn Experts,
        x: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let cfg = &self.config;
        let (gpu, h, k, is) =
            (&self.gpu, cfg.hidden_size, cfg.num_experts_per_tok, cfg.shared_expert_intermediate_size);
        let ntok = xn.len() / h;
        let xb = self.bf16(xn)?;
        let logits = self.project(&w.router, &xb, ntok, cfg.num_experts)?;
        let (ids, weights) = ops::softmax_topk(gpu, &logits, cfg.num_experts, k, cfg.norm_topk_prob)?;
        let routing = Routing {
            offsets: (0..=ntok).map(|t| (t * k) as u32).collect(),
            experts: gpu.stream.clone_dtoh(&ids).map_err(driver)?,
            weights: gpu.stream.clone_dtoh(&weights).map_err(driver)?,
        };
        let hidden = gpu.stream.clone_dtoh(xn).map_err(driver)?;
        gpu.synchronize()?;
        let pending = experts.dispatch(layer, &hidden, &routing)?;
        let gu = self.project(&w.shared_gate_up, &xb, ntok, 2 * is)?;
        let mut act = gpu.stream.alloc_zeros::<bf16>(ntok * is).map_err(driver)?;
        let (rows_i, is_i) = (ntok as i32, is as i32);
        let mut l = gpu.stream.launch_builder(gpu.function("swiglu_bf16")?);
        l.arg(&gu).arg(&mut act).arg(&rows_i).arg(&is_i);
        run(l, blocks(ntok, THREADS, 0))?;
        let mut shared = self.zeros(ntok * h)?;
        self.linear(&w.shared_down, &act, ntok, (h, is), &mut shared, false)?;
        let gate = self.project(&w.shared_gate, &xb, ntok, 1)?;
        let mut routed = vec![0f32; ntok * h];
        pending.wait(&mut routed)?;
        let routed = gpu.stream.clone_htod(&routed).map_err(driver)?;
        let (n_i, h_i) = (ntok as i32, h as i32);
        let mut l = gpu.stream.launch_builder(gpu.function("moe_residual")?);
        l.arg(x).arg(&routed).arg(&shared).arg(&gate).arg(&n_i).arg(&h_i);
        run(l, blocks(ntok, THREADS, 0))
    }

    fn forward(&self, batch: &mut [Segment<'_>], experts: &dyn Experts) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.config;
        let (h, vocab, eps) = (cfg.hidden_size, cfg.vocab_size, cfg.rms_norm_eps as f32);
        let gpu = &self.gpu;
        let mut spans = Vec::with_capacity(batch.len());
        let mut ids: Vec<u32> = Vec::new();
        let mut positions: Vec<i32> = Vec::new();
        for seg in batch.iter() {
            if seg.tokens.is_empty() {
                return Err(CudaError::InvalidInput("a batch segment has no tokens".into()));
            }
            if let Some(&bad) = seg.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(CudaError::InvalidInput(format!("token id {bad} is out of range (vocab_size {vocab})")));
            }
            if seg.state.decoder_id() != self.id {
                return Err(CudaError::InvalidInput("the sequence state was made by another model".into()));
            }
            let pos = seg.state.position();
            spans.push(Span { start: ids.len(), len: seg.tokens.len(), pos });
            ids.extend_from_slice(seg.tokens);
            positions.extend((0..seg.tokens.len()).map(|i| (pos + i) as i32));
        }
        let ntok = ids.len();
        let mut seqs: Vec<&mut GpuSequence> = Vec::with_capacity(batch.len());
        for (seg, span) in batch.iter_mut().zip(&spans) {
            let seq = seg
                .state
                .device_mut::<GpuSequence>()
                .ok_or_else(|| CudaError::InvalidInput("the sequence state is not on the GPU".into()))?;
            let need = (span.pos + span.len).div_ceil(self.page_tokens);
            if seq.pages.len() < need {
                let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
                if free.len() < need - seq.pages.len() {
                    return Err(CudaError::InvalidInput(format!(
                        "the KV cache is full ({} pages of {} tokens free)",
                        free.len(),
                        self.page_tokens
                    )));
                }
                let at = free.len() - (need - seq.pages.len());
                seq.pages.extend(free.drain(at..));
            }
            seqs.push(seq);
        }

        let ids_dev = gpu.stream.clone_htod(&ids).map_err(driver)?;
        let step = Step::new(gpu, &spans, &seqs, &positions)?;
        let mut x = self.zeros(ntok * h)?;
        let (n_i, h_i) = (ntok as i32, h as i32);
        let mut l = gpu.stream.launch_builder(gpu.function("embed_rows")?);
        l.arg(&self.embed).arg(&ids_dev).arg(&mut x).arg(&n_i).arg(&h_i);
        run(l, blocks(ntok, THREADS, 0))?;
        let mut xn = self.zeros(ntok * h)?;
        for (i, layer) in self.layers.iter().enumerate() {
            ops::rms_norm_offset(gpu, &x, h, &layer.input_norm, &mut xn, h, ntok, eps)?;
            match &layer.mixer {
                Mixer::Attention(w) => self.attention(w, &xn, &spans, &mut seqs, &step, &mut x)?,
                Mixer::DeltaNet(w) => self.delta_net(w, &xn, &spans, &mut seqs, &step, &mut x)?,
            }
            ops::rms_norm_offset(gpu, &x, h, &layer.post_norm, &mut xn, h, ntok, eps)?;
            self.moe(i, &layer.moe, &xn, experts, &mut x)?;
        }
        drop(seqs);

        // The rows whose logits were asked for, then one LM-head GEMM over them.
        let mut rows: Vec<u32> = Vec::new();
        for (seg, span) in batch.iter().zip(&spans) {
            rows.extend(seg.logits.rows(span.start, span.len).map(|r| r as u32));
        }
        let mut logits = Vec::new();
        if !rows.is_empty() {
            let nr = rows.len();
            let rows_dev = gpu.stream.clone_htod(&rows).map_err(driver)?;
            let mut hs = self.zeros(nr * h)?;
            let nr_i = nr as i32;
            let mut l = gpu.stream.launch_builder(gpu.function("gather_rows_f32")?);
            l.arg(&x).arg(&rows_dev).arg(&mut hs).arg(&nr_i).arg(&h_i);
            run(l, blocks(nr, THREADS, 0))?;
            let mut hn = self.zeros(nr * h)?;
            ops::rms_norm_offset(gpu, &hs, h, &self.final_norm, &mut hn, h, nr, eps)?;
            let hb = self.bf16(&hn)?;
            let mut out = self.zeros(nr * vocab)?;
            self.linear(self.lm_head.as_ref().unwrap_or(&self.embed), &hb, nr, (vocab, h), &mut out, false)?;
            logits = gpu.stream.clone_dtoh(&out).map_err(driver)?;
        }
        gpu.synchronize()?;
        let mut out = Vec::with_capacity(batch.len());
        let mut offset = 0;
        for (seg, span) in batch.iter_mut().zip(&spans) {
            let n = seg.logits.rows(span.start, span.len).len();
            out.push(logits[offset * vocab..(offset + n) * vocab].to_vec());
            offset += n;
            seg.state.advance(span.len);
        }
        Ok(out)
    }
}

/// What every layer of one forward call shares: the tokens' positions, and the single-token sequences that go
/// through the batched decode kernels together.
struct Step {
    positions: CudaSlice<i32>,
    decode: Option<DecodeBatch>,
}

/// The single-token sequences of a batch: their rows, positions and page tables (`[B, max_pages]`, zero-padded).
struct DecodeBatch {
    rows: CudaSlice<u32>,
    pos: CudaSlice<i32>,
    tables: CudaSlice<i32>,
    max_pages: usize,
}

impl DecodeBatch {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn rows(&self) -> ops::DecodeRows<'_> {
        ops::DecodeRows { rows: &self.rows, pos: &self.pos, tables: &self.tables, max_pages: self.max_pages }
    }
}

impl Step {
    fn new(gpu: &Gpu, spans: &[Span], seqs: &[&mut GpuSequence], positions: &[i32]) -> Result<Self> {
        let positions = gpu.stream.clone_htod(positions).map_err(driver)?;
        let single: Vec<usize> = (0..spans.len()).filter(|&i| spans[i].len == 1).collect();
        let decode = if single.is_empty() {
            None
        } else {
            let max_pages = single.iter().map(|&i| seqs[i].pages.len()).max().unwrap_or(1).max(1);
            let mut tables = vec![0i32; single.len() * max_pages];
            for (r, &i) in single.iter().enumerate() {
                tables[r * max_pages..r * max_pages + seqs[i].pages.len()].copy_from_slice(&seqs[i].pages);
            }
            let rows: Vec<u32> = single.iter().map(|&i| spans[i].start as u32).collect();
            let pos: Vec<i32> = single.iter().map(|&i| spans[i].pos as i32).collect();
            Some(DecodeBatch {
                rows: gpu.stream.clone_htod(&rows).map_err(driver)?,
                pos: gpu.stream.clone_htod(&pos).map_err(driver)?,
                tables: gpu.stream.clone_htod(&tables).map_err(driver)?,
                max_pages,
            })
        };
        Ok(Step { positions, decode })
    }

    /// Whether `span` goes through the batched decode kernels.
    fn batched(&self, span: &Span) -> bool {
        span.len == 1 && self.decode.is_some()
    }
}

/// A segment's rows in the batch and its position.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    len: usize,
    pos: usize,
}

impl Decoder for CudaModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn new_state(&self) -> SequenceState {
        let slots = self.layers.iter().filter(|l| matches!(l.mixer, Mixer::DeltaNet(_))).count();
        SequenceState::on_device(
            self.id,
            Box::new(GpuSequence {
                pages: Vec::new(),
                free: Arc::clone(&self.free),
                linear: (0..slots).map(|_| None).collect(),
                page_bytes: self.page_bytes(),
                linear_bytes: self.linear_bytes(),
            }),
        )
    }

    /// Micro-batches do not apply here: the GPU computes the whole batch, and waits on the routed experts per layer.
    fn forward_pipelined(
        &self,
        batch: &mut [Segment<'_>],
        experts: &dyn Experts,
        _micro_batches: usize,
    ) -> moe_model::Result<Vec<Vec<f32>>> {
        self.forward(batch, experts).map_err(|e| match e {
            CudaError::Model(m) => m,
            CudaError::InvalidInput(m) => ModelError::InvalidInput(m),
            other => ModelError::InvalidInput(format!("CUDA: {other}")),
        })
    }
}
