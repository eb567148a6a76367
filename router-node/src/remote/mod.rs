//! The router's side of the data plane: routed experts computed on expert nodes over gRPC.
//!
//! [`RemoteExperts`] keeps one long-lived bidirectional `Forward` stream per expert node ([`link`]: one HTTP/2
//! connection each, with keepalive and flow-control windows sized for the payloads) and implements the model's
//! [`Experts`] seam. Per layer and micro-batch it plans the batch over the nodes ([`plan`], a pure function: each
//! token once per node with the (expert, weight) pairs local to that node, replicas chosen by load), sends one
//! message per node chunked under the node's maximum message size, and returns at once; the model computes the
//! shared expert (and, with micro-batches, the next micro-batch's attention) while the nodes work. Waiting
//! ([`pending`]) adds the nodes' partial sums in node order, so a token's result does not depend on how its batch
//! was formed.
//!
//! Faults lose nothing. Every failed piece is classified once ([`outcome`]) and the rule for its failure says where
//! it goes next: to another replica, to the next placement, after a backoff, or (a request this side got wrong) to
//! an error. A piece whose experts have no live replica is **held**: its inputs are kept and the step waits until a
//! placement that hosts those experts is in use (the controller's repair epoch or, with a static placement, the
//! node reconnected with backoff), as long as someone still waits for the step and at most
//! [`RemoteOptions::hold_timeout`].

mod link;
mod outcome;
mod pending;
mod plan;
pub mod series;
mod topology;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use moe_model::{Experts, ModelConfig, ModelError, PendingExperts, Routing};
use moe_proto::v1::{self, Dtype, Reduce, StatusRequest};
use tokio::sync::{mpsc, watch};

use self::link::Link;
use self::pending::{Piece, RemotePending, Work};
use self::topology::Topology;
use crate::RouterError;

/// How the router talks to expert nodes.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Element type of activations and partial sums on the wire. F32 (the default) keeps results equal to the
    /// single-process engine to f32 rounding, so greedy tokens do not change; BF16 halves the bytes but rounds every
    /// activation and partial sum to 8 bits of mantissa, which moves log-probs by up to ~0.1 on the test fixtures and
    /// flips greedy tokens at near-ties.
    pub wire_dtype: Dtype,
    /// How nodes answer: [`Reduce::Pair`] (the default), a row per (token, expert) pair, which the router weighs
    /// and adds in expert order as the single-process engine does, so a token's result is the same bits under any
    /// placement (a move to a replica included); [`Reduce::Token`], a sum per token per node, which makes the answers
    /// top-k / nodes-visited times smaller but groups each token's sum by placement (its last bits follow it).
    pub reduce: Reduce,
    /// Time allowed for one message's round trip (sent in the message; a node drops work whose deadline passed).
    /// A message unanswered by then marks its node suspect and goes to another replica.
    pub deadline: Duration,
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval and the time to wait for its answer: a dead or hung peer is noticed within their sum,
    /// well inside the deadline.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub stream_window_bytes: u32,
    pub connection_window_bytes: u32,
    /// Upper bound on one message; the bound used is the smaller of this and what the node accepts.
    pub max_message_bytes: usize,
    /// The longest a step is held for experts that have no live replica (with sequences waiting; a step nobody
    /// waits for any more is given up at once). Requests have their own, usually shorter, deadlines.
    pub hold_timeout: Duration,
    /// Hedging: a piece unanswered after `max(hedge_min, HEDGE_FACTOR × what its node's recent answers say it
    /// should take)` is copied to other nodes when every one of its experts has another trusted replica, and the
    /// first whole answer is used (the same bits from either: each answer is a function of the piece alone). The
    /// slow node is marked suspect when the copy wins. `None`: no hedging.
    pub hedge_min: Option<Duration>,
    /// With a static placement: the first and the longest wait between attempts to reconnect a node that went down.
    pub reconnect_backoff: (Duration, Duration),
    /// With a static placement: how often the nodes' shards are read again (`UnloadExperts` / `LoadExperts` done by
    /// an operator show in `/readyz` and in planning within this time).
    pub refresh_interval: Duration,
    /// Mutual TLS to the nodes: this router's identity, offered to them, and the CA their certificates must chain
    /// to (with the expert role). `None`: plaintext.
    pub tls: Option<std::sync::Arc<moe_tls::Identity>>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            wire_dtype: Dtype::F32,
            reduce: Reduce::Pair,
            deadline: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(5),
            stream_window_bytes: 16 << 20,
            connection_window_bytes: 64 << 20,
            max_message_bytes: 16 << 20,
            hold_timeout: Duration::from_secs(600),
            hedge_min: Some(Duration::from_millis(250)),
            reconnect_backoff: (Duration::from_millis(100), Duration::from_secs(5)),
            tls: None,
            refresh_interval: Duration::from_secs(2),
        }
    }
}

/// Whether anyone still waits for the step in progress. A step held for experts without a live replica is given up
/// as soon as this says no: the engine sets it to "some sequence of the step is neither cancelled nor past its
/// deadline".
pub trait StepInterest: Send + Sync {
    fn wanted(&self) -> bool;
}

/// Counters of the router's side of the data plane, for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct RemoteStats {
    /// Messages sent and answered.
    pub messages: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Router time building and encoding messages, waiting for answers, and decoding them (nanoseconds).
    pub encode_ns: AtomicU64,
    pub wait_ns: AtomicU64,
    pub decode_ns: AtomicU64,
    /// Node-side time reported in the answers (microseconds): queueing, decode + encode, expert compute.
    pub node_queue_us: AtomicU64,
    pub node_codec_us: AtomicU64,
    pub node_compute_us: AtomicU64,
    /// Pieces planned again after their node failed or refused them.
    pub resent: AtomicU64,
    /// Pieces copied to other replicas because their answer was late, and those whose copy answered first.
    pub hedged: AtomicU64,
    pub hedges_won: AtomicU64,
    /// Pieces whose answer stopped being wanted while they were in flight (a hedge's losing copy, a piece past
    /// its deadline, a step given up), cancelled on their node.
    pub cancelled: AtomicU64,
    /// Layer waits that held for experts without a live replica, and those that gave up.
    pub holds: AtomicU64,
    pub holds_abandoned: AtomicU64,
    /// Waits holding right now (a gauge).
    pub holding: AtomicU64,
    /// Links re-opened to a node that had gone down (static placements).
    pub reconnects: AtomicU64,
}

/// Routed experts on expert nodes; see the module documentation.
///
/// It owns a small async runtime for its connections; `dispatch` and `wait` block the calling thread, which must
/// therefore not be one of an async runtime's (run the model on its own thread, as a serving engine does anyway).
pub struct RemoteExperts {
    runtime: OwnedRuntime,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    /// Tokens routed to each (layer, expert) since the last [`RemoteExperts::take_load`].
    load: Vec<Vec<AtomicU64>>,
    interest: RwLock<Option<Arc<dyn StepInterest>>>,
    pub stats: Arc<RemoteStats>,
    /// Per node, per layer and hot-expert series for `/metrics`.
    pub series: Arc<series::DataPlaneSeries>,
    /// The cluster as last read from the placement store (in a cluster), for the dashboard.
    pub cluster_view: RwLock<Option<Arc<moe_placement::ClusterView>>>,
}

/// What the connection tasks share with the dispatching thread.
struct Shared {
    /// The placement dispatches use now.
    topology: RwLock<Arc<Topology>>,
    /// Bumped whenever the topology is replaced or one of its links goes down: held work looks again.
    generation: watch::Sender<u64>,
    config: ModelConfig,
    fingerprint: u64,
    options: RemoteOptions,
    stats: Arc<RemoteStats>,
    /// Addresses of links that went down, for the static-placement supervisor.
    downs: mpsc::UnboundedSender<String>,
}

/// The runtime, shut down without blocking when dropped: a router may be dropped from inside another runtime
/// (the HTTP server's state), where a blocking shutdown panics.
struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl OwnedRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle(),
            None => unreachable!("the runtime is only taken when dropped"),
        }
    }
}

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for RemoteExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let topo = self.current();
        let nodes: Vec<_> = topo.links.iter().map(|l| format!("{}@{}", l.node_id, l.addr)).collect();
        f.debug_struct("RemoteExperts")
            .field("epoch", &topo.epoch)
            .field("nodes", &nodes)
            .field("wire", &self.shared.options.wire_dtype)
            .finish()
    }
}

impl Shared {
    fn current(&self) -> Arc<Topology> {
        self.topology.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace(&self, topology: Topology) {
        *self.topology.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(topology);
        self.bump();
    }

    /// Replaces the topology only if it is still `expected`; says whether it did.
    fn replace_if(&self, expected: &Arc<Topology>, topology: Topology) -> bool {
        let mut current = self.topology.write().unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&current, expected) {
            return false;
        }
        *current = Arc::new(topology);
        drop(current);
        self.bump();
        true
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Opens a link to `addr` (on the current runtime) and checks that it serves this router's model.
    async fn open(&self, addr: &str) -> Result<(Link, v1::StatusResponse), RouterError> {
        let (h, k) = (self.config.hidden_size, self.config.num_experts_per_tok);
        let downs = self.downs.clone();
        let down_addr = addr.to_owned();
        let (link, status) = link::open(addr, &self.options, h, k, move || {
            let _ = downs.send(down_addr);
        })
        .await?;
        let model = status.model.clone().unwrap_or_default();
        if model.fingerprint != self.fingerprint || model.hidden_size as usize != h {
            return Err(RouterError::Mismatch {
                addr: link.addr.clone(),
                message: format!(
                    "it serves a different model (fingerprint {:016x}, hidden {}; this router has {:016x}, \
                     hidden {h}): start it with the same model directory",
                    model.fingerprint, model.hidden_size, self.fingerprint
                ),
            });
        }
        Ok((link, status))
    }
}

impl RemoteExperts {
    /// Connects to the expert nodes at `addrs` (`host:port`), checks that each serves the model with `fingerprint`,
    /// learns what each hosts, and checks that every routed expert of `config` is hosted somewhere. Nodes that go
    /// down later are reconnected with backoff, and the nodes' shards are read again every
    /// [`RemoteOptions::refresh_interval`].
    pub fn connect(
        addrs: &[String],
        config: &ModelConfig,
        fingerprint: u64,
        options: RemoteOptions,
    ) -> Result<Self, RouterError> {
        if addrs.is_empty() {
            return Err(RouterError::Placement("no expert node address given".into()));
        }
        let (remote, downs) = Self::build(config, fingerprint, options)?;
        let shared = Arc::clone(&remote.shared);
        let topology = remote.runtime.handle().block_on(async move {
            let mut links = Vec::with_capacity(addrs.len());
            for addr in addrs {
                let (link, _) = shared.open(addr).await?;
                tracing::info!(%addr, node_id = %link.node_id, "expert node connected");
                links.push(Arc::new(link));
            }
            let topology = Topology::from_links(links, &shared.config)?;
            topology.check_complete(|| addrs.join(", "))?;
            Ok::<_, RouterError>(topology)
        })?;
        remote.shared.replace(topology);
        remote.runtime.handle().spawn(supervise_static(Arc::clone(&remote.shared), downs));
        Ok(remote)
    }

    /// A router's experts before any placement: dispatches wait until [`RemoteExperts::switch`] gives one.
    pub fn unplaced(config: &ModelConfig, fingerprint: u64, options: RemoteOptions) -> Result<Self, RouterError> {
        Self::build(config, fingerprint, options).map(|(remote, _)| remote)
    }

    fn build(
        config: &ModelConfig,
        fingerprint: u64,
        options: RemoteOptions,
    ) -> Result<(Self, mpsc::UnboundedReceiver<String>), RouterError> {
        if options.wire_dtype.size().is_none() {
            return Err(RouterError::Placement("the wire dtype must be BF16 or F32".into()));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("router-io")
            .enable_all()
            .build()
            .map_err(RouterError::Runtime)?;
        let load = (0..config.num_hidden_layers)
            .map(|l| {
                if config.is_moe_layer(l) {
                    (0..config.num_experts).map(|_| AtomicU64::new(0)).collect()
                } else {
                    Vec::new()
                }
            })
            .collect();
        let stats = Arc::new(RemoteStats::default());
        let (downs, downs_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            topology: RwLock::new(Arc::new(Topology::empty())),
            generation: watch::channel(0).0,
            config: config.clone(),
            fingerprint,
            options,
            stats: Arc::clone(&stats),
            downs,
        });
        let remote = RemoteExperts {
            runtime: OwnedRuntime(Some(runtime)),
            shared,
            next_id: AtomicU64::new(1),
            load,
            interest: RwLock::new(None),
            stats,
            series: Arc::new(series::DataPlaneSeries::new(config)),
            cluster_view: RwLock::new(None),
        };
        Ok((remote, downs_rx))
    }

    /// Who decides whether a held step is still wanted (the serving engine). Without one, a held step waits up to
    /// [`RemoteOptions::hold_timeout`].
    pub fn set_interest(&self, interest: Arc<dyn StepInterest>) {
        *self.interest.write().unwrap_or_else(|p| p.into_inner()) = Some(interest);
    }

    fn wanted(&self) -> bool {
        self.interest.read().unwrap_or_else(|p| p.into_inner()).as_ref().is_none_or(|i| i.wanted())
    }

    fn current(&self) -> Arc<Topology> {
        self.shared.current()
    }

    /// The placement epoch dispatches carry now (0: static placement, or none yet).
    pub fn epoch(&self) -> u64 {
        self.current().epoch
    }

    /// Whether a placement is in use.
    pub fn is_placed(&self) -> bool {
        !self.current().links.is_empty()
    }

    /// Tokens routed per (MoE layer, expert) since the last call, in the order of `moe_layers`; resets them.
    pub fn take_load(&self, moe_layers: &[u32]) -> Vec<Vec<u64>> {
        moe_layers
            .iter()
            .map(|&l| {
                self.load
                    .get(l as usize)
                    .map_or_else(Vec::new, |row| row.iter().map(|c| c.swap(0, Ordering::Relaxed)).collect())
            })
            .collect()
    }

    /// Switches to placement epoch `p` (whose nodes have all loaded it): connects to its new nodes, keeps the links
    /// it shares with the current epoch, and swaps. Dispatches already made finish on the placement they began with;
    /// held work is planned again under the new one.
    pub async fn switch(&self, p: &moe_placement::Placement, config: &ModelConfig) -> Result<(), RouterError> {
        let old = self.current();
        let mut links = Vec::with_capacity(p.nodes.len());
        for node in &p.nodes {
            let reuse = old.links.iter().find(|l| l.addr == node.addr && l.node_id == node.id && !l.is_down()).cloned();
            let link = match reuse {
                Some(l) => l,
                None => {
                    let shared = Arc::clone(&self.shared);
                    let addr = node.addr.clone();
                    let (link, status) = self
                        .runtime
                        .handle()
                        .spawn(async move { shared.open(&addr).await })
                        .await
                        .map_err(|e| RouterError::Placement(format!("connecting: {e}")))??;
                    if status.node_id != node.id {
                        return Err(RouterError::Mismatch {
                            addr: node.addr.clone(),
                            message: format!("it is node {}, the placement says {}", status.node_id, node.id),
                        });
                    }
                    Arc::new(link)
                }
            };
            links.push(link);
        }
        let mut placement = Topology::table(config);
        for (row, &layer) in p.hosted.iter().zip(&p.moe_layers) {
            for (n, experts) in row.iter().enumerate() {
                for &e in experts {
                    let slot =
                        placement.get_mut(layer as usize).and_then(|l| l.get_mut(e as usize)).ok_or_else(|| {
                            RouterError::Placement(format!(
                                "epoch {} places expert {e} of layer {layer}, which the model lacks",
                                p.epoch
                            ))
                        })?;
                    if n >= links.len() {
                        return Err(RouterError::Placement(format!(
                            "epoch {} places experts on node {n} of {}",
                            p.epoch,
                            links.len()
                        )));
                    }
                    slot.push(n);
                }
            }
        }
        let topology = Topology { epoch: p.epoch, links, placement };
        topology.check_complete(|| format!("epoch {}", p.epoch))?;
        self.shared.replace(topology);
        tracing::info!(epoch = p.epoch, nodes = p.nodes.len(), "switched to placement epoch");
        Ok(())
    }

    /// The nodes' ids and addresses, in the order partial sums are added.
    pub fn nodes(&self) -> Vec<(String, String)> {
        self.current().links.iter().map(|l| (l.node_id.clone(), l.addr.clone())).collect()
    }

    /// `Err` naming the first (layer, expert) whose every replica is down: what `/readyz` reports.
    pub fn check_coverage(&self) -> Result<(), String> {
        self.current().coverage()
    }

    /// Fetches every node's status (unary call with a deadline).
    pub fn status(&self) -> Vec<Result<v1::StatusResponse, String>> {
        let topo = self.current();
        let timeout = self.shared.options.connect_timeout;
        self.runtime.handle().block_on(async {
            let mut out = Vec::new();
            for link in &topo.links {
                let mut req = tonic::Request::new(StatusRequest {});
                req.set_timeout(timeout);
                out.push(link.client.clone().status(req).await.map(|r| r.into_inner()).map_err(|s| s.to_string()));
            }
            out
        })
    }

    /// The links of the placement in use with their health, for `/metrics` and logs: (node id, address, state).
    pub fn health(&self) -> Vec<(String, String, &'static str)> {
        self.current()
            .links
            .iter()
            .map(|l| {
                let state = match l.health() {
                    link::Health::Up => "up",
                    link::Health::Suspect { .. } => "suspect",
                    link::Health::Down { .. } => "down",
                };
                (l.node_id.clone(), l.addr.clone(), state)
            })
            .collect()
    }
}

impl Experts for RemoteExperts {
    fn dispatch(
        &self,
        layer: usize,
        hidden: &[f32],
        routing: &Routing,
    ) -> moe_model::Result<Box<dyn PendingExperts + '_>> {
        let started = Instant::now();
        let h = self.shared.config.hidden_size;
        let ntok = routing.num_tokens();
        let fail = |message: String| ModelError::Experts { layer, message };
        if hidden.len() != ntok * h {
            return Err(fail(format!("hidden has {} values for {ntok} tokens of width {h}", hidden.len())));
        }
        if let Some(row) = self.load.get(layer) {
            for &e in &routing.experts {
                if let Some(c) = row.get(e as usize) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.series.routed(layer, &routing.experts);
        let tokens: Vec<u32> = (0..ntok as u32).collect();
        let csr = v1::Routing {
            offsets: routing.offsets.clone(),
            experts: routing.experts.clone(),
            weights: routing.weights.clone(),
        };
        let work = Work { rows: hidden, tokens: &tokens, routing: &csr, avoid: None };
        let pieces = match self.scatter(&self.current(), layer, work) {
            Ok(pieces) => pieces,
            // Nothing can take it now: the wait holds it.
            Err(pending::Stall::NoLiveReplica(_)) => vec![Piece::Held(work.held())],
            Err(pending::Stall::Bug(message)) => return Err(fail(message)),
        };
        self.stats.encode_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(Box::new(RemotePending::new(self, layer, ntok, pieces)))
    }
}

/// With a static placement (epoch 0): reconnects nodes that went down, with backoff, and reads the nodes' shards
/// again every refresh interval, replacing the topology when either changes it. Ends with the runtime.
async fn supervise_static(shared: Arc<Shared>, mut downs: mpsc::UnboundedReceiver<String>) {
    let reconnecting: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut refresh = tokio::time::interval(shared.options.refresh_interval.max(Duration::from_millis(100)));
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            down = downs.recv() => {
                let Some(addr) = down else { return };
                shared.bump();
                if shared.current().epoch != 0 {
                    continue;
                }
                if reconnecting.lock().unwrap_or_else(|p| p.into_inner()).insert(addr.clone()) {
                    let (shared, reconnecting) = (Arc::clone(&shared), Arc::clone(&reconnecting));
                    tokio::spawn(async move {
                        reconnect(&shared, &addr).await;
                        reconnecting.lock().unwrap_or_else(|p| p.into_inner()).remove(&addr);
                    });
                }
            }
            _ = refresh.tick() => refresh_shards(&shared).await,
        }
    }
}

/// Re-opens the link to `addr` until it is back (or the placement is no longer static), then puts it in place of
/// the link that went down.
async fn reconnect(shared: &Shared, addr: &str) {
    let (first, longest) = shared.options.reconnect_backoff;
    let mut wait = first;
    let mut attempts = 0u32;
    loop {
        tokio::time::sleep(wait).await;
        let topo = shared.current();
        if topo.epoch != 0 || !topo.links.iter().any(|l| l.addr == addr && l.is_down()) {
            return;
        }
        attempts += 1;
        match shared.open(addr).await {
            Ok((link, _)) => {
                let link = Arc::new(link);
                let topo = shared.current();
                let links: Vec<_> = topo
                    .links
                    .iter()
                    .map(|l| if l.addr == addr && l.is_down() { Arc::clone(&link) } else { Arc::clone(l) })
                    .collect();
                match Topology::from_links(links, &shared.config) {
                    Ok(t) => {
                        if !shared.replace_if(&topo, t) {
                            continue;
                        }
                        shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%addr, node_id = %link.node_id, attempts, "expert node reconnected");
                        return;
                    }
                    Err(e) => tracing::warn!(%addr, "reconnected, but: {e}"),
                }
            }
            Err(e) => {
                if attempts == 1 || attempts.is_multiple_of(10) {
                    tracing::info!(%addr, attempts, "expert node still unreachable: {e}; retrying in {wait:?}");
                }
            }
        }
        wait = (wait * 2).min(longest);
    }
}

/// Reads every live node's shard; replaces the topology when one changed.
async fn refresh_shards(shared: &Shared) {
    let topo = shared.current();
    if topo.epoch != 0 || topo.links.is_empty() {
        return;
    }
    let mut changed = false;
    for l in topo.links.iter().filter(|l| !l.is_down()) {
        let mut req = tonic::Request::new(StatusRequest {});
        req.set_timeout(shared.options.connect_timeout);
        let Ok(status) = l.client.clone().status(req).await else { continue };
        let rows = link::hosted_rows(&status.into_inner());
        let mut hosted = l.hosted.lock().unwrap_or_else(|p| p.into_inner());
        if *hosted != rows {
            tracing::info!(node = %l.node_id, addr = %l.addr, "the node's shard changed");
            *hosted = rows;
            changed = true;
        }
    }
    if changed {
        match Topology::from_links(topo.links.clone(), &shared.config) {
            Ok(t) => {
                // A reconnect that replaced the topology meanwhile wins; the next refresh reads again.
                shared.replace_if(&topo, t);
            }
            Err(e) => tracing::warn!("a node's new shard does not fit the model: {e}"),
        }
    }
}
