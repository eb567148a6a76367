//! The router's side of the data plane: routed experts computed on expert nodes over gRPC.
//!
//! [`RemoteExperts`] keeps one long-lived bidirectional `Forward` stream per expert node (one HTTP/2 connection each,
//! with keepalive and flow-control windows sized for the payloads) and implements the model's [`Experts`] seam. Per
//! layer and micro-batch it sends one message per node (chunked under the node's maximum message size), each token
//! once per node with the (expert, weight) pairs local to that node, and returns at once; the model computes the
//! shared expert (and, with micro-batches, the next micro-batch's attention) while the nodes work. Waiting adds the
//! nodes' partial sums in node order, so a token's result does not depend on how its batch was formed.
//!
//! When several nodes host an expert, each (token, expert) pair goes to the replica with the least work: pairs
//! outstanding there plus those this dispatch has given it so far; ties go to a node the token already visits, then
//! to the node that has been sent the fewest pairs overall (so that small decode batches do not always favour the
//! same replica). A node whose stream fails is marked down at once; the pieces it
//! had in flight are sent again to a live node that hosts all their experts, and later batches avoid it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moe_model::{Experts, ModelConfig, ModelError, PendingExperts, Routing};
use moe_proto::codec;
use moe_proto::v1::{self, forward_response, Dtype, ErrorCode, ForwardRequest, StatusRequest};
use moe_proto::ExpertServiceClient;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::RouterError;

/// How the router talks to expert nodes.
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Element type of activations and partial sums on the wire. F32 (the default) keeps results equal to the
    /// single-process engine to f32 rounding, so greedy tokens do not change; BF16 halves the bytes but rounds every
    /// activation and partial sum to 8 bits of mantissa, which moves log-probs by up to ~0.1 on the test fixtures and
    /// flips greedy tokens at near-ties.
    pub wire_dtype: Dtype,
    /// Time allowed for one message's round trip (sent in the message; a node drops work whose deadline passed).
    pub deadline: Duration,
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval and the time to wait for its answer: a dead peer is noticed within their sum, well inside
    /// the deadline.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub stream_window_bytes: u32,
    pub connection_window_bytes: u32,
    /// Upper bound on one message; the bound used is the smaller of this and what the node accepts.
    pub max_message_bytes: usize,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            wire_dtype: Dtype::F32,
            deadline: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(5),
            stream_window_bytes: 16 << 20,
            connection_window_bytes: 64 << 20,
            max_message_bytes: 16 << 20,
        }
    }
}

/// What one answer carried back.
type Answer = Result<v1::PartialSums, String>;

/// One expert node, as the router sees it.
struct Link {
    addr: String,
    node_id: String,
    requests: mpsc::Sender<ForwardRequest>,
    waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>,
    /// Why the node is down, once it is.
    down: Arc<Mutex<Option<String>>>,
    is_down: Arc<AtomicBool>,
    /// (token, expert) pairs sent and not answered yet, for picking among replicas.
    outstanding: AtomicUsize,
    /// (token, expert) pairs ever sent, the last tie-breaker between replicas.
    sent_pairs: AtomicU64,
    max_tokens_per_message: usize,
    client: ExpertServiceClient<Channel>,
}

impl Link {
    /// Takes `pairs` answered (or abandoned) (token, expert) pairs off the outstanding count.
    fn settle(&self, pairs: usize) {
        let _ = self.outstanding.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(pairs)));
    }

    fn down_reason(&self) -> Option<String> {
        if !self.is_down.load(Ordering::Acquire) {
            return None;
        }
        self.down.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
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
    /// Pieces sent again to another replica after their node failed.
    pub resent: AtomicU64,
}

/// Routed experts on expert nodes; see the module documentation.
///
/// It owns a small async runtime for its connections; `dispatch` and `wait` block the calling thread, which must
/// therefore not be one of an async runtime's (run the model on its own thread, as a serving engine does anyway).
pub struct RemoteExperts {
    runtime: tokio::runtime::Runtime,
    /// The placement dispatches use now; replaced whole when the cluster switches epochs.
    topology: RwLock<Arc<Topology>>,
    hidden: usize,
    top_k: usize,
    fingerprint: u64,
    options: RemoteOptions,
    next_id: AtomicU64,
    /// Tokens routed to each (layer, expert) since the last [`RemoteExperts::take_load`].
    load: Vec<Vec<AtomicU64>>,
    pub stats: RemoteStats,
}

/// One placement epoch as the router uses it: the nodes and which of them hosts each (layer, expert).
struct Topology {
    epoch: u64,
    links: Vec<Arc<Link>>,
    /// `placement[layer][expert]`: indices into `links` of the nodes hosting it (empty rows for dense layers).
    placement: Vec<Vec<Vec<usize>>>,
}

impl Topology {
    fn index_of(&self, link: &Arc<Link>) -> Option<usize> {
        self.links.iter().position(|l| Arc::ptr_eq(l, link))
    }
}

impl std::fmt::Debug for RemoteExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let topo = self.current();
        let nodes: Vec<_> = topo.links.iter().map(|l| format!("{}@{}", l.node_id, l.addr)).collect();
        f.debug_struct("RemoteExperts")
            .field("epoch", &topo.epoch)
            .field("nodes", &nodes)
            .field("wire", &self.options.wire_dtype)
            .finish()
    }
}

impl RemoteExperts {
    /// Connects to the expert nodes at `addrs` (`host:port`), checks that each serves the model with `fingerprint`,
    /// learns what each hosts, and checks that every routed expert of `config` is hosted somewhere.
    pub fn connect(
        addrs: &[String],
        config: &ModelConfig,
        fingerprint: u64,
        options: RemoteOptions,
    ) -> Result<Self, RouterError> {
        if addrs.is_empty() {
            return Err(RouterError::Placement("no expert node address given".into()));
        }
        let remote = Self::unplaced(config, fingerprint, options)?;
        let topology = remote.runtime.block_on(remote.static_topology(addrs, config))?;
        *remote.topology.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(topology);
        Ok(remote)
    }

    /// A router's experts before any placement: every dispatch fails until [`RemoteExperts::switch`] gives one.
    pub fn unplaced(config: &ModelConfig, fingerprint: u64, options: RemoteOptions) -> Result<Self, RouterError> {
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
        Ok(RemoteExperts {
            runtime,
            topology: RwLock::new(Arc::new(Topology { epoch: 0, links: Vec::new(), placement: Vec::new() })),
            hidden: config.hidden_size,
            top_k: config.num_experts_per_tok,
            fingerprint,
            options,
            next_id: AtomicU64::new(1),
            load,
            stats: RemoteStats::default(),
        })
    }

    fn current(&self) -> Arc<Topology> {
        self.topology.read().unwrap_or_else(|p| p.into_inner()).clone()
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

    /// Opens a link to `addr` on the router's runtime and checks that it serves this router's model.
    async fn open(&self, addr: &str) -> Result<(Link, v1::StatusResponse), RouterError> {
        let (addr, options, h, k) = (addr.to_owned(), self.options.clone(), self.hidden, self.top_k);
        let (link, status) = self
            .runtime
            .spawn(async move { open_link(&addr, &options, h, k).await })
            .await
            .map_err(|e| RouterError::Placement(format!("connecting: {e}")))??;
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

    /// Switches to placement epoch `p` (whose nodes have all loaded it): connects to its new nodes, keeps the links
    /// it shares with the current epoch, and swaps. Dispatches already made finish on the placement they began with.
    pub async fn switch(&self, p: &moe_placement::Placement, config: &ModelConfig) -> Result<(), RouterError> {
        let old = self.current();
        let mut links = Vec::with_capacity(p.nodes.len());
        for node in &p.nodes {
            let reuse = old
                .links
                .iter()
                .find(|l| l.addr == node.addr && l.node_id == node.id && l.down_reason().is_none())
                .cloned();
            let link = match reuse {
                Some(l) => l,
                None => {
                    let (link, status) = self.open(&node.addr).await?;
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
        let mut placement: Vec<Vec<Vec<usize>>> = (0..config.num_hidden_layers)
            .map(|l| if config.is_moe_layer(l) { vec![Vec::new(); config.num_experts] } else { Vec::new() })
            .collect();
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
                    slot.push(n);
                }
            }
        }
        check_complete(&placement, || format!("epoch {}", p.epoch))?;
        let topology = Topology { epoch: p.epoch, links, placement };
        *self.topology.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(topology);
        tracing::info!(epoch = p.epoch, nodes = p.nodes.len(), "switched to placement epoch");
        Ok(())
    }

    /// The placement the nodes at `addrs` report in Status (epoch 0).
    async fn static_topology(&self, addrs: &[String], config: &ModelConfig) -> Result<Topology, RouterError> {
        let h = config.hidden_size;
        let mut placement: Vec<Vec<Vec<usize>>> = (0..config.num_hidden_layers)
            .map(|l| if config.is_moe_layer(l) { vec![Vec::new(); config.num_experts] } else { Vec::new() })
            .collect();
        let mut links = Vec::with_capacity(addrs.len());
        for (index, addr) in addrs.iter().enumerate() {
            let (link, status) = self.open(addr).await?;
            let _ = h;
            for row in status.hosted.unwrap_or_default().layers {
                for e in row.experts {
                    let slot =
                        placement.get_mut(row.layer as usize).and_then(|l| l.get_mut(e as usize)).ok_or_else(|| {
                            RouterError::Mismatch {
                                addr: addr.clone(),
                                message: format!("it reports expert {e} of layer {}, which the model lacks", row.layer),
                            }
                        })?;
                    slot.push(index);
                }
            }
            tracing::info!(%addr, node_id = %link.node_id, "expert node connected");
            links.push(Arc::new(link));
        }
        check_complete(&placement, || addrs.join(", "))?;
        Ok(Topology { epoch: 0, links, placement })
    }

    /// The nodes' ids and addresses, in the order partial sums are added.
    pub fn nodes(&self) -> Vec<(String, String)> {
        self.current().links.iter().map(|l| (l.node_id.clone(), l.addr.clone())).collect()
    }

    /// `Err` naming the first (layer, expert) whose every replica is down: what `/readyz` reports.
    pub fn check_coverage(&self) -> Result<(), String> {
        let topo = self.current();
        if topo.links.is_empty() {
            return Err("no placement yet: waiting for the controller and the expert nodes".into());
        }
        for (l, row) in topo.placement.iter().enumerate() {
            for (e, replicas) in row.iter().enumerate() {
                if replicas.iter().all(|&r| topo.links[r].down_reason().is_some()) {
                    let why: Vec<_> = replicas.iter().filter_map(|&r| topo.links[r].down_reason()).collect();
                    return Err(format!("expert {e} of layer {l} has no live replica: {}", why.join("; ")));
                }
            }
        }
        Ok(())
    }

    /// Fetches every node's status (unary call with a deadline).
    pub fn status(&self) -> Vec<Result<v1::StatusResponse, String>> {
        let topo = self.current();
        self.runtime.block_on(async {
            let mut out = Vec::new();
            for link in &topo.links {
                let mut req = tonic::Request::new(StatusRequest {});
                req.set_timeout(self.options.connect_timeout);
                out.push(link.client.clone().status(req).await.map(|r| r.into_inner()).map_err(|s| s.to_string()));
            }
            out
        })
    }

    /// Sends one prepared request on `link`'s stream and returns the receiver of its answer.
    fn send(&self, link: &Link, req: ForwardRequest) -> Result<oneshot::Receiver<Answer>, String> {
        if let Some(reason) = link.down_reason() {
            return Err(reason);
        }
        let (tx, rx) = oneshot::channel();
        link.waiting.lock().unwrap_or_else(|p| p.into_inner()).insert(req.id, tx);
        // The reader marks the link down before it fails what is waiting: checked after the insert, a request is
        // either failed by the reader or refused here, never left waiting for nobody.
        if let Some(reason) = link.down_reason() {
            link.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&req.id);
            return Err(reason);
        }
        let pairs = req.routing.as_ref().map_or(req.num_tokens as usize, |r| r.experts.len());
        link.outstanding.fetch_add(pairs, Ordering::Relaxed);
        self.stats.bytes_sent.fetch_add(req.activations.len() as u64, Ordering::Relaxed);
        let id = req.id;
        if link.requests.blocking_send(req).is_err() {
            link.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            link.settle(pairs);
            return Err(format!("the stream to {} is closed", link.addr));
        }
        Ok(rx)
    }

    /// Plans and sends the messages of one layer for `rows` (the hidden vectors of the batch's tokens `tokens`,
    /// routed by `routing`, CSR over the rows) under `topo`: each token once per node, with its (expert, weight)
    /// pairs local to that node, chunked under the node's message limit. `avoid` is used only for experts that
    /// have no other live replica.
    fn scatter(
        &self,
        topo: &Arc<Topology>,
        layer: usize,
        work: Work<'_>,
        avoid: Option<&Arc<Link>>,
        depth: usize,
    ) -> Result<Vec<Piece>, String> {
        let Work { rows, tokens, routing } = work;
        let h = self.hidden;
        let table = topo.placement.get(layer).filter(|t| !t.is_empty()).ok_or_else(|| {
            if topo.links.is_empty() {
                "no placement yet: waiting for the controller and the expert nodes".to_owned()
            } else {
                "not a MoE layer".to_owned()
            }
        })?;
        let n = topo.links.len();
        let mut load: Vec<usize> = topo.links.iter().map(|l| l.outstanding.load(Ordering::Relaxed)).collect();
        let avoided = avoid.and_then(|a| topo.index_of(a));
        let usable: Vec<bool> =
            topo.links.iter().enumerate().map(|(i, l)| l.down_reason().is_none() && Some(i) != avoided).collect();
        // Per node: the rows it gets and their local CSR.
        let mut picked: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut csr: Vec<v1::Routing> = vec![v1::Routing::default(); n];
        let mut chosen: Vec<usize> = Vec::new();
        let mut pairs: Vec<(usize, u32, f32)> = Vec::new();
        for r in 0..tokens.len() {
            chosen.clear();
            pairs.clear();
            let (a, b) = (routing.offsets[r] as usize, routing.offsets[r + 1] as usize);
            for (&e, &w) in routing.experts[a..b].iter().zip(&routing.weights[a..b]) {
                let replicas = table.get(e as usize).ok_or_else(|| format!("expert {e} out of range"))?;
                let best = |ok: &dyn Fn(usize) -> bool| {
                    replicas.iter().copied().filter(|&r| ok(r)).min_by_key(|&r| {
                        (load[r], !chosen.contains(&r), topo.links[r].sent_pairs.load(Ordering::Relaxed))
                    })
                };
                let node = best(&|r| usable[r])
                    .or_else(|| best(&|r| topo.links[r].down_reason().is_none()))
                    .ok_or_else(|| {
                        let why = replicas.iter().filter_map(|&r| topo.links[r].down_reason()).collect::<Vec<_>>();
                        format!("no live node hosts expert {e}: {}", why.join("; "))
                    })?;
                if !chosen.contains(&node) {
                    chosen.push(node);
                }
                load[node] += 1;
                topo.links[node].sent_pairs.fetch_add(1, Ordering::Relaxed);
                pairs.push((node, e, w));
            }
            // Keep each node's pairs in the token's routing order.
            for &node in &chosen {
                let c = &mut csr[node];
                if c.offsets.is_empty() {
                    c.offsets.push(0);
                }
                for &(_, e, w) in pairs.iter().filter(|p| p.0 == node) {
                    c.experts.push(e);
                    c.weights.push(w);
                }
                c.offsets.push(c.experts.len() as u32);
                picked[node].push(r as u32);
            }
        }

        let dtype = self.options.wire_dtype;
        let mut pieces = Vec::new();
        let mut buf = Vec::new();
        for node in 0..n {
            let link = &topo.links[node];
            let max = link.max_tokens_per_message;
            for (c, chunk) in picked[node].chunks(max).enumerate() {
                let first = c * max;
                let r = &csr[node];
                let (a, b) = (r.offsets[first] as usize, r.offsets[first + chunk.len()] as usize);
                let local = v1::Routing {
                    offsets: r.offsets[first..=first + chunk.len()].iter().map(|&o| o - a as u32).collect(),
                    experts: r.experts[a..b].to_vec(),
                    weights: r.weights[a..b].to_vec(),
                };
                buf.clear();
                for &row in chunk {
                    buf.extend_from_slice(&rows[row as usize * h..(row as usize + 1) * h]);
                }
                let request = ForwardRequest {
                    id: self.next_id.fetch_add(1, Ordering::Relaxed),
                    layer: layer as u32,
                    epoch: topo.epoch,
                    dtype: dtype as i32,
                    hidden_size: h as u32,
                    num_tokens: chunk.len() as u32,
                    activations: codec::encode(&buf, dtype),
                    routing: Some(local),
                    deadline_us: self.options.deadline.as_micros() as u64,
                };
                let batch_tokens: Vec<u32> = chunk.iter().map(|&row| tokens[row as usize]).collect();
                match self.send(link, request.clone()) {
                    Ok(answer) => {
                        pieces.push(Piece { link: link.clone(), tokens: batch_tokens, request, answer });
                    }
                    // The node went down since the choice above: plan this chunk again without it.
                    Err(why) if depth < n => {
                        self.stats.resent.fetch_add(1, Ordering::Relaxed);
                        let routing = request.routing.clone().unwrap_or_default();
                        pieces.extend(
                            self.scatter(
                                topo,
                                layer,
                                Work { rows: &buf, tokens: &batch_tokens, routing: &routing },
                                Some(link),
                                depth + 1,
                            )
                            .map_err(|e| format!("{why}; then {e}"))?,
                        );
                    }
                    Err(why) => return Err(why),
                }
            }
        }
        Ok(pieces)
    }
}

/// Connects to one node: channel, status, and the forward stream with its reader task.
async fn open_link(
    addr: &str,
    options: &RemoteOptions,
    hidden: usize,
    top_k: usize,
) -> Result<(Link, v1::StatusResponse), RouterError> {
    let unreachable = |message: String| RouterError::Unreachable { addr: addr.to_owned(), message };
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| unreachable(format!("not an address: {e}")))?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(options.keepalive_interval)
        .keep_alive_timeout(options.keepalive_timeout)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(options.stream_window_bytes)
        .initial_connection_window_size(options.connection_window_bytes);
    let channel = endpoint.connect().await.map_err(|e| unreachable(error_chain(&e)))?;
    let mut probe = ExpertServiceClient::new(channel.clone());
    let mut req = tonic::Request::new(StatusRequest {});
    req.set_timeout(options.connect_timeout);
    let status = probe.status(req).await.map_err(|s| unreachable(format!("Status: {}", s.message())))?.into_inner();
    let max_bytes = options.max_message_bytes.min(status.max_message_bytes as usize).max(MIN_MESSAGE_BYTES);
    // Activations plus the routing (at most 15 bytes per pair, packed varints and floats) and the envelope.
    let per_token = hidden * options.wire_dtype.size().unwrap_or(4) + 15 * top_k + 5;
    let max_tokens_per_message = ((max_bytes - ENVELOPE_BYTES) / per_token).max(1);
    // A message of one token may still exceed a tiny limit; the limits set here are the ones the node enforces.
    let limit = max_bytes.max(per_token + ENVELOPE_BYTES);
    let mut client =
        ExpertServiceClient::new(channel).max_decoding_message_size(limit).max_encoding_message_size(limit);

    let (requests, outbound) = mpsc::channel::<ForwardRequest>(256);
    let mut inbound = client
        .forward(ReceiverStream::new(outbound))
        .await
        .map_err(|s| unreachable(format!("Forward: {}", s.message())))?
        .into_inner();
    let waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>> = Arc::default();
    let down: Arc<Mutex<Option<String>>> = Arc::default();
    let is_down = Arc::new(AtomicBool::new(false));
    {
        let (waiting, down, is_down, addr) = (waiting.clone(), down.clone(), is_down.clone(), addr.to_owned());
        tokio::spawn(async move {
            let reason = loop {
                match inbound.message().await {
                    Ok(Some(resp)) => {
                        let tx = waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&resp.id);
                        let answer = match resp.result {
                            Some(forward_response::Result::Sums(sums)) => Ok(sums),
                            Some(forward_response::Result::Error(e)) => Err(format!(
                                "{} ({}): {}",
                                ErrorCode::try_from(e.code).map_or("UNKNOWN", |c| c.as_str_name()),
                                e.field,
                                e.message
                            )),
                            None => Err("an answer without a result".into()),
                        };
                        if let Some(tx) = tx {
                            let _ = tx.send(answer);
                        }
                    }
                    Ok(None) => break format!("expert node {addr} closed the stream"),
                    Err(status) => break format!("expert node {addr}: {}", status.message()),
                };
            };
            tracing::warn!("{reason}; marking it down");
            *down.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.clone());
            is_down.store(true, Ordering::Release);
            let orphans: Vec<_> = waiting.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
            for (_, tx) in orphans {
                let _ = tx.send(Err(format!("{DOWN}{reason}")));
            }
        });
    }
    let link = Link {
        addr: addr.to_owned(),
        node_id: status.node_id.clone(),
        requests,
        waiting,
        down,
        is_down,
        outstanding: AtomicUsize::new(0),
        sent_pairs: AtomicU64::new(0),
        max_tokens_per_message,
        client,
    };
    Ok((link, status))
}

/// Smallest message limit the router plans with.
const MIN_MESSAGE_BYTES: usize = 4 << 10;
/// Room left in each message for the fields other than activations and routing.
const ENVELOPE_BYTES: usize = 256;

/// Prefix of answers that failed because the node went down (rather than refusing the request).
const DOWN: &str = "node down: ";

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Tokens to send for one layer: their hidden vectors (row-major), their indices in the batch, and their routing
/// (CSR over the rows).
#[derive(Clone, Copy)]
struct Work<'a> {
    rows: &'a [f32],
    tokens: &'a [u32],
    routing: &'a v1::Routing,
}

/// One message in flight: where it went, which of the batch's tokens it carries, and the request (kept to send it
/// again elsewhere if its node fails or no longer serves its epoch).
struct Piece {
    link: Arc<Link>,
    tokens: Vec<u32>,
    request: ForwardRequest,
    answer: oneshot::Receiver<Answer>,
}

impl Piece {
    /// The (token, expert) pairs the piece carries: its weight in the node's outstanding work.
    fn pairs(&self) -> usize {
        self.request.routing.as_ref().map_or(self.tokens.len(), |r| r.experts.len())
    }
}

struct RemotePending<'a> {
    remote: &'a RemoteExperts,
    layer: usize,
    ntok: usize,
    pieces: Vec<Piece>,
    /// Pieces before this one are answered and no longer count as outstanding work of their node.
    settled: usize,
    deadline: Instant,
}

impl Drop for RemotePending<'_> {
    /// Work given up on (an error in another piece, or a forward that failed elsewhere) stops counting as
    /// outstanding, so that replica choice is not skewed by answers nobody waits for.
    fn drop(&mut self) {
        for piece in &self.pieces[self.settled.min(self.pieces.len())..] {
            piece.link.settle(piece.pairs());
        }
    }
}

/// Whether a refusal means "not here (any more)" rather than a bad request: the piece can go elsewhere.
fn misplaced(why: &str) -> bool {
    why.starts_with("FAILED_PRECONDITION (epoch)") || why.starts_with("FAILED_PRECONDITION (routing.experts")
}

impl Experts for RemoteExperts {
    fn dispatch(
        &self,
        layer: usize,
        hidden: &[f32],
        routing: &Routing,
    ) -> moe_model::Result<Box<dyn PendingExperts + '_>> {
        let started = Instant::now();
        let h = self.hidden;
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
        let csr = v1::Routing {
            offsets: routing.offsets.clone(),
            experts: routing.experts.clone(),
            weights: routing.weights.clone(),
        };
        let tokens: Vec<u32> = (0..ntok as u32).collect();
        let deadline = Instant::now() + self.options.deadline;
        let pieces = self
            .scatter(&self.current(), layer, Work { rows: hidden, tokens: &tokens, routing: &csr }, None, 0)
            .map_err(fail)?;
        self.stats.encode_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(Box::new(RemotePending { remote: self, layer, ntok, pieces, settled: 0, deadline }))
    }
}

impl PendingExperts for RemotePending<'_> {
    fn wait(self: Box<Self>, out: &mut [f32]) -> moe_model::Result<()> {
        let mut this = *self;
        let (remote, layer, ntok, deadline) = (this.remote, this.layer, this.ntok, this.deadline);
        let h = remote.hidden;
        let fail = |message: String| ModelError::Experts { layer, message };
        if out.len() != ntok * h {
            return Err(fail(format!("output has {} values for {ntok} tokens of width {h}", out.len())));
        }
        out.fill(0.0);
        // Pieces are in node order; adding them in that order fixes each token's summation order.
        let mut i = 0;
        let mut retries = 0;
        while i < this.pieces.len() {
            let waited = Instant::now();
            let piece = &mut this.pieces[i];
            let answer =
                remote.runtime.block_on(async { tokio::time::timeout_at(deadline.into(), &mut piece.answer).await });
            remote.stats.wait_ns.fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
            let link = piece.link.clone();
            link.settle(piece.pairs());
            this.settled = i + 1;
            let sums = match answer {
                Err(_) => {
                    return Err(fail(format!(
                        "expert node {} did not answer within {:?}",
                        link.addr, remote.options.deadline
                    )))
                }
                Ok(Err(_)) => return Err(fail(format!("expert node {}: the answer was lost", link.addr))),
                Ok(Ok(Err(why))) if why.starts_with(DOWN) || misplaced(&why) => {
                    // The node failed, or no longer (or not yet) serves the piece's epoch or experts: plan the
                    // piece again under the placement in use now, away from that node if another can take it.
                    retries += 1;
                    if retries > 50 || Instant::now() >= deadline {
                        return Err(fail(format!("expert node {}: {why}", link.addr)));
                    }
                    let topo = remote.current();
                    if !why.starts_with(DOWN) && topo.epoch == piece.request.epoch {
                        // This router is behind the node: give the placement watcher a moment.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let request = &piece.request;
                    let dtype = Dtype::try_from(request.dtype).unwrap_or(Dtype::F32);
                    let mut rows = vec![0f32; request.num_tokens as usize * h];
                    codec::decode_into(&request.activations, dtype, &mut rows).map_err(|e| fail(e.to_string()))?;
                    let routing = request.routing.clone().unwrap_or_default();
                    let tokens = std::mem::take(&mut piece.tokens);
                    let again = remote
                        .scatter(&topo, layer, Work { rows: &rows, tokens: &tokens, routing: &routing }, Some(&link), 0)
                        .map_err(|e| fail(format!("{why}; then {e}")))?;
                    tracing::warn!(layer, from = %link.addr, pieces = again.len(), epoch = topo.epoch, "{why}; piece sent again");
                    remote.stats.resent.fetch_add(1, Ordering::Relaxed);
                    this.pieces.splice(i..=i, again);
                    this.settled = i;
                    continue;
                }
                Ok(Ok(Err(why))) => return Err(fail(format!("expert node {}: {why}", link.addr))),
                Ok(Ok(Ok(sums))) => sums,
            };
            let decoding = Instant::now();
            let dtype = Dtype::try_from(sums.dtype).unwrap_or(Dtype::Unspecified);
            let size = dtype
                .size()
                .ok_or_else(|| fail(format!("expert node {} answered in dtype {}", link.addr, sums.dtype)))?;
            let piece = &this.pieces[i];
            if sums.num_tokens as usize != piece.tokens.len() || sums.sums.len() != piece.tokens.len() * h * size {
                return Err(fail(format!(
                    "expert node {} answered {} bytes for {} tokens ({} expected)",
                    link.addr,
                    sums.sums.len(),
                    sums.num_tokens,
                    piece.tokens.len() * h * size
                )));
            }
            let bytes: &Bytes = &sums.sums;
            for (k, &t) in piece.tokens.iter().enumerate() {
                let t = t as usize;
                codec::add_into(&bytes[k * h * size..(k + 1) * h * size], dtype, &mut out[t * h..(t + 1) * h])
                    .map_err(|e| fail(e.to_string()))?;
            }
            let stats = &remote.stats;
            stats.decode_ns.fetch_add(decoding.elapsed().as_nanos() as u64, Ordering::Relaxed);
            stats.messages.fetch_add(1, Ordering::Relaxed);
            stats.bytes_received.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            if let Some(t) = sums.timings {
                stats.node_queue_us.fetch_add(t.queue_us, Ordering::Relaxed);
                stats.node_codec_us.fetch_add(t.decode_us + t.encode_us, Ordering::Relaxed);
                stats.node_compute_us.fetch_add(t.compute_us, Ordering::Relaxed);
            }
            i += 1;
        }
        Ok(())
    }
}

/// `Err` naming the first (layer, expert) without a replica in `placement`.
fn check_complete(placement: &[Vec<Vec<usize>>], nodes: impl Fn() -> String) -> Result<(), RouterError> {
    for (l, row) in placement.iter().enumerate() {
        if let Some(e) = row.iter().position(Vec::is_empty) {
            return Err(RouterError::Placement(format!("expert {e} of layer {l} is hosted by none of {}", nodes())));
        }
    }
    Ok(())
}
