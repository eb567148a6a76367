//! CPU kernels: bf16-weight matmul and the elementwise and normalisation operations of the model, all computed in
//! f32.

pub mod matmul;
pub mod ops;
pub mod probe;
