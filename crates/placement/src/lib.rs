//! Expert placement: the balancer that decides which node hosts which replicas of which expert.
//!
//! The `PlacementStore` trait with its etcd and in-memory implementations, the node registry with leases and the
//! placement epochs come with the placement issue; [`balance`] is the pure part, usable (and tested) on its own.

pub mod balance;

pub use balance::{balance, contiguous, Assignment, BalanceError, NodeCapacity};
