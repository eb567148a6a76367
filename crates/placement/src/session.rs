//! A member's lease and the keys it keeps alive: registration, readiness, load.
//!
//! The session renews its lease every third of the TTL. If the lease is lost anyway (etcd was unreachable for
//! longer than the TTL, or restarted), it takes a new one and writes its keys again, so a member that comes back
//! from a partition re-registers by itself. A process that dies stops renewing, and its keys vanish within the TTL.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;

use crate::cluster::{Cluster, Member};
use crate::store::{LeaseId, Result, StoreError};

/// The default lease TTL of members.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3);

pub struct Session {
    cluster: Cluster,
    inner: Arc<Inner>,
    keeper: JoinHandle<()>,
}

struct Inner {
    lease: AtomicI64,
    ttl: Duration,
    /// Keys written through the session, to write again under a new lease.
    keys: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session(lease {:x}, ttl {:?})", self.lease(), self.inner.ttl)
    }
}

impl Session {
    /// Takes a lease of `ttl` and starts renewing it (must be called inside a tokio runtime).
    pub async fn start(cluster: Cluster, ttl: Duration) -> Result<Session> {
        let lease = cluster.store().grant(ttl).await?;
        let inner = Arc::new(Inner { lease: AtomicI64::new(lease), ttl, keys: Mutex::new(BTreeMap::new()) });
        let keeper = tokio::spawn(keep(cluster.clone(), inner.clone()));
        Ok(Session { cluster, inner, keeper })
    }

    /// Registers `member` under the session's lease. An id another live member holds is refused: a member that
    /// just died (its lease not yet expired) is waited for, up to twice the TTL, before the id counts as taken.
    pub async fn register(cluster: Cluster, member: &Member, ttl: Duration) -> Result<Session> {
        let session = Session::start(cluster, ttl).await?;
        let rest = format!("members/{}", member.id);
        let key = session.cluster.key(&rest);
        let bytes = Cluster::encode(member);
        let patience = tokio::time::Instant::now() + 2 * ttl.max(Duration::from_secs(1));
        loop {
            let store = session.cluster.store();
            if store.compare_and_put(&key, crate::store::Expect::Absent, bytes.clone(), Some(session.lease())).await? {
                break;
            }
            if tokio::time::Instant::now() >= patience {
                let holder = store
                    .get_prefix(&key)
                    .await?
                    .into_iter()
                    .find(|(k, _)| *k == key)
                    .and_then(|(_, v)| serde_json::from_slice::<Member>(&v).ok())
                    .map_or_else(|| "another member".to_owned(), |m| format!("the member at {}", m.addr));
                let _ = session.cluster.store().revoke(session.lease()).await;
                return Err(StoreError::Invalid(format!(
                    "member id {:?} is already taken by {holder}; give each member its own id (--node-id)",
                    member.id
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        session.inner.keys.lock().unwrap_or_else(|p| p.into_inner()).insert(key, bytes);
        Ok(session)
    }

    pub fn lease(&self) -> LeaseId {
        self.inner.lease.load(Ordering::Acquire)
    }

    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Writes `value` (JSON) at `rest` under the cluster prefix, under the lease, and keeps it there.
    pub async fn put<T: Serialize>(&self, rest: &str, value: &T) -> Result<()> {
        let key = self.cluster.key(rest);
        let bytes = Cluster::encode(value);
        self.inner.keys.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), bytes.clone());
        match self.cluster.store().put(&key, bytes, Some(self.lease())).await {
            // The keeper is taking a new lease and will write the key with it.
            Err(StoreError::LeaseExpired(_)) => Ok(()),
            other => other,
        }
    }

    /// Stops renewing without revoking: the keys vanish when the TTL runs out, as if the process had died.
    pub fn abandon(self) {
        self.keeper.abort();
    }

    /// Revokes the lease: the member's keys go at once.
    pub async fn close(self) -> Result<()> {
        self.keeper.abort();
        self.cluster.store().revoke(self.lease()).await
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

async fn keep(cluster: Cluster, inner: Arc<Inner>) {
    let period = (inner.ttl / 3).max(Duration::from_millis(200));
    let mut warned = false;
    loop {
        tokio::time::sleep(period).await;
        let lease = inner.lease.load(Ordering::Acquire);
        match cluster.store().keep_alive(lease).await {
            Ok(()) => {
                if warned {
                    tracing::info!("placement store reachable again; lease {lease:x} renewed");
                }
                warned = false;
            }
            Err(StoreError::LeaseExpired(_)) => {
                tracing::warn!("lease {lease:x} expired; registering again");
                let Ok(fresh) = cluster.store().grant(inner.ttl).await else { continue };
                inner.lease.store(fresh, Ordering::Release);
                let keys = inner.keys.lock().unwrap_or_else(|p| p.into_inner()).clone();
                for (key, value) in keys {
                    if let Err(e) = cluster.store().put(&key, value, Some(fresh)).await {
                        tracing::warn!("writing {key} again: {e}");
                    }
                }
            }
            Err(e) => {
                if !warned {
                    tracing::warn!("renewing lease {lease:x}: {e}; serving on, retrying");
                }
                warned = true;
            }
        }
    }
}
