//! Measurements for `moectl bench-cuda`: the grouped expert GEMMs next to one dense GEMM of the same work, and the
//! card's copy bandwidth. Timed with CUDA events on the GPU's stream, after a warm-up.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use half::bf16;

use crate::experts::gemm_bf16_f32;
use crate::gpu::{driver_error as driver, Gpu};
use crate::plan::linear;
use crate::Result;

/// One GEMM measurement.
#[derive(Debug, Clone, Copy)]
pub struct GemmTiming {
    /// Rows multiplied (token-expert pairs).
    pub rows: usize,
    /// Seconds per pass (gate_up and down).
    pub seconds: f64,
    pub tflops: f64,
}

/// Times `f` (which enqueues work on `gpu`'s stream) over `iters` runs after two warm-up runs; seconds per run.
fn time(gpu: &Gpu, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    f()?;
    let start = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver)?;
    let end = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver)?;
    start.record(&gpu.stream).map_err(driver)?;
    for _ in 0..iters {
        f()?;
    }
    end.record(&gpu.stream).map_err(driver)?;
    let ms = start.elapsed_ms(&end).map_err(driver)?;
    Ok(f64::from(ms) / 1e3 / iters.max(1) as f64)
}

fn filled(gpu: &Gpu, n: usize) -> Result<CudaSlice<bf16>> {
    // Small values, so that nothing overflows; the timing does not depend on them.
    let host: Vec<bf16> = (0..n).map(|i| bf16::from_f32(((i % 17) as f32 - 8.0) / 64.0)).collect();
    gpu.stream.clone_htod(&host).map_err(driver)
}

/// The routed experts' two GEMMs (`gate_up` `[2I, H]`, then `down` `[H, I]`, bf16 with fp32 accumulation, one
/// cuBLAS call per expert) for `tokens` tokens routed to `top_k` of `experts` experts, spread evenly.
pub fn grouped_expert_gemm(
    gpu: &Gpu,
    tokens: usize,
    experts: usize,
    top_k: usize,
    hidden: usize,
    inter: usize,
    iters: usize,
) -> Result<GemmTiming> {
    let rows = tokens * top_k;
    let weights: Vec<(CudaSlice<bf16>, CudaSlice<bf16>)> = (0..experts)
        .map(|_| Ok((filled(gpu, 2 * inter * hidden)?, filled(gpu, hidden * inter)?)))
        .collect::<Result<_>>()?;
    let x = filled(gpu, rows * hidden)?;
    let act = filled(gpu, rows * inter)?;
    let mut gu = gpu.stream.alloc_zeros::<f32>(rows * 2 * inter).map_err(driver)?;
    let mut y = gpu.stream.alloc_zeros::<f32>(rows * hidden).map_err(driver)?;
    // Rows per expert as even as the counts allow: (expert, first row, rows).
    let share: Vec<(usize, usize, usize)> = (0..experts)
        .map(|e| (e, e * rows / experts, (e + 1) * rows / experts - e * rows / experts))
        .filter(|&(_, _, n)| n > 0)
        .collect();
    let seconds = time(gpu, iters, || {
        for &(e, start, n) in &share {
            let (gate_up, down) = &weights[e];
            gemm_bf16_f32(
                gpu,
                gate_up,
                &x,
                start * hidden,
                &mut gu,
                start * 2 * inter,
                linear(2 * inter, n, hidden),
                false,
            )?;
            gemm_bf16_f32(gpu, down, &act, start * inter, &mut y, start * hidden, linear(hidden, n, inter), false)?;
        }
        Ok(())
    })?;
    let flops = 2.0 * rows as f64 * 3.0 * (hidden * inter) as f64;
    Ok(GemmTiming { rows, seconds, tflops: flops / seconds / 1e12 })
}

/// The same two GEMMs with all `rows` rows through one expert's weights: the cost of the work without the grouping.
pub fn dense_gemm(gpu: &Gpu, rows: usize, hidden: usize, inter: usize, iters: usize) -> Result<GemmTiming> {
    let (gate_up, down) = (filled(gpu, 2 * inter * hidden)?, filled(gpu, hidden * inter)?);
    let x = filled(gpu, rows * hidden)?;
    let act = filled(gpu, rows * inter)?;
    let mut gu = gpu.stream.alloc_zeros::<f32>(rows * 2 * inter).map_err(driver)?;
    let mut y = gpu.stream.alloc_zeros::<f32>(rows * hidden).map_err(driver)?;
    let seconds = time(gpu, iters, || {
        gemm_bf16_f32(gpu, &gate_up, &x, 0, &mut gu, 0, linear(2 * inter, rows, hidden), false)?;
        gemm_bf16_f32(gpu, &down, &act, 0, &mut y, 0, linear(hidden, rows, inter), false)
    })?;
    let flops = 2.0 * rows as f64 * 3.0 * (hidden * inter) as f64;
    Ok(GemmTiming { rows, seconds, tflops: flops / seconds / 1e12 })
}

/// A large square GEMM (`n`³, bf16 in, fp32 out): what cuBLAS reaches on this card.
pub fn square_gemm(gpu: &Gpu, n: usize, iters: usize) -> Result<GemmTiming> {
    let (w, x) = (filled(gpu, n * n)?, filled(gpu, n * n)?);
    let mut c = gpu.stream.alloc_zeros::<f32>(n * n).map_err(driver)?;
    let seconds = time(gpu, iters, || gemm_bf16_f32(gpu, &w, &x, 0, &mut c, 0, linear(n, n, n), false))?;
    Ok(GemmTiming { rows: n, seconds, tflops: 2.0 * (n as f64).powi(3) / seconds / 1e12 })
}

/// Device-to-device copy bandwidth in bytes per second (each byte read once and written once, counted twice).
pub fn copy_bandwidth(gpu: &Gpu, bytes: usize, iters: usize) -> Result<f64> {
    let src = gpu.stream.alloc_zeros::<u8>(bytes).map_err(driver)?;
    let mut dst = gpu.stream.alloc_zeros::<u8>(bytes).map_err(driver)?;
    let seconds = time(gpu, iters, || gpu.stream.memcpy_dtod(&src, &mut dst).map_err(driver))?;
    Ok(2.0 * bytes as f64 / seconds)
}
