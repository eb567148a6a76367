//! CPU kernels: bf16-weight matmul on the matrix units or in f32, and the elementwise and normalisation operations
//! of the model, computed in f32; the machine probes and the stage profile benchmarks report.

mod allocator;
pub mod matmul;
pub mod ops;
pub mod probe;
pub mod profile;
pub mod simd;

use matmul::{Kernel, Precision, Selection};

/// Sets the number of threads the kernels spread over (the global pool); call once, before any compute.
pub fn set_threads(threads: usize) -> Result<(), rayon::ThreadPoolBuildError> {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()
}

/// The number of compute threads of this process.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Why the CPU options could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("--threads 0: need at least one")]
    ZeroThreads,
    #[error("setting the compute threads: {0}")]
    Threads(#[from] rayon::ThreadPoolBuildError),
    #[error("--matmul-kernel {0:?}: not a kernel (auto, amx-bf16, avx512-bf16, avx512f, avx2+fma, scalar)")]
    UnknownKernel(String),
    #[error(transparent)]
    Kernel(#[from] matmul::SelectError),
}

/// How a process computes on its CPU: its threads and its matmul kernel and precision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuOptions {
    /// Compute threads (`None`: one per core the process may run on).
    pub threads: Option<usize>,
    pub precision: Precision,
    /// `None`: the default kernel for the precision ([`matmul::configure`]).
    pub kernel: Option<Kernel>,
}

impl CpuOptions {
    /// Applies the options to this process: the thread pool, then the kernel, and logs what was chosen. Call once,
    /// before loading a model.
    pub fn apply(&self) -> Result<Selection, CpuError> {
        if let Some(threads) = self.threads {
            if threads == 0 {
                return Err(CpuError::ZeroThreads);
            }
            set_threads(threads)?;
        }
        let selection = matmul::configure(self.kernel, self.precision)?;
        allocator::keep_freed_memory();
        tracing::info!(
            threads = threads(),
            kernel = selection.kernel.name(),
            precision = selection.precision.name(),
            "CPU compute"
        );
        Ok(selection)
    }
}

/// The CPU flags every binary takes.
#[cfg(feature = "cli")]
#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct CpuArgs {
    /// Compute threads [default: every core this process may run on].
    #[arg(long, env = "MOE_THREADS")]
    pub threads: Option<usize>,
    /// Matmul precision: `split` multiplies the bf16 weights by each f32 activation's bf16 high and low parts (two
    /// passes, about 16 significant bits; log-probs stay within 1e-3 of the float32 reference); `bf16` by the
    /// activations rounded to bf16 (one pass, faster, less exact: see the README).
    #[arg(long, env = "MOE_MATMUL_PRECISION", default_value = "split", value_parser = parse_precision)]
    pub matmul_precision: Precision,
    /// Matmul kernel: `auto` (AMX where the CPU and OS allow it, else AVX512-BF16 for `bf16`, else AVX-512F/AVX2),
    /// or one of amx-bf16, avx512-bf16, avx512f, avx2+fma, scalar. Processes that must agree bit for bit (a router
    /// and its expert nodes) should run the same kernel.
    #[arg(long, env = "MOE_MATMUL_KERNEL", default_value = "auto")]
    pub matmul_kernel: String,
}

#[cfg(feature = "cli")]
impl Default for CpuArgs {
    /// As the flags' defaults.
    fn default() -> Self {
        CpuArgs { threads: None, matmul_precision: Precision::Split, matmul_kernel: "auto".into() }
    }
}

#[cfg(feature = "cli")]
fn parse_precision(s: &str) -> Result<Precision, String> {
    Precision::from_name(s).ok_or_else(|| format!("{s:?} is not a precision (split or bf16)"))
}

#[cfg(feature = "cli")]
impl CpuArgs {
    /// The options these flags describe.
    pub fn options(&self) -> Result<CpuOptions, CpuError> {
        let kernel = match self.matmul_kernel.as_str() {
            "auto" => None,
            name => Some(Kernel::from_name(name).ok_or_else(|| CpuError::UnknownKernel(name.to_owned()))?),
        };
        Ok(CpuOptions { threads: self.threads, precision: self.matmul_precision, kernel })
    }

    /// Applies the flags to this process ([`CpuOptions::apply`]).
    pub fn apply(&self) -> Result<Selection, CpuError> {
        self.options()?.apply()
    }
}
