//! Routed experts on the GPUs of one process: [`CudaExperts`], the CUDA side of the model's experts seam.
//!
//! Each expert lives on one GPU as two bf16 matrices, `gate_up` `[2I, H]` (gate rows, then up rows: the fused
//! checkpoint layout, so one copy per expert) and `down` `[H, I]`, uploaded once when loaded. A forward pass, per GPU:
//!
//! 1. the host groups the batch's (token, expert) pairs by expert, in expert order, and builds the gather list and,
//!    per token, its rows in that order (the combine's CSR);
//! 2. the activations go up once through a pinned host buffer; `gather_rows_bf16` builds the expert-ordered bf16 rows;
//! 3. cuBLAS multiplies each expert's slice of rows by its `gate_up` and, after `swiglu_bf16`, by its `down`: bf16
//!    operands, fp32 accumulation and fp32 outputs (`cublasGemmEx`, `CUBLAS_COMPUTE_32F`);
//! 4. `combine_rows` writes each token's weighted sum of its rows, in expert order, without atomics.
//!
//! With several GPUs every GPU computes the partial sums of its own experts for all tokens, and NCCL sums them on the
//! first GPU, so that the node still answers with one partial sum per token; that sum comes back through a pinned
//! buffer.

use std::ffi::c_void;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PinnedHostSlice, PushKernelArg};
use cudarc::nccl::{Comm, ReduceOp};
use half::bf16;
use moe_model::{
    Checkpoint, ExpertSlots, Experts, ModelConfig, ModelError, PendingExperts, Ready, Routing, ShardChange,
};

use crate::gpu::{driver_error as driver, Gpu};
use crate::plan::{self, GemmShape, RowPlan};
use crate::{CudaError, DeviceInfo, Result};

/// Threads per block of the row kernels.
const ROW_THREADS: u32 = 256;

struct DeviceExpert {
    gpu: usize,
    gate_up: CudaSlice<bf16>,
    down: CudaSlice<bf16>,
}

impl DeviceExpert {
    fn bytes(&self) -> usize {
        (self.gate_up.len() + self.down.len()) * 2
    }
}

/// One MoE layer's experts, by id.
type LayerRow = Vec<Option<Arc<DeviceExpert>>>;

/// NCCL communicators, one per GPU, used only under the staging lock.
struct Comms(Vec<Comm>);

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; `Comms` only ever sits inside the
// `Staging` mutex, which serialises every use.
unsafe impl Send for Comms {}

/// Pinned host buffers for the activations in and the sums out, grown on demand; and the communicators. One forward
/// at a time holds them.
struct Staging {
    input: Option<PinnedHostSlice<f32>>,
    output: Option<PinnedHostSlice<f32>>,
    comms: Option<Comms>,
}

/// Routed experts held on one or more CUDA devices.
pub struct CudaExperts {
    gpus: Vec<Gpu>,
    slots: ExpertSlots<DeviceExpert>,
    staging: Mutex<Staging>,
    hidden: usize,
    inter: usize,
    num_experts: usize,
}

impl std::fmt::Debug for CudaExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaExperts").field("devices", &self.devices()).field("slots", &self.slots).finish()
    }
}

impl CudaExperts {
    /// Opens the devices `ordinals` (compiling the kernels on each) and holds no expert yet.
    pub fn new(cfg: &ModelConfig, ordinals: &[usize]) -> Result<Self> {
        if ordinals.is_empty() {
            return Err(CudaError::InvalidInput("no CUDA device listed".into()));
        }
        // Checks every device, and NCCL when there are several, before cudarc could panic over a missing library.
        crate::probe(ordinals)?;
        let gpus = ordinals.iter().map(|&o| Gpu::open(o)).collect::<Result<Vec<_>>>()?;
        let comms = if gpus.len() > 1 {
            let streams = gpus.iter().map(|g| g.stream.clone()).collect();
            Some(Comms(Comm::from_devices(streams).map_err(|e| CudaError::Nccl(format!("{e:?}")))?))
        } else {
            None
        };
        Ok(CudaExperts {
            gpus,
            slots: ExpertSlots::new(cfg),
            staging: Mutex::new(Staging { input: None, output: None, comms }),
            hidden: cfg.hidden_size,
            inter: cfg.moe_intermediate_size,
            num_experts: cfg.num_experts,
        })
    }

    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.gpus.iter().map(|g| g.info.clone()).collect()
    }

    /// Uploads the selected experts that are not held yet (from either checkpoint layout), each to the GPU holding
    /// the fewest experts of its layer, so that every layer's work spreads over all GPUs.
    pub fn load_more(
        &self,
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        select: impl Fn(usize, usize) -> bool,
    ) -> Result<ShardChange> {
        let (h, i, ne) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
        if (h, i, ne) != (self.hidden, self.inter, self.num_experts) {
            return Err(CudaError::InvalidInput(
                "the checkpoint's shape differs from the one these experts were made for".into(),
            ));
        }
        let mut change = ShardChange::default();
        for l in (0..cfg.num_hidden_layers).filter(|&l| cfg.is_moe_layer(l)) {
            let wanted: Vec<usize> = (0..ne).filter(|&e| select(l, e) && !self.is_loaded(l, e)).collect();
            if wanted.is_empty() {
                continue;
            }
            let p = format!("layers.{l}.mlp.experts.");
            let fused = if ckpt.contains(&format!("{p}gate_up_proj")) {
                Some((
                    ckpt.matrix_view(&format!("{p}gate_up_proj"), &[ne, 2 * i, h])?,
                    ckpt.matrix_view(&format!("{p}down_proj"), &[ne, h, i])?,
                ))
            } else {
                None
            };
            let mut per_gpu: Vec<usize> = vec![0; self.gpus.len()];
            for x in self.slots.layer(l).unwrap_or_default().iter().flatten() {
                per_gpu[x.gpu] += 1;
            }
            for e in wanted {
                let gpu = (0..self.gpus.len()).min_by_key(|&g| (per_gpu[g], g)).unwrap_or(0);
                let stream = &self.gpus[gpu].stream;
                let expert = match &fused {
                    Some((gate_up, down)) => DeviceExpert {
                        gpu,
                        gate_up: stream.clone_htod(gate_up.rows(e * 2 * i, (e + 1) * 2 * i).data()).map_err(driver)?,
                        down: stream.clone_htod(down.rows(e * h, (e + 1) * h).data()).map_err(driver)?,
                    },
                    None => {
                        // Views of the map, row-major whatever the CPU kernel's resident layout: uploaded as they are.
                        let gate = ckpt.matrix_view(&format!("{p}{e}.gate_proj.weight"), &[i, h])?;
                        let up = ckpt.matrix_view(&format!("{p}{e}.up_proj.weight"), &[i, h])?;
                        let down = ckpt.matrix_view(&format!("{p}{e}.down_proj.weight"), &[h, i])?;
                        // SAFETY: both halves are written below before any kernel reads them.
                        let mut gate_up = unsafe { stream.alloc::<bf16>(2 * i * h) }.map_err(driver)?;
                        stream.memcpy_htod(gate.data(), &mut gate_up.slice_mut(..i * h)).map_err(driver)?;
                        stream.memcpy_htod(up.data(), &mut gate_up.slice_mut(i * h..)).map_err(driver)?;
                        DeviceExpert { gpu, gate_up, down: stream.clone_htod(down.data()).map_err(driver)? }
                    }
                };
                per_gpu[gpu] += 1;
                let added = self.slots.insert([(l, e, expert)]);
                change.experts += added.len();
                change.bytes += added.iter().map(|x| x.bytes()).sum::<usize>();
            }
        }
        for gpu in &self.gpus {
            gpu.synchronize()?;
        }
        Ok(change)
    }

    /// Drops the selected experts; work already under way finishes first (it holds them).
    pub fn unload(&self, select: impl Fn(usize, usize) -> bool) -> ShardChange {
        ShardChange::of(&self.slots.remove(select), DeviceExpert::bytes)
    }

    pub fn is_loaded(&self, layer: usize, expert: usize) -> bool {
        self.slots.is_loaded(layer, expert)
    }

    /// The experts held, per layer (layers without any left out), ascending.
    pub fn hosted(&self) -> Vec<(usize, Vec<u32>)> {
        self.slots.hosted()
    }

    /// Bytes of expert weights held, on all GPUs together.
    pub fn resident_bytes(&self) -> usize {
        self.slots.all().iter().map(|x| x.bytes()).sum()
    }

    /// Bytes of expert weights held per GPU, in the order the devices were listed.
    pub fn resident_bytes_per_device(&self) -> Vec<usize> {
        let mut per = vec![0; self.gpus.len()];
        for x in self.slots.all() {
            per[x.gpu] += x.bytes();
        }
        per
    }

    fn staging(&self) -> MutexGuard<'_, Staging> {
        self.staging.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Splits the batch by GPU; fails if an expert it routes to is not held. Returns the plans and the layer's
    /// experts as they were (held by the pass, so that an unload meanwhile cannot free them).
    fn plan(&self, layer: usize, routing: &Routing) -> Result<(Vec<RowPlan>, LayerRow)> {
        let row = self
            .slots
            .layer(layer)
            .ok_or_else(|| CudaError::InvalidInput(format!("layer {layer} is not a MoE layer")))?;
        let plans = plan::split(routing, self.num_experts, self.gpus.len(), |e| row.get(e)?.as_ref().map(|x| x.gpu))?;
        Ok((plans, row))
    }

    /// Computes the weighted sums into `out`.
    fn compute(&self, layer: usize, hidden: &[f32], routing: &Routing, out: &mut [f32]) -> Result<()> {
        let (h, ntok) = (self.hidden, routing.num_tokens());
        if hidden.len() != ntok * h || out.len() != ntok * h {
            return Err(CudaError::InvalidInput(format!(
                "hidden has {} values for {ntok} tokens of width {h}",
                hidden.len()
            )));
        }
        if ntok == 0 {
            return Ok(());
        }
        let (plans, row) = self.plan(layer, routing)?;
        let mut staging = self.staging();
        let staging = &mut *staging;
        let input = pinned(&self.gpus[0], &mut staging.input, hidden.len())?;
        input[..hidden.len()].copy_from_slice(hidden);
        let mut partials = Vec::with_capacity(self.gpus.len());
        for (gpu, plan) in self.gpus.iter().zip(&plans) {
            partials.push(self.partial_sums(gpu, plan, &row, &input[..hidden.len()], ntok)?);
        }
        let first = &self.gpus[0];
        let mut total;
        let result = match &staging.comms {
            None => &partials[0],
            Some(comms) => {
                // SAFETY: every element is written by the reduction before it is read.
                total = unsafe { first.stream.alloc::<f32>(ntok * h) }.map_err(driver)?;
                let nccl = |e: cudarc::nccl::result::NcclError| CudaError::Nccl(format!("{e:?}"));
                cudarc::nccl::result::group_start().map_err(nccl)?;
                for (rank, (comm, partial)) in comms.0.iter().zip(&partials).enumerate() {
                    let recv = if rank == 0 { Some(&mut total) } else { None };
                    comm.reduce(partial, recv, &ReduceOp::Sum, 0).map_err(nccl)?;
                }
                cudarc::nccl::result::group_end().map_err(nccl)?;
                &total
            }
        };
        let output = pinned(first, &mut staging.output, out.len())?;
        first.stream.memcpy_dtoh(result, &mut output[..out.len()]).map_err(driver)?;
        first.synchronize()?;
        out.copy_from_slice(&output[..out.len()]);
        Ok(())
    }

    /// One GPU's partial sums `[ntok, H]` for its experts (zeros where it has none).
    fn partial_sums(
        &self,
        gpu: &Gpu,
        plan: &RowPlan,
        experts: &[Option<Arc<DeviceExpert>>],
        input: &[f32],
        ntok: usize,
    ) -> Result<CudaSlice<f32>> {
        let held = |e: usize| {
            experts
                .get(e)
                .and_then(Option::as_ref)
                .ok_or_else(|| CudaError::InvalidInput(format!("expert {e} is not loaded here")))
        };
        let (h, i) = (self.hidden, self.inter);
        let s = &gpu.stream;
        let rows = plan.gather.len();
        if rows == 0 {
            return s.alloc_zeros::<f32>(ntok * h).map_err(driver);
        }
        // SAFETY (all four allocs): each buffer is fully written by the copy or kernel that follows before it is read.
        let mut x = unsafe { s.alloc::<f32>(ntok * h) }.map_err(driver)?;
        s.memcpy_htod(input, &mut x).map_err(driver)?;
        let gather = s.clone_htod(&plan.gather).map_err(driver)?;
        let offsets = s.clone_htod(&plan.offsets).map_err(driver)?;
        let slots = s.clone_htod(&plan.slots).map_err(driver)?;
        let weights = s.clone_htod(&plan.weights).map_err(driver)?;
        let mut xg = unsafe { s.alloc::<bf16>(rows * h) }.map_err(driver)?;
        let mut gu = unsafe { s.alloc::<f32>(rows * 2 * i) }.map_err(driver)?;
        let mut act = unsafe { s.alloc::<bf16>(rows * i) }.map_err(driver)?;
        let mut y = unsafe { s.alloc::<f32>(rows * h) }.map_err(driver)?;
        let mut partial = unsafe { s.alloc::<f32>(ntok * h) }.map_err(driver)?;
        let (rows_i, h_i, i_i, ntok_i) = (rows as i32, h as i32, i as i32, ntok as i32);
        let per_row =
            |n: usize| LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments match gather_rows_bf16's signature and every index is < its buffer's length.
        unsafe {
            s.launch_builder(gpu.function("gather_rows_bf16")?)
                .arg(&x)
                .arg(&gather)
                .arg(&mut xg)
                .arg(&rows_i)
                .arg(&h_i)
                .launch(per_row(rows))
        }
        .map_err(driver)?;
        for &(e, first, n) in &plan.experts {
            // gu[first.., 2I] = xg[first.., H] · gate_upᵀ
            gemm_bf16_f32(
                gpu,
                &held(e)?.gate_up,
                &xg,
                first * h,
                &mut gu,
                first * 2 * i,
                plan::linear(2 * i, n, h),
                false,
            )?;
        }
        // SAFETY: as above, for swiglu_bf16.
        unsafe {
            s.launch_builder(gpu.function("swiglu_bf16")?)
                .arg(&gu)
                .arg(&mut act)
                .arg(&rows_i)
                .arg(&i_i)
                .launch(per_row(rows))
        }
        .map_err(driver)?;
        for &(e, first, n) in &plan.experts {
            // y[first.., H] = act[first.., I] · downᵀ
            gemm_bf16_f32(gpu, &held(e)?.down, &act, first * i, &mut y, first * h, plan::linear(h, n, i), false)?;
        }
        // SAFETY: as above, for combine_rows; slots index rows of y, offsets has ntok + 1 entries.
        unsafe {
            s.launch_builder(gpu.function("combine_rows")?)
                .arg(&y)
                .arg(&offsets)
                .arg(&slots)
                .arg(&weights)
                .arg(&mut partial)
                .arg(&ntok_i)
                .arg(&h_i)
                .launch(per_row(ntok))
        }
        .map_err(driver)?;
        Ok(partial)
    }
}

/// `C = op(W) · op(B)` (`+ C` when `accumulate`) as `shape` says ([`plan::linear`] for a Linear layer), with `B` starting `b_at` elements and
/// `C` `c_at` elements into their buffers: bf16 operands, fp32 accumulation and output (`cublasGemmEx`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_bf16_f32(
    gpu: &Gpu,
    w: &CudaSlice<bf16>,
    b: &CudaSlice<bf16>,
    b_at: usize,
    c: &mut CudaSlice<f32>,
    c_at: usize,
    shape: GemmShape,
    accumulate: bool,
) -> Result<()> {
    let GemmShape { transa, transb, m, n, k, lda, ldb, ldc } = shape;
    // The last element each operand reaches, from the BLAS definition.
    let (a_rows, a_cols) = if transa { (k, m) } else { (m, k) };
    let (b_rows, b_cols) = if transb { (n, k) } else { (k, n) };
    let reach = |rows: usize, cols: usize, ld: usize| if rows == 0 || cols == 0 { 0 } else { (cols - 1) * ld + rows };
    if lda < a_rows
        || ldb < b_rows
        || ldc < m
        || w.len() < reach(a_rows, a_cols, lda)
        || b.len() < b_at + reach(b_rows, b_cols, ldb)
        || c.len() < c_at + reach(m, n, ldc)
    {
        return Err(CudaError::InvalidInput(format!("GEMM {shape:?} does not fit its buffers")));
    }
    // cuBLAS works on the calling thread's current context: make it this GPU's (the engine thread, or another GPU
    // of the same node, may have left another one current).
    gpu.ctx.bind_to_thread().map_err(driver)?;
    let op =
        |t: bool| if t { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N };
    let s: &Arc<CudaStream> = &gpu.stream;
    let (w_ptr, _w) = w.device_ptr(s);
    let (b_ptr, _b) = b.device_ptr(s);
    let (c_ptr, _c) = c.device_ptr_mut(s);
    let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
    // SAFETY: the pointers are live device buffers of this GPU, large enough for the shape as checked above; cuBLAS
    // runs on the same stream as the kernels around it.
    unsafe {
        blas::gemm_ex(
            *gpu.blas.handle(),
            op(transa),
            op(transb),
            m as i32,
            n as i32,
            k as i32,
            (&alpha as *const f32).cast::<c_void>(),
            w_ptr as *const c_void,
            blas_sys::cudaDataType_t::CUDA_R_16BF,
            lda as i32,
            (b_ptr as *const bf16).add(b_at).cast::<c_void>(),
            blas_sys::cudaDataType_t::CUDA_R_16BF,
            ldb as i32,
            (&beta as *const f32).cast::<c_void>(),
            (c_ptr as *mut f32).add(c_at).cast::<c_void>(),
            blas_sys::cudaDataType_t::CUDA_R_32F,
            ldc as i32,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| CudaError::Blas(format!("{e:?}")))
}

/// A pinned host buffer of at least `len` floats, (re)allocated when too small; returned as a slice.
fn pinned<'a>(gpu: &Gpu, slot: &'a mut Option<PinnedHostSlice<f32>>, len: usize) -> Result<&'a mut [f32]> {
    if slot.as_ref().is_none_or(|p| p.len() < len) {
        // Page-locked for every context (portable: the activations go to each GPU from it), not write-combined (the
        // host reads the sums back). Grown by half again to avoid reallocating on every slightly larger batch.
        let flags = cudarc::driver::sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: the buffer is written (input) or filled by a copy (output) before it is read.
        *slot = Some(unsafe { gpu.ctx.alloc_pinned_with_flags::<f32>(len + len / 2, flags) }.map_err(driver)?);
    }
    match slot {
        Some(p) => p.as_mut_slice().map_err(driver),
        None => Err(CudaError::InvalidInput("no staging buffer".into())),
    }
}

fn model_error(layer: usize, e: CudaError) -> ModelError {
    ModelError::Experts { layer, message: e.to_string() }
}

impl Experts for CudaExperts {
    fn dispatch(
        &self,
        layer: usize,
        hidden: &[f32],
        routing: &Routing,
    ) -> moe_model::Result<Box<dyn PendingExperts + '_>> {
        let mut out = vec![0f32; hidden.len()];
        self.compute(layer, hidden, routing, &mut out).map_err(|e| model_error(layer, e))?;
        Ok(Box::new(Ready(out)))
    }

    fn forward(&self, layer: usize, hidden: &[f32], routing: &Routing, out: &mut [f32]) -> moe_model::Result<()> {
        self.compute(layer, hidden, routing, out).map_err(|e| model_error(layer, e))
    }
}
