//! Launches of the model's other kernels (norms, RoPE, routing, Gated DeltaNet, attention) on one [`Gpu`].
//!
//! Shapes follow the CPU backend (`moe_model::cpu::ops` and the layers), all f32 and row-major; each function checks
//! the lengths it is given and launches on the GPU's stream without synchronising.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtrMut, LaunchArgs, LaunchConfig, PushKernelArg};

use crate::gpu::{driver_error as driver, Gpu};
use crate::kernels::gdn_chunked_scratch;
use crate::{CudaError, Result};

const THREADS: u32 = 256;

pub(crate) fn blocks(n: usize, threads: u32, shared: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: shared as u32 }
}

fn check(what: &str, ok: bool) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(CudaError::InvalidInput(format!("{what}: buffer sizes do not match the shape")))
    }
}

pub(crate) fn run(mut args: LaunchArgs<'_>, cfg: LaunchConfig) -> Result<()> {
    // SAFETY: every caller pushes the arguments of its kernel's signature, in order, with buffers checked against
    // the shape the kernel indexes.
    unsafe { args.launch(cfg) }.map(|_| ()).map_err(driver)
}

fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(gpu: &Gpu, n: usize) -> Result<CudaSlice<T>> {
    gpu.stream.alloc_zeros::<T>(n).map_err(driver)
}

/// `out[r] = x[r] / rms(x[r]) · (1 + w)` for `rows` rows of width `n = w.len()`, rows at the given strides.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_offset(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    x_stride: usize,
    w: &CudaSlice<f32>,
    out: &mut CudaSlice<f32>,
    out_stride: usize,
    rows: usize,
    eps: f32,
) -> Result<()> {
    let n = w.len();
    let fits = |len: usize, stride: usize| rows == 0 || (stride >= n && len >= (rows - 1) * stride + n);
    check("rms_norm_offset", fits(x.len(), x_stride) && fits(out.len(), out_stride))?;
    let (xs, os, r, n_i) = (x_stride as i32, out_stride as i32, rows as i32, n as i32);
    let mut a = gpu.stream.launch_builder(gpu.function("rms_norm_offset")?);
    a.arg(x).arg(&xs).arg(w).arg(out).arg(&os).arg(&r).arg(&n_i).arg(&eps);
    run(a, blocks(rows, THREADS, 0))
}

/// [`rms_norm_offset`] in place (q and k heads inside their projection rows).
pub fn rms_norm_offset_in_place(
    gpu: &Gpu,
    x: &mut CudaSlice<f32>,
    stride: usize,
    w: &CudaSlice<f32>,
    rows: usize,
    eps: f32,
) -> Result<()> {
    let n = w.len();
    check("rms_norm_offset_in_place", rows == 0 || (stride >= n && x.len() >= (rows - 1) * stride + n))?;
    let (s, r, n_i) = (stride as i32, rows as i32, n as i32);
    let (ptr, _sync) = x.device_ptr_mut(&gpu.stream);
    let mut a = gpu.stream.launch_builder(gpu.function("rms_norm_offset")?);
    a.arg(&ptr).arg(&s).arg(w).arg(&ptr).arg(&s).arg(&r).arg(&n_i).arg(&eps);
    run(a, blocks(rows, THREADS, 0))
}

/// `y = w · (o / rms(o)) · silu(z)` per row of width `w.len()`.
pub fn rms_norm_gated(
    gpu: &Gpu,
    o: &CudaSlice<f32>,
    z: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    eps: f32,
) -> Result<()> {
    let n = w.len();
    let rows = o.len() / n.max(1);
    check("rms_norm_gated", n > 0 && o.len() == rows * n && z.len() == o.len() && y.len() == o.len())?;
    let (r, n_i) = (rows as i32, n as i32);
    let mut a = gpu.stream.launch_builder(gpu.function("rms_norm_gated")?);
    a.arg(o).arg(z).arg(w).arg(y).arg(&r).arg(&n_i).arg(&eps);
    run(a, blocks(rows, THREADS, 0))
}

/// Partial NeoX RoPE in place on `heads` heads per token, token t at position `pos[t]`.
#[allow(clippy::too_many_arguments)]
pub fn rope_partial(
    gpu: &Gpu,
    x: &mut CudaSlice<f32>,
    pos: &CudaSlice<i32>,
    heads: usize,
    row_stride: usize,
    head_stride: usize,
    rotary_dim: usize,
    theta: f32,
) -> Result<()> {
    let ntok = pos.len();
    let last = if ntok == 0 { 0 } else { (ntok - 1) * row_stride + (heads.max(1) - 1) * head_stride + rotary_dim };
    check("rope_partial", rotary_dim.is_multiple_of(2) && x.len() >= last)?;
    let (n, hh, rs, hs, rd) = (ntok as i32, heads as i32, row_stride as i32, head_stride as i32, rotary_dim as i32);
    let mut a = gpu.stream.launch_builder(gpu.function("rope_partial")?);
    a.arg(x).arg(pos).arg(&n).arg(&hh).arg(&rs).arg(&hs).arg(&rd).arg(&theta);
    let threads = ((rotary_dim / 2).next_multiple_of(32).clamp(32, 1024)) as u32;
    run(a, blocks(ntok * heads, threads, 0))
}

/// Softmax over `ne` experts per token, then the top `k` (ties to the lower id), renormalised if asked: returns the
/// experts and weights, `k` per token.
pub fn softmax_topk(
    gpu: &Gpu,
    logits: &CudaSlice<f32>,
    ne: usize,
    k: usize,
    renormalize: bool,
) -> Result<(CudaSlice<u32>, CudaSlice<f32>)> {
    let ntok = logits.len() / ne.max(1);
    check("softmax_topk", ne > 0 && k <= ne && logits.len() == ntok * ne)?;
    let mut experts = zeros::<u32>(gpu, ntok * k)?;
    let mut weights = zeros::<f32>(gpu, ntok * k)?;
    let (n, e, kk, rn) = (ntok as i32, ne as i32, k as i32, i32::from(renormalize));
    let mut a = gpu.stream.launch_builder(gpu.function("softmax_topk")?);
    a.arg(logits).arg(&n).arg(&e).arg(&kk).arg(&rn).arg(&mut experts).arg(&mut weights);
    run(a, blocks(ntok, THREADS, ne * 4))?;
    Ok((experts, weights))
}

/// The causal depthwise conv with SiLU over `[state | inp]` (`state` `[K−1, C]`, `inp` `[n, C]`, `w` `[K][C]`):
/// returns the output `[n, C]` and the next state.
pub fn causal_conv_silu(
    gpu: &Gpu,
    state: &CudaSlice<f32>,
    inp: &CudaView<'_, f32>,
    w: &CudaSlice<f32>,
    channels: usize,
    kernel: usize,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let n = inp.len() / channels.max(1);
    check(
        "causal_conv_silu",
        kernel >= 1
            && inp.len() == n * channels
            && state.len() == (kernel - 1) * channels
            && w.len() == kernel * channels,
    )?;
    let mut out = zeros::<f32>(gpu, n * channels)?;
    let mut next = zeros::<f32>(gpu, state.len())?;
    let (n_i, c, k) = (n as i32, channels as i32, kernel as i32);
    let total = (n + kernel - 1) * channels;
    let mut a = gpu.stream.launch_builder(gpu.function("causal_conv_silu")?);
    a.arg(state).arg(inp).arg(w).arg(&mut out).arg(&mut next).arg(&n_i).arg(&c).arg(&k);
    run(a, blocks(total.div_ceil(THREADS as usize), THREADS, 0))?;
    Ok((out, next))
}

/// The dimensions of a Gated DeltaNet layer.
#[derive(Debug, Clone, Copy)]
pub struct GdnDims {
    pub hk: usize,
    pub hv: usize,
    pub dk: usize,
    pub dv: usize,
}

/// Per value head, head-major, in f64: normalised q, k `[hv, n, dk]`, v `[hv, n, dv]`, β and g `[hv, n]`.
pub struct GdnHeads {
    pub n: usize,
    pub q: CudaSlice<f64>,
    pub k: CudaSlice<f64>,
    pub v: CudaSlice<f64>,
    pub beta: CudaSlice<f64>,
    pub g: CudaSlice<f64>,
}

/// Splits the conv output `u` `[n, 2·hk·dk + hv·dv]` into per-head inputs of the delta rule (q/k L2-normalised with
/// eps 1e-6, q scaled by 1/√dk; β = σ(b); g = −exp(A_log)·softplus(a + dt_bias)); `neg_a` is −exp(A_log).
#[allow(clippy::too_many_arguments)]
pub fn gdn_prepare(
    gpu: &Gpu,
    u: &CudaSlice<f32>,
    b: &CudaView<'_, f32>,
    a_in: &CudaView<'_, f32>,
    neg_a: &CudaSlice<f32>,
    dt_bias: &CudaSlice<f32>,
    d: GdnDims,
) -> Result<GdnHeads> {
    let width = 2 * d.hk * d.dk + d.hv * d.dv;
    let n = u.len() / width.max(1);
    check(
        "gdn_prepare",
        d.hk > 0
            && d.hv.is_multiple_of(d.hk)
            && u.len() == n * width
            && b.len() == n * d.hv
            && a_in.len() == n * d.hv
            && neg_a.len() == d.hv
            && dt_bias.len() == d.hv,
    )?;
    let mut h = GdnHeads {
        n,
        q: zeros(gpu, d.hv * n * d.dk)?,
        k: zeros(gpu, d.hv * n * d.dk)?,
        v: zeros(gpu, d.hv * n * d.dv)?,
        beta: zeros(gpu, d.hv * n)?,
        g: zeros(gpu, d.hv * n)?,
    };
    let (n_i, hk, hv, dk, dv) = (n as i32, d.hk as i32, d.hv as i32, d.dk as i32, d.dv as i32);
    let (q_scale, eps) = (1.0 / (d.dk as f32).sqrt(), 1e-6f32);
    let mut a = gpu.stream.launch_builder(gpu.function("gdn_prepare")?);
    a.arg(u).arg(b).arg(a_in).arg(neg_a).arg(dt_bias);
    a.arg(&mut h.q).arg(&mut h.k).arg(&mut h.v).arg(&mut h.beta).arg(&mut h.g);
    a.arg(&n_i).arg(&hk).arg(&hv).arg(&dk).arg(&dv).arg(&q_scale).arg(&eps);
    run(a, blocks(n * d.hv, 128, 0))?;
    Ok(h)
}

fn check_heads(what: &str, h: &GdnHeads, state: &CudaSlice<f32>, d: GdnDims) -> Result<()> {
    let n = h.n;
    check(
        what,
        h.q.len() == d.hv * n * d.dk
            && h.k.len() == h.q.len()
            && h.v.len() == d.hv * n * d.dv
            && h.beta.len() == d.hv * n
            && h.g.len() == d.hv * n
            && state.len() == d.hv * d.dk * d.dv,
    )
}

/// The recurrent gated delta rule over the `n` tokens of `h`, updating `state` `[hv, dk, dv]`; returns o
/// `[hv, n, dv]` (f64).
pub fn gated_delta_recurrent(
    gpu: &Gpu,
    h: &GdnHeads,
    state: &mut CudaSlice<f32>,
    d: GdnDims,
) -> Result<CudaSlice<f64>> {
    check_heads("gated_delta_recurrent", h, state, d)?;
    let mut out = zeros::<f64>(gpu, d.hv * h.n * d.dv)?;
    let (n, dk, dv) = (h.n as i32, d.dk as i32, d.dv as i32);
    let mut a = gpu.stream.launch_builder(gpu.function("gated_delta_recurrent")?);
    a.arg(&h.q).arg(&h.k).arg(&h.v).arg(&h.beta).arg(&h.g).arg(state).arg(&mut out).arg(&n).arg(&dk).arg(&dv);
    let threads = 128u32;
    let cfg = LaunchConfig {
        grid_dim: (d.hv as u32, d.dv.div_ceil(threads as usize) as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: (2 * d.dk * 8) as u32,
    };
    run(a, cfg)?;
    Ok(out)
}

/// The chunked gated delta rule (chunks of 64 tokens, the state in f64 for the span); same contract as
/// [`gated_delta_recurrent`].
pub fn gated_delta_chunked(gpu: &Gpu, h: &GdnHeads, state: &mut CudaSlice<f32>, d: GdnDims) -> Result<CudaSlice<f64>> {
    check_heads("gated_delta_chunked", h, state, d)?;
    let mut out = zeros::<f64>(gpu, d.hv * h.n * d.dv)?;
    let mut scratch = zeros::<f64>(gpu, d.hv * gdn_chunked_scratch(d.dk, d.dv))?;
    let (n, dk, dv) = (h.n as i32, d.dk as i32, d.dv as i32);
    let mut a = gpu.stream.launch_builder(gpu.function("gated_delta_chunked")?);
    a.arg(&h.q).arg(&h.k).arg(&h.v).arg(&h.beta).arg(&h.g).arg(state).arg(&mut out).arg(&mut scratch);
    a.arg(&n).arg(&dk).arg(&dv);
    run(a, blocks(d.hv, THREADS, 0))?;
    Ok(out)
}

/// RMSNormGated of the delta rule's output o `[hv, n, dv]` with z `[n, hv·dv]`, into y `[n, hv·dv]`.
pub fn gdn_output_norm(
    gpu: &Gpu,
    o: &CudaSlice<f64>,
    z: &CudaView<'_, f32>,
    w: &CudaSlice<f32>,
    hv: usize,
    eps: f32,
    y: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let dv = w.len();
    let n = z.len() / (hv * dv).max(1);
    check("gdn_output_norm", dv > 0 && z.len() == n * hv * dv && o.len() == z.len() && y.len() == z.len())?;
    let (n_i, hv_i, dv_i) = (n as i32, hv as i32, dv as i32);
    let mut a = gpu.stream.launch_builder(gpu.function("gdn_output_norm")?);
    a.arg(o).arg(z).arg(w).arg(y).arg(&n_i).arg(&hv_i).arg(&dv_i).arg(&eps);
    run(a, blocks(n * hv, 128, 0))
}

/// A paged KV cache pool of one layer: `pages` pages of `page_tokens` rows of width `nkv·hd`, keys and values.
pub struct KvPool {
    pub k: CudaSlice<f32>,
    pub v: CudaSlice<f32>,
    pub page_tokens: usize,
    pub width: usize,
}

impl KvPool {
    pub fn new(gpu: &Gpu, pages: usize, page_tokens: usize, width: usize) -> Result<Self> {
        Ok(KvPool {
            k: zeros(gpu, pages * page_tokens * width)?,
            v: zeros(gpu, pages * page_tokens * width)?,
            page_tokens,
            width,
        })
    }

    pub fn pages(&self) -> usize {
        self.k.len() / (self.page_tokens * self.width).max(1)
    }
}

/// Appends `n` key and value rows at positions `pos0..` of the sequence whose pages are `table` (which must already
/// cover them).
pub fn kv_append(
    gpu: &Gpu,
    pool: &mut KvPool,
    table: &CudaSlice<i32>,
    k_rows: &CudaView<'_, f32>,
    v_rows: &CudaView<'_, f32>,
    pos0: usize,
) -> Result<()> {
    let n = k_rows.len() / pool.width.max(1);
    check(
        "kv_append",
        k_rows.len() == n * pool.width
            && v_rows.len() == k_rows.len()
            && (pos0 + n).div_ceil(pool.page_tokens) <= table.len(),
    )?;
    let (n_i, p, w, pt) = (n as i32, pos0 as i32, pool.width as i32, pool.page_tokens as i32);
    for (rows, cache) in [(k_rows, &mut pool.k), (v_rows, &mut pool.v)] {
        let mut a = gpu.stream.launch_builder(gpu.function("kv_append")?);
        a.arg(rows).arg(table).arg(cache).arg(&n_i).arg(&p).arg(&w).arg(&pt);
        run(a, blocks(n, THREADS, 0))?;
    }
    Ok(())
}

/// Gated attention for `n` new tokens at positions `pos0..` over the cached keys and values (which must already
/// include them): qg `[n, nh, 2·hd]` (q normed and rotated, then the gate); writes o `[n, nh·hd]`.
pub fn attention_paged(
    gpu: &Gpu,
    qg: &CudaView<'_, f32>,
    pool: &KvPool,
    table: &CudaSlice<i32>,
    pos0: usize,
    (nh, nkv, hd): (usize, usize, usize),
    o: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let n = qg.len() / (2 * nh * hd).max(1);
    check(
        "attention_paged",
        hd.is_multiple_of(32)
            && hd <= 256
            && nkv > 0
            && nh.is_multiple_of(nkv)
            && pool.width == nkv * hd
            && qg.len() == n * 2 * nh * hd
            && (pos0 + n).div_ceil(pool.page_tokens) <= table.len()
            && pool.pages() > 0
            && o.len() == n * nh * hd,
    )?;
    let warps = 4usize;
    let scale = 1.0 / (hd as f32).sqrt();
    let (n_i, p, nh_i, nkv_i, hd_i, pt) =
        (n as i32, pos0 as i32, nh as i32, nkv as i32, hd as i32, pool.page_tokens as i32);
    let mut a = gpu.stream.launch_builder(gpu.function("attention_paged")?);
    a.arg(qg).arg(&pool.k).arg(&pool.v).arg(table).arg(o);
    a.arg(&n_i).arg(&p).arg(&nh_i).arg(&nkv_i).arg(&hd_i).arg(&pt).arg(&scale);
    run(a, blocks(n * nh, (warps * 32) as u32, warps * (2 + hd) * 4))
}

/// The device addresses of per-sequence buffers, as the `*_multi` kernels take them (`float* const*`).
pub fn pointer_table(gpu: &Gpu, buffers: &mut [&mut CudaSlice<f32>]) -> Result<CudaSlice<u64>> {
    let ptrs: Vec<u64> = buffers
        .iter_mut()
        .map(|b| {
            let (ptr, _sync) = b.device_ptr_mut(&gpu.stream);
            ptr
        })
        .collect();
    gpu.stream.clone_htod(&ptrs).map_err(driver)
}

/// The conv for one token of each of B sequences: token b is row `rows[b]` of `qkv` `[ntok, C]`, its state
/// `[K−1, C]` at `states[b]` (updated in place). Returns u `[B, C]`.
pub fn conv_step_multi(
    gpu: &Gpu,
    states: &CudaSlice<u64>,
    qkv: &CudaSlice<f32>,
    rows: &CudaSlice<u32>,
    w: &CudaSlice<f32>,
    channels: usize,
    kernel: usize,
) -> Result<CudaSlice<f32>> {
    let b = rows.len();
    check(
        "conv_step_multi",
        states.len() == b && w.len() == kernel * channels && qkv.len().is_multiple_of(channels.max(1)),
    )?;
    let mut u = zeros::<f32>(gpu, b * channels)?;
    let (b_i, c, k) = (b as i32, channels as i32, kernel as i32);
    let mut a = gpu.stream.launch_builder(gpu.function("conv_step_multi")?);
    a.arg(states).arg(qkv).arg(rows).arg(w).arg(&mut u).arg(&b_i).arg(&c).arg(&k);
    run(a, blocks((b * channels).div_ceil(THREADS as usize), THREADS, 0))?;
    Ok(u)
}

/// One recurrent step for each of the `h.n` sequences of `h`, sequence b's state `[hv, dk, dv]` at `states[b]`.
/// Returns o `[hv, B, dv]`.
pub fn gated_delta_step_multi(gpu: &Gpu, h: &GdnHeads, states: &CudaSlice<u64>, d: GdnDims) -> Result<CudaSlice<f64>> {
    let b = h.n;
    check(
        "gated_delta_step_multi",
        states.len() == b && h.q.len() == d.hv * b * d.dk && h.v.len() == d.hv * b * d.dv && h.beta.len() == d.hv * b,
    )?;
    let mut out = zeros::<f64>(gpu, d.hv * b * d.dv)?;
    let (b_i, dk, dv) = (b as i32, d.dk as i32, d.dv as i32);
    let mut a = gpu.stream.launch_builder(gpu.function("gated_delta_step_multi")?);
    a.arg(&h.q).arg(&h.k).arg(&h.v).arg(&h.beta).arg(&h.g).arg(states).arg(&mut out).arg(&b_i).arg(&dk).arg(&dv);
    let threads = 128u32;
    let cfg = LaunchConfig {
        grid_dim: (d.hv as u32, d.dv.div_ceil(threads as usize) as u32, b as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: (2 * d.dk * 8) as u32,
    };
    run(a, cfg)?;
    Ok(out)
}

/// One new token for each of B sequences: token b is row `rows[b]` of the batch, at position `pos[b]`, with its page
/// table in row b of `tables` `[B, max_pages]` (which must cover the position).
pub struct DecodeRows<'a> {
    pub rows: &'a CudaSlice<u32>,
    pub pos: &'a CudaSlice<i32>,
    pub tables: &'a CudaSlice<i32>,
    pub max_pages: usize,
}

impl DecodeRows<'_> {
    fn check(&self, what: &str) -> Result<usize> {
        let b = self.rows.len();
        check(what, self.pos.len() == b && self.tables.len() == b * self.max_pages)?;
        Ok(b)
    }
}

/// Appends the key and value rows of the decode tokens (rows of `k_all` / `v_all`, `[ntok, width]`).
pub fn kv_append_multi(
    gpu: &Gpu,
    pool: &mut KvPool,
    k_all: &CudaSlice<f32>,
    v_all: &CudaSlice<f32>,
    at: &DecodeRows<'_>,
) -> Result<()> {
    let b = at.check("kv_append_multi")?;
    check("kv_append_multi", k_all.len() == v_all.len() && k_all.len().is_multiple_of(pool.width.max(1)))?;
    let (mp, b_i, w, pt) = (at.max_pages as i32, b as i32, pool.width as i32, pool.page_tokens as i32);
    for (src, cache) in [(k_all, &mut pool.k), (v_all, &mut pool.v)] {
        let mut a = gpu.stream.launch_builder(gpu.function("kv_append_multi")?);
        a.arg(src).arg(at.rows).arg(at.pos).arg(at.tables).arg(&mp).arg(cache).arg(&b_i).arg(&w).arg(&pt);
        run(a, blocks(b, THREADS, 0))?;
    }
    Ok(())
}

/// [`attention_paged`] for the decode tokens: reads their rows of `qg` `[ntok, nh, 2·hd]`, writes their rows of `o`
/// `[ntok, nh·hd]`.
pub fn attention_paged_multi(
    gpu: &Gpu,
    qg: &CudaSlice<f32>,
    pool: &KvPool,
    at: &DecodeRows<'_>,
    (nh, nkv, hd): (usize, usize, usize),
    o: &mut CudaSlice<f32>,
) -> Result<()> {
    let b = at.check("attention_paged_multi")?;
    check(
        "attention_paged_multi",
        hd.is_multiple_of(32)
            && hd <= 256
            && nkv > 0
            && nh.is_multiple_of(nkv)
            && pool.width == nkv * hd
            && qg.len().is_multiple_of(2 * nh * hd)
            && o.len() / (nh * hd) == qg.len() / (2 * nh * hd),
    )?;
    let warps = 4usize;
    let scale = 1.0 / (hd as f32).sqrt();
    let (mp, b_i, nh_i, nkv_i, hd_i, pt) =
        (at.max_pages as i32, b as i32, nh as i32, nkv as i32, hd as i32, pool.page_tokens as i32);
    let mut a = gpu.stream.launch_builder(gpu.function("attention_paged_multi")?);
    a.arg(qg).arg(&pool.k).arg(&pool.v).arg(at.rows).arg(at.pos).arg(at.tables).arg(&mp).arg(o);
    a.arg(&b_i).arg(&nh_i).arg(&nkv_i).arg(&hd_i).arg(&pt).arg(&scale);
    run(a, blocks(b * nh, (warps * 32) as u32, warps * (2 + hd) * 4))
}
