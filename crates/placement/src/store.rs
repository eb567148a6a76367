//! The storage seam under the cluster's state: a small key-value interface with leases, compare-and-set and change
//! notification, which etcd provides and [`MemoryStore`] imitates in one process.
//!
//! Everything the cluster keeps (membership, placement epochs, readiness, load, the controller's leadership) is
//! written through this trait by [`crate::Cluster`], so the two implementations are interchangeable and one
//! conformance suite (`tests/tests/placement_store.rs`) runs on both.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::watch;

/// A lease: keys written under it vanish when it is revoked or not kept alive within its TTL.
pub type LeaseId = i64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer (etcd down or partitioned): callers keep what they have and try again.
    #[error("the placement store is unavailable: {0}")]
    Unavailable(String),
    #[error("lease {0:x} has expired")]
    LeaseExpired(LeaseId),
    #[error("{key}: {message}")]
    Corrupt { key: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What `compare_and_put` expects to find under the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect<'a> {
    Absent,
    Value(&'a [u8]),
}

/// Key-value storage with leases; see the module documentation. Keys are UTF-8 paths.
#[async_trait]
pub trait PlacementStore: Send + Sync + 'static {
    /// Grants a lease of `ttl` (rounded up to whole seconds, at least one).
    async fn grant(&self, ttl: Duration) -> Result<LeaseId>;
    /// Renews `lease` for another TTL; [`StoreError::LeaseExpired`] once it is gone.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;
    /// Ends `lease` now, deleting its keys.
    async fn revoke(&self, lease: LeaseId) -> Result<()>;
    /// Every key under `prefix` with its value, in key order, read at one revision.
    async fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>>;
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<()>;
    async fn delete(&self, key: &str) -> Result<()>;
    /// Writes `value` only if the key currently holds what `expected` says, in one transaction. `Ok(false)` when
    /// it did not.
    async fn compare_and_put(
        &self,
        key: &str,
        expected: Expect<'_>,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<bool>;
    /// Deletes the key only if it holds `expected`.
    async fn compare_and_delete(&self, key: &str, expected: &[u8]) -> Result<bool>;
    /// A receiver whose value changes (a counter) whenever something under `prefix` may have changed. Best effort:
    /// watchers also re-read on a timer, so a missed notification delays, never loses, a change.
    async fn watch(&self, prefix: &str) -> Result<watch::Receiver<u64>>;
    /// Where the store lives, for logs: `memory` or the etcd endpoints.
    fn describe(&self) -> String;
}

/// The in-memory store: one process's cluster (`moectl up` without `--etcd`, and fast tests). Leases expire on a
/// background thread, so a holder that stops renewing loses its keys as it would on etcd.
#[derive(Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<MemoryState>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryStore")
    }
}

struct MemoryState {
    keys: BTreeMap<String, (Vec<u8>, Option<LeaseId>)>,
    /// Deadline and TTL of each live lease.
    leases: HashMap<LeaseId, (Instant, Duration)>,
    next_lease: LeaseId,
    changes: watch::Sender<u64>,
}

impl MemoryState {
    fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    /// Drops the leases past their deadline and their keys; true if any key went.
    fn expire(&mut self, now: Instant) -> bool {
        let dead: Vec<LeaseId> = self.leases.iter().filter(|(_, (d, _))| *d <= now).map(|(&id, _)| id).collect();
        if dead.is_empty() {
            return false;
        }
        for id in &dead {
            self.leases.remove(id);
        }
        let before = self.keys.len();
        self.keys.retain(|_, (_, lease)| lease.is_none_or(|l| !dead.contains(&l)));
        before != self.keys.len()
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<()> {
        match lease {
            Some(id) if !self.leases.contains_key(&id) => Err(StoreError::LeaseExpired(id)),
            _ => Ok(()),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        let (changes, _) = watch::channel(0);
        let state =
            Arc::new(Mutex::new(MemoryState { keys: BTreeMap::new(), leases: HashMap::new(), next_lease: 1, changes }));
        let weak: Weak<Mutex<MemoryState>> = Arc::downgrade(&state);
        // The reaper ends with the last handle to the store.
        let _ = std::thread::Builder::new().name("memory-store-leases".into()).spawn(move || loop {
            std::thread::sleep(Duration::from_millis(100));
            let Some(state) = weak.upgrade() else { break };
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            if s.expire(Instant::now()) {
                s.changed();
            }
        });
        MemoryStore { state }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.expire(Instant::now()) {
            s.changed();
        }
        s
    }
}

/// Lease TTLs are whole seconds, as on etcd.
pub(crate) fn ttl_secs(ttl: Duration) -> i64 {
    (ttl.as_millis().div_ceil(1000) as i64).max(1)
}

#[async_trait]
impl PlacementStore for MemoryStore {
    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl = Duration::from_secs(ttl_secs(ttl) as u64);
        let mut s = self.lock();
        let id = s.next_lease;
        s.next_lease += 1;
        s.leases.insert(id, (Instant::now() + ttl, ttl));
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let mut s = self.lock();
        let (deadline, ttl) = s.leases.get_mut(&lease).ok_or(StoreError::LeaseExpired(lease))?;
        *deadline = Instant::now() + *ttl;
        Ok(())
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        let mut s = self.lock();
        if s.leases.remove(&lease).is_some() {
            s.keys.retain(|_, (_, l)| *l != Some(lease));
            s.changed();
        }
        Ok(())
    }

    async fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let s = self.lock();
        Ok(s.keys
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect())
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<()> {
        let mut s = self.lock();
        s.check_lease(lease)?;
        s.keys.insert(key.to_owned(), (value, lease));
        s.changed();
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let mut s = self.lock();
        if s.keys.remove(key).is_some() {
            s.changed();
        }
        Ok(())
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expected: Expect<'_>,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<bool> {
        let mut s = self.lock();
        let matches = match (expected, s.keys.get(key)) {
            (Expect::Absent, None) => true,
            (Expect::Value(want), Some((have, _))) => want == have.as_slice(),
            _ => false,
        };
        if !matches {
            return Ok(false);
        }
        s.check_lease(lease)?;
        s.keys.insert(key.to_owned(), (value, lease));
        s.changed();
        Ok(true)
    }

    async fn compare_and_delete(&self, key: &str, expected: &[u8]) -> Result<bool> {
        let mut s = self.lock();
        if s.keys.get(key).is_some_and(|(v, _)| v.as_slice() == expected) {
            s.keys.remove(key);
            s.changed();
            return Ok(true);
        }
        Ok(false)
    }

    async fn watch(&self, _prefix: &str) -> Result<watch::Receiver<u64>> {
        Ok(self.lock().changes.subscribe())
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}
