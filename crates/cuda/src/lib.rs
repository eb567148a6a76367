//! The CUDA backend: routed experts on the GPUs of an expert node, and the router's layers on a GPU.
//!
//! Everything that touches CUDA sits behind the `cuda` feature and is written with cudarc, which loads the driver,
//! cuBLAS, NVRTC and NCCL only when they are first used. A build with the feature therefore needs no toolkit, and a
//! binary built with it runs on machines without a GPU as long as `--device cuda` is not asked for; when it is,
//! [`probe`] looks for each library *before* cudarc does (cudarc panics when one is missing) and says which one is
//! absent, in one line.
//!
//! - [`Device`] parses `--device` (`cpu`, `cuda`, `cuda:0,1,...`); it is here without the feature so that every
//!   binary accepts the same spelling and refuses CUDA in the same words.
//! - [`kernels`] holds the CUDA C sources (`kernels/*.cu`), compiled at start-up with NVRTC for the card's
//!   architecture (`compute_90`, JIT-ed to sm_90 on Hopper).
//! - `CudaExperts` (feature `cuda`) implements the model's [`moe_model::Experts`] seam: weights uploaded once as
//!   bf16, the rows routed to each expert gathered into one matrix, cuBLAS GEMMs with fp32 accumulation per expert,
//!   SwiGLU and the weighted combine as kernels, and on several GPUs an NCCL reduction to one partial sum per token.
//! - `ops` (feature `cuda`) launches the other kernels: both RMSNorms, partial RoPE, softmax/top-k, the causal conv,
//!   the gated delta rule (recurrent and chunked) and attention over a paged KV cache.
//! - `CudaModel` (feature `cuda`) is a [`moe_model::Decoder`]: the router's layers, their weights and every
//!   sequence's state on one GPU, with the routed experts behind the same seam as on the CPU.
//! - [`plan`] is the host side of a grouped expert pass (row split, combine lists, GEMM layout), in plain Rust so that
//!   it is tested everywhere; `bench` (feature `cuda`) holds the measurements of `moectl bench-cuda`.

pub mod kernels;
pub mod plan;

#[cfg(feature = "cuda")]
pub mod bench;
#[cfg(feature = "cuda")]
mod experts;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
mod model;
#[cfg(feature = "cuda")]
pub mod ops;

#[cfg(feature = "cuda")]
pub use experts::CudaExperts;
#[cfg(feature = "cuda")]
pub use gpu::Gpu;
#[cfg(feature = "cuda")]
pub use model::{CudaModel, GpuSequence};

/// Where a process computes, as given to `--device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// CUDA devices by ordinal, in the order given, without repeats.
    Cuda(Vec<usize>),
}

impl std::str::FromStr for Device {
    type Err = CudaError;

    /// `cpu`, `cuda` (device 0) or `cuda:0,1,...`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| CudaError::BadDevice { given: s.to_owned(), why };
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(vec![0])),
            _ => {
                let list = s.strip_prefix("cuda:").ok_or_else(|| bad("expected `cpu` or `cuda[:0,1,...]`".into()))?;
                let mut ordinals = Vec::new();
                for part in list.split(',') {
                    let n: usize = part.trim().parse().map_err(|_| bad(format!("`{part}` is not a device number")))?;
                    if ordinals.contains(&n) {
                        return Err(bad(format!("device {n} is listed twice")));
                    }
                    ordinals.push(n);
                }
                Ok(Device::Cuda(ordinals))
            }
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(list) => {
                let list: Vec<String> = list.iter().map(usize::to_string).collect();
                write!(f, "cuda:{}", list.join(","))
            }
        }
    }
}

/// One CUDA device as found by [`probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (9, 0 on Hopper).
    pub capability: (i32, i32),
    pub total_bytes: usize,
    pub free_bytes: usize,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        write!(
            f,
            "cuda:{} {} (sm_{}{}, {:.1} GiB, {:.1} GiB free)",
            self.ordinal,
            self.name,
            self.capability.0,
            self.capability.1,
            gib(self.total_bytes),
            gib(self.free_bytes)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("--device {given}: {why}")]
    BadDevice { given: String, why: String },
    #[error("this build has no CUDA backend (build with `--features cuda`)")]
    NotBuilt,
    #[error("{library} was not found: {hint}")]
    MissingLibrary { library: &'static str, hint: &'static str },
    #[error("no CUDA device {ordinal}: this machine has {count}")]
    NoDevice { ordinal: usize, count: usize },
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("cuBLAS: {0}")]
    Blas(String),
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error("NVRTC could not compile {source_name}: {log}")]
    Compile { source_name: &'static str, log: String },
    #[error("{0}")]
    InvalidInput(String),
    #[error(transparent)]
    Model(#[from] moe_model::ModelError),
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;

/// Checks that the CUDA libraries are present and that every device in `ordinals` exists, without ever letting
/// cudarc panic on a missing library; returns what was found. Fails with [`CudaError::NotBuilt`] in builds without
/// the `cuda` feature.
pub fn probe(ordinals: &[usize]) -> Result<Vec<DeviceInfo>> {
    #[cfg(feature = "cuda")]
    {
        gpu::probe(ordinals)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinals;
        Err(CudaError::NotBuilt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_spellings() {
        assert_eq!("cpu".parse::<Device>().ok(), Some(Device::Cpu));
        assert_eq!("cuda".parse::<Device>().ok(), Some(Device::Cuda(vec![0])));
        assert_eq!("cuda:2,0, 1".parse::<Device>().ok(), Some(Device::Cuda(vec![2, 0, 1])));
        assert_eq!(Device::Cuda(vec![0, 3]).to_string(), "cuda:0,3");
        for bad in ["gpu", "cuda:", "cuda:a", "cuda:0,0", "cuda:-1", "CPU"] {
            let err = bad.parse::<Device>().err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.starts_with(&format!("--device {bad}: ")), "{bad}: {err}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn probe_without_the_feature_says_so() {
        let err = probe(&[0]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
