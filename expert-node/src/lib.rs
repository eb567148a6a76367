//! The expert node: the ExpertService gRPC server, the expert shard store and device selection.
//!
//! Not built yet: the model engine (moe-model) comes first; this crate is filled in by its own issue.
