//! Where a node's experts live: host memory ([`LocalExperts`]) or the node's CUDA GPUs (`moe_cuda::CudaExperts`,
//! feature `cuda`). The node sees one interface whichever it is.

use moe_model::{Checkpoint, Experts, LocalExperts, ModelConfig, ShardChange};

use crate::NodeError;

/// The experts a node holds, on the device it was started with.
#[derive(Debug)]
pub enum Shard {
    Cpu(LocalExperts),
    #[cfg(feature = "cuda")]
    Cuda(moe_cuda::CudaExperts),
}

impl Shard {
    /// An empty shard on `device`: for CUDA this opens the GPUs and compiles the kernels (fails with one line when
    /// there is no GPU or a library is missing).
    pub fn empty(config: &ModelConfig, device: &moe_cuda::Device) -> Result<Self, NodeError> {
        match device {
            moe_cuda::Device::Cpu => Ok(Shard::Cpu(LocalExperts::empty(config))),
            #[cfg(feature = "cuda")]
            moe_cuda::Device::Cuda(ordinals) => Ok(Shard::Cuda(moe_cuda::CudaExperts::new(config, ordinals)?)),
            #[cfg(not(feature = "cuda"))]
            moe_cuda::Device::Cuda(_) => Err(moe_cuda::CudaError::NotBuilt.into()),
        }
    }

    pub fn experts(&self) -> &dyn Experts {
        match self {
            Shard::Cpu(x) => x,
            #[cfg(feature = "cuda")]
            Shard::Cuda(x) => x,
        }
    }

    pub fn load_more(
        &self,
        ckpt: &Checkpoint,
        config: &ModelConfig,
        select: impl Fn(usize, usize) -> bool + Sync,
    ) -> Result<ShardChange, NodeError> {
        match self {
            Shard::Cpu(x) => Ok(x.load_more(ckpt, config, select)?),
            #[cfg(feature = "cuda")]
            Shard::Cuda(x) => Ok(x.load_more(ckpt, config, select)?),
        }
    }

    pub fn unload(&self, select: impl Fn(usize, usize) -> bool) -> ShardChange {
        match self {
            Shard::Cpu(x) => x.unload(select),
            #[cfg(feature = "cuda")]
            Shard::Cuda(x) => x.unload(select),
        }
    }

    pub fn is_loaded(&self, layer: usize, expert: usize) -> bool {
        match self {
            Shard::Cpu(x) => x.is_loaded(layer, expert),
            #[cfg(feature = "cuda")]
            Shard::Cuda(x) => x.is_loaded(layer, expert),
        }
    }

    pub fn hosted(&self) -> Vec<(usize, Vec<u32>)> {
        match self {
            Shard::Cpu(x) => x.hosted(),
            #[cfg(feature = "cuda")]
            Shard::Cuda(x) => x.hosted(),
        }
    }

    /// `cpu`, or a description of each GPU.
    pub fn devices(&self) -> Vec<String> {
        match self {
            Shard::Cpu(_) => vec!["cpu".into()],
            #[cfg(feature = "cuda")]
            Shard::Cuda(x) => x.devices().iter().map(ToString::to_string).collect(),
        }
    }

    /// Bytes free on the GPUs together when they were opened; `None` on the CPU.
    pub fn device_memory(&self) -> Option<u64> {
        match self {
            Shard::Cpu(_) => None,
            #[cfg(feature = "cuda")]
            Shard::Cuda(x) => Some(x.devices().iter().map(|d| d.free_bytes as u64).sum()),
        }
    }

    pub fn resident_bytes(&self) -> usize {
        match self {
            Shard::Cpu(x) => x.resident_bytes(),
            #[cfg(feature = "cuda")]
            Shard::Cuda(x) => x.resident_bytes(),
        }
    }
}
