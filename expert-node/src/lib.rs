//! The expert node: hosts a shard of the routed experts and computes them for batches of token activations that
//! routers stream to it over gRPC (`ExpertService` in moe-proto).
//!
//! [`ExpertNode`] holds the model's expert shard (changeable while serving) in host memory or, with the `cuda` feature
//! and `--device cuda:0,1,...`, on the node's GPUs ([`Shard`]); it checks every request and computes on a single
//! compute thread (whose matmuls spread over all cores on the CPU); [`serve`] runs the gRPC server with the standard
//! health service next to it.

pub mod agent;
pub mod metrics;
pub mod node;
pub mod run;
pub mod service;
pub mod shard;
pub mod spec;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use node::{ExpertNode, Refusal};
pub use run::{ClusterConfig, NodeConfig};
pub use service::{bind, serve, ServeOptions, DEFAULT_MAX_MESSAGE_BYTES};
pub use shard::Shard;
pub use spec::{ExpertSpec, SpecError};

/// Errors of an expert node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Model(#[from] moe_model::ModelError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Device(#[from] moe_cuda::CudaError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("cannot start the compute thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("gRPC server: {0}")]
    Transport(String),
    #[error("cluster: {0}")]
    Cluster(#[from] moe_placement::StoreError),
    #[error("{0}")]
    Config(String),
    #[error("the experts assigned to this node could not be loaded (the error is logged above); it left the cluster")]
    Unfit,
}
