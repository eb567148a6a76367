//! A router in a cluster: it registers, stands for election as the placement controller, switches its experts to
//! each placement epoch once every node of the epoch has loaded it, and publishes the load it routes.

use std::sync::Arc;
use std::time::Duration;

use moe_model::ModelConfig;
use moe_placement::controller::{self, ControllerOptions};
use moe_placement::{Cluster, LoadWindow, Member, ModelShape, Session};

/// Load reports cover this many publishing periods (30 s with the default 5 s period).
pub const LOAD_PERIODS: usize = 6;
use tokio::task::JoinHandle;

use crate::remote::RemoteExperts;

/// How a router takes part in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `host:port[,host:port...]` of etcd; `None`: the in-memory store of this process (`moectl up`).
    pub etcd: Option<String>,
    pub cluster: String,
    pub lease_ttl: Duration,
    /// How often routed-token counts are published.
    pub load_window: Duration,
    /// Stand for election as the placement controller.
    pub controller: bool,
    /// What this router shows an `https://` etcd.
    pub etcd_tls: Option<moe_placement::EtcdTls>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            etcd: None,
            cluster: "default".into(),
            lease_ttl: moe_placement::DEFAULT_TTL,
            load_window: Duration::from_secs(5),
            controller: true,
            etcd_tls: None,
        }
    }
}

/// What the controller needs to know of a model.
pub fn model_shape(name: &str, config: &ModelConfig, fingerprint: u64) -> ModelShape {
    ModelShape {
        name: name.to_owned(),
        fingerprint,
        moe_layers: (0..config.num_hidden_layers).filter(|&l| config.is_moe_layer(l)).map(|l| l as u32).collect(),
        num_experts: config.num_experts as u32,
        expert_bytes: config.routed_expert_bytes() as u64,
    }
}

/// The router's membership; its tasks stop and its lease is revoked on [`Membership::leave`].
pub struct Membership {
    session: Arc<Session>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership").field("session", &self.session).finish()
    }
}

impl Membership {
    /// Leaves the cluster at once: the controller role (if held) and the router's keys go with its lease.
    pub async fn leave(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(session) = Arc::into_inner(self.session) {
            if let Err(e) = session.close().await {
                tracing::warn!("leaving the cluster: {e}");
            }
        }
    }
}

/// Joins `cluster` as the router `member` and starts following its placement (inside a tokio runtime).
pub async fn join(
    cluster: Cluster,
    member: Member,
    remote: Arc<RemoteExperts>,
    config: ModelConfig,
    shape: ModelShape,
    options: &ClusterOptions,
) -> Result<Membership, moe_placement::StoreError> {
    let session = Arc::new(Session::register(cluster.clone(), &member, options.lease_ttl).await?);
    tracing::info!(cluster = %cluster.name(), store = %cluster.store().describe(), id = %member.id, "joined the cluster");
    let mut tasks = Vec::new();
    if options.controller {
        let (session, id, shape) = (session.clone(), member.id.clone(), shape.clone());
        tasks.push(tokio::spawn(
            async move { controller::run(&session, &id, shape, ControllerOptions::default()).await },
        ));
    }
    {
        let (session, id, remote) = (session.clone(), member.id.clone(), remote.clone());
        tasks.push(tokio::spawn(async move { follow(session, id, remote, config).await }));
    }
    {
        let (session, id, window) = (session.clone(), member.id.clone(), options.load_window);
        tasks.push(tokio::spawn(async move { publish_load(session, id, remote, shape, window).await }));
    }
    Ok(Membership { session, tasks })
}

/// Switches the router's experts to the newest epoch as soon as all its nodes report it loaded.
async fn follow(session: Arc<Session>, id: String, remote: Arc<RemoteExperts>, config: ModelConfig) {
    let cluster = session.cluster().clone();
    let (_idle, idle) = tokio::sync::watch::channel(0u64);
    let mut changes = cluster.changes().await.unwrap_or_else(|_| idle.clone());
    let mut failing: Option<u64> = None;
    loop {
        match cluster.snapshot().await {
            Ok(view) => {
                *remote.cluster_view.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(view.clone()));
                if let Some(p) = view.placement.as_ref().filter(|p| p.epoch > remote.epoch() && view.is_ready(p)) {
                    match remote.switch(p, &config).await {
                        Ok(()) => {
                            failing = None;
                            if let Err(e) = session.put(&format!("using/{id}"), &p.epoch).await {
                                tracing::warn!("reporting epoch {}: {e}", p.epoch);
                            }
                        }
                        Err(e) if failing != Some(p.epoch) => {
                            failing = Some(p.epoch);
                            tracing::warn!("cannot switch to placement epoch {}: {e}; retrying", p.epoch);
                        }
                        Err(_) => {}
                    }
                }
            }
            Err(e) => tracing::warn!("reading the cluster: {e}; serving on the current placement"),
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { changes = idle.clone() },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Publishes the tokens routed to each expert over every window.
async fn publish_load(
    session: Arc<Session>,
    id: String,
    remote: Arc<RemoteExperts>,
    shape: ModelShape,
    window: Duration,
) {
    let mut recent = LoadWindow::new(LOAD_PERIODS);
    let mut tick = tokio::time::interval(window);
    tick.tick().await;
    let mut last = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let report = recent.push(remote.take_load(&shape.moe_layers), last.elapsed().as_secs_f64());
        last = tokio::time::Instant::now();
        if let Err(e) = session.put(&format!("load/{id}"), &report).await {
            tracing::warn!("publishing load: {e}");
        }
    }
}

/// Opens the store `join` names, registers this router as `id` serving HTTP at `addr`, and joins.
pub async fn join_prepared(
    prepared: crate::server::ClusterJoin,
    id: String,
    addr: String,
) -> Result<Membership, moe_placement::StoreError> {
    let store =
        moe_placement::open_store_with(prepared.options.etcd.as_deref(), prepared.options.etcd_tls.as_ref()).await?;
    let cluster = Cluster::new(store, &prepared.options.cluster)?;
    let member = Member {
        id,
        role: moe_placement::Role::Router,
        addr,
        devices: vec!["cpu".into()],
        memory_bytes: 0,
        fingerprint: prepared.shape.fingerprint,
        version: env!("CARGO_PKG_VERSION").into(),
        started_unix_ms: moe_placement::unix_ms(),
    };
    let crate::server::ClusterJoin { remote, config, shape, options } = prepared;
    join(cluster, member, remote, config, shape, &options).await
}
