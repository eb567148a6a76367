//! The router node: HTTP API, scheduler, per-layer attention and gating, dispatch to and combine from expert nodes.
//!
//! Not built yet: the model engine (moe-model) comes first; this crate is filled in by its own issue.
