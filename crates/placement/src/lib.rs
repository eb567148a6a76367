//! Expert placement: where every routed expert lives, how that changes, and who decides.
//!
//! - [`store`]: the [`PlacementStore`] seam (leases, compare-and-set, change notification) with [`MemoryStore`];
//!   [`etcd`] implements it on etcd v3.
//! - [`cluster`]: the cluster's typed state in the store: members, placement epochs, readiness, load, drains.
//! - [`session`]: a member's lease and the keys it keeps alive.
//! - [`controller`]: the elected controller that writes placement epochs.
//! - [`balance`]: the pure balancer (EPLB-style replication and packing).

pub mod balance;
pub mod cluster;
pub mod controller;
pub mod etcd;
pub mod session;
pub mod store;

pub use balance::{balance, contiguous, Assignment, BalanceError, NodeCapacity};
pub use cluster::{
    default_member_id, unix_ms, Cluster, ClusterView, ControlRequest, LoadReport, LoadWindow, Member, ModelShape,
    Outcome, PlacedNode, Placement, RequestKind, Role,
};
pub use etcd::{EtcdStore, EtcdTls};
pub use session::{Session, DEFAULT_TTL};
pub use store::{Expect, LeaseId, MemoryStore, PlacementStore, StoreError};

use std::sync::Arc;
use std::time::Duration;

/// Opens the store an operator named: `memory` (this process only) or etcd endpoints, comma-separated.
pub async fn open_store(etcd: Option<&str>) -> Result<Arc<dyn PlacementStore>, StoreError> {
    open_store_with(etcd, None).await
}

/// [`open_store`] with the TLS material used for `https://` etcd endpoints. Material read from an identity
/// ([`EtcdTls::of`]) is followed: each reload of its files makes new calls go over a new connection with it.
pub async fn open_store_with(etcd: Option<&str>, tls: Option<&EtcdTls>) -> Result<Arc<dyn PlacementStore>, StoreError> {
    match etcd {
        None => Ok(Arc::new(MemoryStore::new())),
        Some(list) => {
            let endpoints: Vec<String> =
                list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
            let store = Arc::new(EtcdStore::connect_with(&endpoints, Duration::from_secs(5), tls).await?);
            if let Some(identity) = tls.and_then(|t| t.source.clone()) {
                let reloads = identity.reloads();
                store.follow(reloads, move || EtcdTls::of(&identity));
            }
            Ok(store)
        }
    }
}
