//! Expert placement: the PlacementStore trait with etcd and in-memory implementations, node registry and leases, placement epochs and the balancer.
//!
//! Not built yet: the model engine (moe-model) comes first; this crate is filled in by its own issue.
