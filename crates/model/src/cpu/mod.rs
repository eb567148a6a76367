//! CPU kernels: bf16-weight matmul and the elementwise and normalisation operations of the model, all computed in
//! f32.

pub mod matmul;
pub mod ops;
pub mod probe;

/// Sets the number of threads the kernels spread over (the global pool); call once, before any compute.
pub fn set_threads(threads: usize) -> Result<(), rayon::ThreadPoolBuildError> {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()
}
