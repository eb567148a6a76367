//! The expert node's `Forward` request: protobuf decoding, the node's checks, and the compute of what passes them.

use std::sync::OnceLock;

use expert_node::{ExpertNode, ExpertSpec};
use moe_model::Residency;
use moe_proto::v1::{forward_response, Dtype, ErrorCode, ForwardRequest, Reduce};
use prost::Message;

use crate::{fixture, fixture_dir};

fn node() -> &'static ExpertNode {
    static NODE: OnceLock<ExpertNode> = OnceLock::new();
    NODE.get_or_init(|| {
        let node = ExpertNode::load(
            &fixture_dir(),
            &ExpertSpec::all(),
            &moe_cuda::Device::Cpu,
            Residency::Resident,
            "fuzz".into(),
            expert_node::DEFAULT_MAX_MESSAGE_BYTES,
            &|_| {},
        );
        fixture("expert node", node)
    })
}

/// One `ForwardRequest` as its protobuf bytes. A request the node refuses is the caller's fault (never `INTERNAL`);
/// one it computes gets one sum per token and hidden unit, or with `REDUCE_PAIR` one row per routing pair.
pub fn forward(data: &[u8]) {
    let Ok(req) = ForwardRequest::decode(data) else { return };
    let node = node();
    match node.forward(&req) {
        Err(refusal) => assert_ne!(refusal.code, ErrorCode::Internal, "the node failed a request: {}", refusal.message),
        Ok(resp) => {
            let Some(forward_response::Result::Sums(sums)) = resp.result else {
                panic!("a computed request got no sums")
            };
            let size = if req.dtype == Dtype::Bf16 as i32 { 2 } else { 4 };
            let rows = match Reduce::try_from(req.reduce) {
                Ok(Reduce::Pair) => req.routing.as_ref().map_or(0, |r| r.experts.len()),
                _ => req.num_tokens as usize,
            };
            let expected = rows * node.config().hidden_size * size;
            assert_eq!(sums.sums.len(), expected, "sums of the wrong size");
        }
    }
}
