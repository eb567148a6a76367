//! [`PlacementStore`] on etcd v3 (the etcd-client crate): what a cluster of several machines uses.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tokio::sync::{watch, Mutex};

use crate::store::{ttl_secs, Expect, LeaseId, PlacementStore, Result, StoreError};

/// A connection to an etcd cluster. Cheap to share behind an `Arc`; calls run concurrently.
pub struct EtcdStore {
    /// Swapped for a new one when the TLS material changes ([`EtcdStore::rotate`]): calls and re-opened watches
    /// take the current one; streams already open stay on the connection they began on.
    client: Arc<std::sync::RwLock<Client>>,
    endpoints: Vec<String>,
    timeout: Duration,
    /// One keep-alive stream per lease this process renews.
    keepers: Mutex<HashMap<LeaseId, (LeaseKeeper, LeaseKeepAliveStream)>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("endpoints", &self.endpoints).finish()
    }
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A put under a lease etcd no longer has fails with "requested lease not found".
fn lease_or_unavailable(e: etcd_client::Error, lease: Option<LeaseId>) -> StoreError {
    let gone = match &e {
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    };
    match lease {
        Some(id) if gone => StoreError::LeaseExpired(id),
        _ => unavailable(e),
    }
}

/// What a process shows etcd over TLS (PEM text): the CA etcd's certificate must chain to, and this process's
/// certificate and key, which etcd checks with `--client-cert-auth`.
#[derive(Clone)]
pub struct EtcdTls {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    /// The identity the text was read from, when it may be reloaded: a store opened with it reconnects with each
    /// reload ([`EtcdStore::follow`]).
    pub source: Option<Arc<moe_tls::Identity>>,
}

impl EtcdTls {
    /// The PEM files as `identity` last read them; a store opened with this follows its reloads.
    pub fn of(identity: &Arc<moe_tls::Identity>) -> Self {
        let pem = identity.pem();
        EtcdTls { ca: pem.ca, cert: pem.cert, key: pem.key, source: Some(Arc::clone(identity)) }
    }
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdTls { .. }")
    }
}

impl EtcdStore {
    /// Connects to `endpoints` (`host:port` or `http://host:port`); every call is bounded by `timeout`.
    pub async fn connect(endpoints: &[String], timeout: Duration) -> Result<Self> {
        Self::connect_with(endpoints, timeout, None).await
    }

    /// Connects to `endpoints`: `https://host:port` ones over TLS with `tls` (required for them), the others
    /// (`host:port`, `http://host:port`) in plaintext. All of one kind.
    pub async fn connect_with(endpoints: &[String], timeout: Duration, tls: Option<&EtcdTls>) -> Result<Self> {
        let client = connect_client(endpoints, timeout, tls).await?;
        Ok(EtcdStore {
            client: Arc::new(std::sync::RwLock::new(client)),
            endpoints: endpoints.to_vec(),
            timeout,
            keepers: Mutex::new(HashMap::new()),
        })
    }

    /// Connects again with new TLS material (a rotated certificate or CA) and makes that connection the one new
    /// calls use. If etcd does not answer on it, the store keeps the connection it had and says why.
    pub async fn rotate(&self, tls: &EtcdTls) -> Result<()> {
        let fresh = connect_client(&self.endpoints, self.timeout, Some(tls)).await?;
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// Rotates ([`EtcdStore::rotate`]) each time `reloads` changes, with `material()` as it is then, until the
    /// store is dropped or `reloads`' sender is. Only `https://` endpoints use the material.
    pub fn follow(
        self: &Arc<Self>,
        mut reloads: watch::Receiver<u64>,
        material: impl Fn() -> EtcdTls + Send + Sync + 'static,
    ) {
        if !self.endpoints.iter().all(|e| e.starts_with("https://")) {
            return;
        }
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            while reloads.changed().await.is_ok() {
                let Some(store) = store.upgrade() else { return };
                match store.rotate(&material()).await {
                    Ok(()) => {
                        tracing::info!(etcd = %store.endpoints.join(","), "etcd connection renewed with the reloaded certificate")
                    }
                    Err(e) => tracing::error!(
                        "etcd refused the reloaded certificate, the previous connection stays in use: {e}"
                    ),
                }
            }
        });
    }

    fn client(&self) -> Client {
        self.client.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A client of `endpoints` that has answered one read.
async fn connect_client(endpoints: &[String], timeout: Duration, tls: Option<&EtcdTls>) -> Result<Client> {
    if endpoints.is_empty() {
        return Err(StoreError::Invalid("no etcd endpoint given".into()));
    }
    let secure = endpoints.iter().filter(|e| e.starts_with("https://")).count();
    if secure != 0 && secure != endpoints.len() {
        return Err(StoreError::Invalid(format!(
            "etcd endpoints {}: either all https:// or none",
            endpoints.join(",")
        )));
    }
    let mut options = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        .with_keep_alive(Duration::from_secs(2), timeout)
        .with_keep_alive_while_idle(true);
    if secure > 0 {
        let tls = tls.ok_or_else(|| {
            StoreError::Invalid(format!(
                "etcd at {} is https: give this process its TLS files (--tls-cert, --tls-key, --tls-ca)",
                endpoints.join(",")
            ))
        })?;
        options = options.with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca))
                .identity(etcd_client::Identity::from_pem(&tls.cert, &tls.key)),
        );
    } else if tls.is_some() {
        tracing::warn!(etcd = %endpoints.join(","), "etcd is reached in plaintext (give https:// endpoints for TLS)");
    }
    let client = Client::connect(endpoints, Some(options))
        .await
        .map_err(|e| StoreError::Unavailable(format!("cannot reach etcd at {}: {e}", endpoints.join(","))))?;
    // Connecting is lazy: one read proves the endpoints answer.
    client
        .kv_client()
        .get("/", None)
        .await
        .map_err(|e| StoreError::Unavailable(format!("etcd at {} does not answer: {e}", endpoints.join(","))))?;
    Ok(client)
}

#[async_trait]
impl PlacementStore for EtcdStore {
    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        let resp = self.client().lease_client().grant(ttl_secs(ttl), None).await.map_err(unavailable)?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let mut keepers = self.keepers.lock().await;
        let (keeper, stream) = match keepers.entry(lease) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let pair = self
                    .client()
                    .lease_client()
                    .keep_alive(lease)
                    .await
                    .map_err(|err| lease_or_unavailable(err, Some(lease)))?;
                e.insert(pair)
            }
        };
        let answer = async {
            keeper.keep_alive().await?;
            stream.message().await
        }
        .await;
        match answer {
            Ok(Some(resp)) if resp.ttl() > 0 => Ok(()),
            Ok(_) => {
                keepers.remove(&lease);
                Err(StoreError::LeaseExpired(lease))
            }
            Err(e) => {
                // A broken stream is opened again on the next call.
                keepers.remove(&lease);
                Err(lease_or_unavailable(e, Some(lease)))
            }
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.keepers.lock().await.remove(&lease);
        match self.client().lease_client().revoke(lease).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("lease not found") => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let resp =
            self.client().kv_client().get(prefix, Some(GetOptions::new().with_prefix())).await.map_err(unavailable)?;
        resp.kvs()
            .iter()
            .map(|kv| {
                let key = kv.key_str().map_err(|e| StoreError::Corrupt {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    message: format!("not UTF-8: {e}"),
                })?;
                Ok((key.to_owned(), kv.value().to_vec()))
            })
            .collect()
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<()> {
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        self.client().kv_client().put(key, value, options).await.map_err(|e| lease_or_unavailable(e, lease))?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.client().kv_client().delete(key, None).await.map_err(unavailable)?;
        Ok(())
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expected: Expect<'_>,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<bool> {
        let compare = match expected {
            Expect::Absent => Compare::create_revision(key, CompareOp::Equal, 0),
            Expect::Value(v) => Compare::value(key, CompareOp::Equal, v),
        };
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        let txn = Txn::new().when([compare]).and_then([TxnOp::put(key, value, options)]);
        let resp = self.client().kv_client().txn(txn).await.map_err(|e| lease_or_unavailable(e, lease))?;
        Ok(resp.succeeded())
    }

    async fn compare_and_delete(&self, key: &str, expected: &[u8]) -> Result<bool> {
        let txn =
            Txn::new().when([Compare::value(key, CompareOp::Equal, expected)]).and_then([TxnOp::delete(key, None)]);
        let resp = self.client().kv_client().txn(txn).await.map_err(unavailable)?;
        Ok(resp.succeeded())
    }

    async fn watch(&self, prefix: &str) -> Result<watch::Receiver<u64>> {
        let (tx, rx) = watch::channel(0u64);
        let client = Arc::clone(&self.client);
        let prefix = prefix.to_owned();
        // Re-opens the watch after errors (etcd restarts, partitions) until every receiver is gone.
        tokio::spawn(async move {
            let mut warned = false;
            while !tx.is_closed() {
                // The client current at each (re-)open: after a rotation, the new connection.
                let mut current = client.read().unwrap_or_else(|p| p.into_inner()).clone();
                match current.watch(prefix.as_str(), Some(WatchOptions::new().with_prefix())).await {
                    Ok(mut stream) => {
                        warned = false;
                        // Changes made while the watch was down are picked up by the watchers' re-read.
                        tx.send_modify(|v| *v += 1);
                        loop {
                            tokio::select! {
                                m = stream.message() => match m {
                                    Ok(Some(_)) => tx.send_modify(|v| *v += 1),
                                    Ok(None) | Err(_) => break,
                                },
                                _ = tx.closed() => return,
                            }
                        }
                    }
                    Err(e) if !warned => {
                        warned = true;
                        tracing::warn!("etcd watch on {prefix}: {e}; retrying");
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(rx)
    }

    fn describe(&self) -> String {
        format!("etcd {}", self.endpoints.join(","))
    }
}
