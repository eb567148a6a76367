//! One CUDA device: its context, stream, cuBLAS handle and compiled kernels; and the library checks of [`probe`].

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream};

use crate::kernels::{self, SOURCES};
use crate::{CudaError, DeviceInfo, Result};

/// The libraries cudarc would panic over, each checked by loading it first.
fn check_libraries(nccl: bool) -> Result<()> {
    // SAFETY: each call only tries to load a shared library by name.
    let present = unsafe {
        [
            (
                "the CUDA driver library (libcuda.so)",
                cudarc::driver::sys::is_culib_present(),
                "no NVIDIA driver on this machine; --device cuda needs a GPU (or use --device cpu)",
            ),
            (
                "cuBLAS (libcublas.so.12)",
                cudarc::cublas::sys::is_culib_present(),
                "install the CUDA 12 runtime libraries or add them to LD_LIBRARY_PATH",
            ),
            (
                "NVRTC (libnvrtc.so.12)",
                cudarc::nvrtc::sys::is_culib_present(),
                "install the CUDA 12 runtime libraries or add them to LD_LIBRARY_PATH",
            ),
        ]
    };
    for (library, found, hint) in present {
        if !found {
            return Err(CudaError::MissingLibrary { library, hint });
        }
    }
    // SAFETY: as above.
    if nccl && !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(CudaError::MissingLibrary {
            library: "NCCL (libnccl.so.2)",
            hint: "several GPUs per node reduce through NCCL: install it or list one device",
        });
    }
    Ok(())
}

fn driver(e: cudarc::driver::DriverError) -> CudaError {
    CudaError::Driver(e.to_string())
}

pub(crate) fn probe(ordinals: &[usize]) -> Result<Vec<DeviceInfo>> {
    check_libraries(ordinals.len() > 1)?;
    let count = CudaContext::device_count().map_err(driver)?.max(0) as usize;
    ordinals
        .iter()
        .map(|&ordinal| {
            if ordinal >= count {
                return Err(CudaError::NoDevice { ordinal, count });
            }
            let ctx = CudaContext::new(ordinal).map_err(driver)?;
            info(&ctx)
        })
        .collect()
}

fn info(ctx: &Arc<CudaContext>) -> Result<DeviceInfo> {
    let (free_bytes, total_bytes) = ctx.mem_get_info().map_err(driver)?;
    Ok(DeviceInfo {
        ordinal: ctx.ordinal(),
        name: ctx.name().map_err(driver)?,
        capability: ctx.compute_capability().map_err(driver)?,
        total_bytes,
        free_bytes,
    })
}

/// A CUDA device ready to compute: one stream, one cuBLAS handle on it, every kernel of [`kernels::SOURCES`].
pub struct Gpu {
    pub info: DeviceInfo,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    functions: HashMap<&'static str, CudaFunction>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).finish_non_exhaustive()
    }
}

impl Gpu {
    /// Opens device `ordinal` (after [`probe`]-ing it) and compiles the kernels for it.
    pub fn open(ordinal: usize) -> Result<Self> {
        let info = probe(&[ordinal])?.remove(0);
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        let stream = ctx.new_stream().map_err(driver)?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| CudaError::Blas(e.to_string()))?;
        let mut functions = HashMap::new();
        for src in SOURCES {
            let ptx = kernels::compile(src, info.capability)?;
            let module = ctx.load_module(ptx).map_err(driver)?;
            for &entry in src.entries {
                functions.insert(entry, module.load_function(entry).map_err(driver)?);
            }
        }
        tracing::info!(device = %info, "CUDA device ready");
        Ok(Gpu { info, ctx, stream, blas, functions })
    }

    /// The kernel `name` (one of the entries of [`kernels::SOURCES`]).
    pub(crate) fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| CudaError::InvalidInput(format!("no kernel named {name}")))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver)
    }
}

pub(crate) fn driver_error(e: cudarc::driver::DriverError) -> CudaError {
    driver(e)
}
