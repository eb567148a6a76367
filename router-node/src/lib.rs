//! The router node: everything per sequence (embeddings, attention, gating, the shared expert, sampling) with the
//! routed experts on expert nodes reached over gRPC ([`RemoteExperts`]), a continuous-batching engine ([`engine`]) and
//! the OpenAI-compatible HTTP API ([`http`]).

pub mod cluster;
pub mod engine;
pub mod guide;
pub mod http;
pub mod metrics;
pub mod output;
pub mod prefix;
pub mod remote;
pub mod server;

pub use remote::{RemoteExperts, RemoteOptions, RemoteStats, StepInterest};

/// Errors of the router node.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("expert node {addr} is unreachable: {message}")]
    Unreachable { addr: String, message: String },
    #[error("expert node {addr} does not fit this router: {message}")]
    Mismatch { addr: String, message: String },
    #[error("placement: {0}")]
    Placement(String),
    #[error(transparent)]
    Model(#[from] moe_model::ModelError),
    #[error(transparent)]
    Device(#[from] moe_cuda::CudaError),
    #[error("serving HTTP: {0}")]
    Serve(#[source] std::io::Error),
}
