//! Protocol buffers for the router-to-expert data plane (ExpertService), generated at build time with protox + tonic-prost-build.
//!
//! Not built yet: the model engine (moe-model) comes first; this crate is filled in by its own issue.
