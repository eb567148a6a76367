//! The CUDA backend (cudarc: driver, cuBLAS, NVRTC, NCCL), behind feature `cuda`, building on machines without CUDA.
//!
//! Not built yet: the model engine (moe-model) comes first; this crate is filled in by its own issue.
