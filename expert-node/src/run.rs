//! An expert node's whole life as library functions, so that the binary is argument parsing and tests can run
//! nodes in-process: [`load`] its experts, then [`run`] it (serve; with a cluster, register, follow the placement
//! epochs and drain) until the shutdown future resolves, with every step after it bounded.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_model::Residency;
use tokio::net::TcpListener;

use crate::agent::{self, AgentOptions};
use crate::{ExpertNode, ExpertSpec, NodeError, ServeOptions};

/// What an expert node is and how it serves.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Model directory: config.json and the safetensors checkpoint.
    pub model: PathBuf,
    /// The experts to host [default: all, or none in a cluster, whose controller assigns them].
    pub experts: Option<ExpertSpec>,
    pub device: moe_cuda::Device,
    pub residency: Residency,
    /// [default: `expert-HOSTNAME-PORT`]
    pub node_id: Option<String>,
    pub serve: ServeOptions,
    /// After the shutdown signal (and, in a cluster, the drain): how long open streams may take to finish.
    pub grace: Duration,
    /// Membership of a cluster in etcd, if any.
    pub cluster: Option<ClusterConfig>,
}

/// How a node takes part in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// etcd endpoints, `host:port[,host:port...]`.
    pub etcd: String,
    pub name: String,
    /// Where routers reach this node [default: the address it listens on].
    pub advertise: Option<String>,
    /// Memory offered for experts [default: 90% of the GPUs' free memory, or 80% of the memory available].
    pub memory_bytes: Option<u64>,
    pub lease_ttl: Duration,
    /// The longest a drain waits for the node's experts to move (also when etcd does not answer).
    pub drain_timeout: Duration,
    /// What the node shows an `https://` etcd.
    pub etcd_tls: Option<moe_placement::EtcdTls>,
}

/// Loads the experts the node starts with (blocking: reads the checkpoint), logging progress. `addr` is where the
/// node listens, for its default id.
pub fn load(config: &NodeConfig, addr: SocketAddr) -> Result<Arc<ExpertNode>, NodeError> {
    let node_id = config.node_id.clone().unwrap_or_else(|| moe_placement::default_member_id("expert", addr.port()));
    let spec = match (&config.experts, &config.cluster) {
        (Some(spec), _) => spec.clone(),
        (None, Some(_)) => ExpertSpec::none(),
        (None, None) => ExpertSpec::all(),
    };
    tracing::info!(model = %config.model.display(), experts = %spec, %node_id, "loading experts");
    let started = Instant::now();
    let last = std::sync::Mutex::new(Instant::now());
    let progress = |bytes: u64| {
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= Duration::from_secs(2) {
            *last = Instant::now();
            tracing::info!("loading: {:.2} GiB read", bytes as f64 / (1u64 << 30) as f64);
        }
    };
    let max_message = config.serve.max_message_bytes;
    let node =
        ExpertNode::load(&config.model, &spec, &config.device, config.residency, node_id, max_message, &progress)?;
    tracing::info!(
        experts = node.hosted().len(),
        resident_gib = node.resident_bytes() as f64 / (1u64 << 30) as f64,
        elapsed = ?started.elapsed(),
        "experts loaded"
    );
    Ok(Arc::new(node))
}

/// Serves `node` on `listener` until `shutdown` resolves; in a cluster, registers first and, on shutdown, drains
/// (for at most the drain timeout), then lets open streams finish (for at most the grace period) and leaves.
pub async fn run(
    config: NodeConfig,
    node: Arc<ExpertNode>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let addr = listener.local_addr().map_err(|e| NodeError::Bind(([0, 0, 0, 0], 0).into(), e))?;
    tracing::info!(%addr, "serving moe.v1.ExpertService");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut serve = config.serve.clone();
    if serve.memory_limit.is_none() {
        serve.memory_limit = Some(memory_offer(&node, config.cluster.as_ref().and_then(|c| c.memory_bytes))?);
    }
    let mut server = tokio::spawn(crate::serve(node.clone(), listener, serve, async {
        let _ = stopped.await;
    }));
    let membership = match &config.cluster {
        Some(c) => Some(join(c, &node, addr).await?),
        None => None,
    };
    tokio::pin!(shutdown);
    let mut unfit = false;
    match &membership {
        Some((session, _)) => {
            let options = AgentOptions {
                drain_timeout: config.cluster.as_ref().map_or(Duration::from_secs(30), |c| c.drain_timeout),
                ..Default::default()
            };
            let follow = agent::follow(node.clone(), session.clone(), options, &mut shutdown);
            tokio::select! {
                departure = follow => {
                    tracing::info!(?departure, "drained; stopping");
                    unfit = departure == agent::Departure::Unfit;
                }
                done = &mut server => return server_ended(done),
            }
        }
        None => {
            tokio::select! {
                _ = &mut shutdown => {}
                done = &mut server => return server_ended(done),
            }
        }
    }
    let _ = stop.send(());
    // Open streams are drained: requests already received are answered. Those still open after the grace period
    // are cut.
    match tokio::time::timeout(config.grace, &mut server).await {
        Ok(done) => server_ended(done)?,
        Err(_) => {
            tracing::info!("streams still open after {:?}; closing them", config.grace);
            server.abort();
        }
    }
    if let Some((session, publisher)) = membership {
        publisher.abort();
        let _ = publisher.await;
        if let Some(session) = Arc::into_inner(session) {
            // With the store down the lease expires by itself; the exit does not wait for it.
            match tokio::time::timeout(Duration::from_secs(3), session.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("leaving the cluster: {e}; the lease expires by itself"),
                Err(_) => tracing::warn!("the store did not answer; leaving with the lease"),
            }
        }
    }
    if unfit {
        return Err(NodeError::Unfit);
    }
    tracing::info!("stopped");
    Ok(())
}

fn server_ended(done: Result<Result<(), NodeError>, tokio::task::JoinError>) -> Result<(), NodeError> {
    done.map_err(|e| NodeError::Transport(format!("the server task failed: {e}")))?
}

/// Registers the node in its cluster and starts publishing what it serves.
async fn join(
    c: &ClusterConfig,
    node: &Arc<ExpertNode>,
    addr: SocketAddr,
) -> Result<(Arc<moe_placement::Session>, tokio::task::JoinHandle<()>), NodeError> {
    use moe_placement::{Cluster, Member, Role, Session};
    let store = moe_placement::open_store_with(Some(&c.etcd), c.etcd_tls.as_ref()).await?;
    let cluster = Cluster::new(store, &c.name)?;
    let memory_bytes = memory_offer(node, c.memory_bytes)?;
    let member = Member {
        id: node.node_id.clone(),
        role: Role::Expert,
        addr: c.advertise.clone().unwrap_or_else(|| addr.to_string()),
        devices: node.devices(),
        memory_bytes,
        fingerprint: node.info().fingerprint,
        version: env!("CARGO_PKG_VERSION").into(),
        started_unix_ms: moe_placement::unix_ms(),
    };
    // A node that starts is meant to serve: a drain mark left from its previous run goes.
    cluster.undrain(&member.id).await?;
    let session = Arc::new(Session::register(cluster.clone(), &member, c.lease_ttl).await?);
    tracing::info!(
        cluster = %c.name, store = %cluster.store().describe(), memory_gib = memory_bytes as f64 / (1u64 << 30) as f64,
        "registered; waiting for the controller to assign experts"
    );
    let publisher = tokio::spawn(agent::publish_served(node.clone(), session.clone(), Duration::from_secs(5)));
    Ok((session, publisher))
}

/// The memory offered for experts: `configured`, else on GPUs 90% of what was free when the devices opened (the
/// rest is for activations and cuBLAS), else what the experts already take plus 80% of the memory available.
fn memory_offer(node: &ExpertNode, configured: Option<u64>) -> Result<u64, NodeError> {
    Ok(match configured {
        Some(b) => b,
        None => match node.device_memory() {
            Some(free) => free / 10 * 9,
            None => node.resident_bytes() + available_memory()? / 5 * 4,
        },
    })
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn available_memory() -> Result<u64, NodeError> {
    let path = PathBuf::from("/proc/meminfo");
    let text = std::fs::read_to_string(&path).map_err(|source| NodeError::Io { path: path.clone(), source })?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib << 10)
        .ok_or_else(|| NodeError::Config("no MemAvailable in /proc/meminfo: give the memory to offer".into()))
}
