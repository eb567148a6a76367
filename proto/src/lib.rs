//! moe-proto: the router-to-expert data plane (`ExpertService`), generated at build time from `moe/v1/expert.proto`
//! with protox and tonic-prost-build (no `protoc` needed).

#[allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]
pub mod v1 {
    tonic::include_proto!("moe.v1");
}

pub mod codec;

pub use v1::expert_service_client::ExpertServiceClient;
pub use v1::expert_service_server::{ExpertService, ExpertServiceServer};

impl v1::Dtype {
    /// Bytes per element on the wire, or `None` for `DTYPE_UNSPECIFIED`.
    pub fn size(self) -> Option<usize> {
        match self {
            v1::Dtype::Bf16 => Some(2),
            v1::Dtype::F32 => Some(4),
            v1::Dtype::Unspecified => None,
        }
    }
}

impl v1::ExpertSet {
    /// Builds a set from `(layer, experts)` rows.
    pub fn from_rows(rows: impl IntoIterator<Item = (usize, Vec<u32>)>) -> Self {
        v1::ExpertSet {
            layers: rows
                .into_iter()
                .map(|(layer, experts)| v1::LayerExperts { layer: layer as u32, experts })
                .collect(),
        }
    }

    /// Number of (layer, expert) pairs.
    pub fn len(&self) -> usize {
        self.layers.iter().map(|l| l.experts.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
