//! The router's side of the data plane: routed experts computed on expert nodes over gRPC.
//!
//! [`RemoteExperts`] keeps one long-lived bidirectional `Forward` stream per expert node (one HTTP/2 connection each,
//! with keepalive and flow-control windows sized for the payloads) and implements the model's [`Experts`] seam. Per
//! layer and micro-batch it sends one message per node (chunked under the node's maximum message size), each token
//! once per node with the (expert, weight) pairs local to that node, and returns at once; the model computes the
//! shared expert (and, with micro-batches, the next micro-batch's attention) while the nodes work. Waiting adds the
//! nodes' partial sums in node order, so a token's result does not depend on how its batch was formed.
//!
//! When several nodes host an expert, each token goes to the replica it already visits for another of its experts,
//! else to the one with the least work outstanding. A node whose stream fails is marked down at once; the pieces it
//! had in flight are sent again to a live node that hosts all their experts, and later batches avoid it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
    /// Tokens sent and not answered yet, for picking among replicas.
    outstanding: AtomicUsize,
    max_tokens_per_message: usize,
    client: ExpertServiceClient<Channel>,
}

impl Link {
    /// Takes `tokens` answered (or abandoned) tokens off the outstanding count.
    fn settle(&self, tokens: usize) {
        let _ = self.outstanding.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(tokens)));
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
    links: Vec<Link>,
    /// `placement[layer][expert]`: indices into `links` of the nodes hosting it.
    placement: Vec<Vec<Vec<usize>>>,
    hidden: usize,
    options: RemoteOptions,
    next_id: AtomicU64,
    pub stats: RemoteStats,
}

impl std::fmt::Debug for RemoteExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: Vec<_> = self.links.iter().map(|l| format!("{}@{}", l.node_id, l.addr)).collect();
        f.debug_struct("RemoteExperts").field("nodes", &nodes).field("wire", &self.options.wire_dtype).finish()
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
        if options.wire_dtype.size().is_none() {
            return Err(RouterError::Placement("the wire dtype must be BF16 or F32".into()));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("router-io")
            .enable_all()
            .build()
            .map_err(RouterError::Runtime)?;
        let h = config.hidden_size;
        let mut placement: Vec<Vec<Vec<usize>>> = (0..config.num_hidden_layers)
            .map(|l| if config.is_moe_layer(l) { vec![Vec::new(); config.num_experts] } else { Vec::new() })
            .collect();
        let mut links = Vec::with_capacity(addrs.len());
        for (index, addr) in addrs.iter().enumerate() {
            let (link, status) = runtime.block_on(open_link(addr, &options, h, config.num_experts_per_tok))?;
            let model = status.model.unwrap_or_default();
            if model.fingerprint != fingerprint || model.hidden_size as usize != h {
                return Err(RouterError::Mismatch {
                    addr: addr.clone(),
                    message: format!(
                        "it serves a different model (fingerprint {:016x}, hidden {}; this router has {fingerprint:016x}, \
                         hidden {h}): start it with the same model directory",
                        model.fingerprint, model.hidden_size
                    ),
                });
            }
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
            links.push(link);
        }
        for (l, row) in placement.iter().enumerate() {
            if let Some(e) = row.iter().position(Vec::is_empty) {
                return Err(RouterError::Placement(format!(
                    "expert {e} of layer {l} is hosted by none of {}",
                    addrs.join(", ")
                )));
            }
        }
        Ok(RemoteExperts {
            runtime,
            links,
            placement,
            hidden: h,
            options,
            next_id: AtomicU64::new(1),
            stats: RemoteStats::default(),
        })
    }

    /// The nodes' ids and addresses, in the order partial sums are added.
    pub fn nodes(&self) -> Vec<(String, String)> {
        self.links.iter().map(|l| (l.node_id.clone(), l.addr.clone())).collect()
    }

    /// `Err` naming the first (layer, expert) whose every replica is down: what `/readyz` reports.
    pub fn check_coverage(&self) -> Result<(), String> {
        for (l, row) in self.placement.iter().enumerate() {
            for (e, replicas) in row.iter().enumerate() {
                if replicas.iter().all(|&r| self.links[r].down_reason().is_some()) {
                    let why: Vec<_> = replicas.iter().filter_map(|&r| self.links[r].down_reason()).collect();
                    return Err(format!("expert {e} of layer {l} has no live replica: {}", why.join("; ")));
                }
            }
        }
        Ok(())
    }

    /// Fetches every node's status (unary call with a deadline).
    pub fn status(&self) -> Vec<Result<v1::StatusResponse, String>> {
        self.runtime.block_on(async {
            let mut out = Vec::new();
            for link in &self.links {
                let mut req = tonic::Request::new(StatusRequest {});
                req.set_timeout(self.options.connect_timeout);
                out.push(link.client.clone().status(req).await.map(|r| r.into_inner()).map_err(|s| s.to_string()));
            }
            out
        })
    }

    /// Sends one prepared request on `node`'s stream and returns the receiver of its answer.
    fn send(&self, node: usize, req: ForwardRequest) -> Result<oneshot::Receiver<Answer>, String> {
        let link = &self.links[node];
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
        link.outstanding.fetch_add(req.num_tokens as usize, Ordering::Relaxed);
        self.stats.bytes_sent.fetch_add(req.activations.len() as u64, Ordering::Relaxed);
        let id = req.id;
        if link.requests.blocking_send(req).is_err() {
            link.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            return Err(format!("the stream to {} is closed", link.addr));
        }
        Ok(rx)
    }

    /// A live node other than `failed` that hosts every expert `routing` names at `layer`.
    fn replica_for(&self, layer: usize, routing: &v1::Routing, failed: usize) -> Option<usize> {
        (0..self.links.len()).find(|&n| {
            n != failed
                && self.links[n].down_reason().is_none()
                && routing.experts.iter().all(|&e| self.placement[layer][e as usize].contains(&n))
        })
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

/// One message in flight: where it went, which of the batch's tokens it carries, and the request (kept to send it
/// again elsewhere if its node fails).
struct Piece {
    node: usize,
    tokens: Vec<u32>,
    request: ForwardRequest,
    answer: oneshot::Receiver<Answer>,
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
            self.remote.links[piece.node].settle(piece.tokens.len());
        }
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
        let h = self.hidden;
        let ntok = routing.num_tokens();
        let fail = |message: String| ModelError::Experts { layer, message };
        if hidden.len() != ntok * h {
            return Err(fail(format!("hidden has {} values for {ntok} tokens of width {h}", hidden.len())));
        }
        let table =
            self.placement.get(layer).filter(|t| !t.is_empty()).ok_or_else(|| fail("not a MoE layer".into()))?;

        // Assign each (token, expert) to a node; a token visits as few nodes as its experts allow.
        let n = self.links.len();
        let mut load: Vec<usize> = self.links.iter().map(|l| l.outstanding.load(Ordering::Relaxed)).collect();
        let live: Vec<bool> = self.links.iter().map(|l| l.down_reason().is_none()).collect();
        // Per node: tokens and the local CSR.
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut csr: Vec<v1::Routing> = vec![v1::Routing::default(); n];
        let mut chosen: Vec<usize> = Vec::new();
        let mut pairs: Vec<(usize, u32, f32)> = Vec::new();
        for t in 0..ntok {
            chosen.clear();
            pairs.clear();
            for (e, w) in routing.token(t) {
                let replicas = table.get(e as usize).ok_or_else(|| fail(format!("expert {e} out of range")))?;
                let node = replicas
                    .iter()
                    .copied()
                    .filter(|&r| live[r])
                    .min_by_key(|&r| (!chosen.contains(&r), load[r]))
                    .ok_or_else(|| {
                        let why = replicas.iter().filter_map(|&r| self.links[r].down_reason()).collect::<Vec<_>>();
                        fail(format!("no live node hosts expert {e}: {}", why.join("; ")))
                    })?;
                if !chosen.contains(&node) {
                    chosen.push(node);
                    load[node] += 1;
                }
                pairs.push((node, e, w));
            }
            // Keep each node's pairs in the token's routing order.
            for &node in &chosen {
                let r = &mut csr[node];
                if r.offsets.is_empty() {
                    r.offsets.push(0);
                }
                for &(_, e, w) in pairs.iter().filter(|p| p.0 == node) {
                    r.experts.push(e);
                    r.weights.push(w);
                }
                r.offsets.push(r.experts.len() as u32);
                tokens[node].push(t as u32);
            }
        }

        let deadline = Instant::now() + self.options.deadline;
        let mut pieces = Vec::new();
        let dtype = self.options.wire_dtype;
        let mut rows = Vec::new();
        for node in 0..n {
            let toks = &tokens[node];
            let max = self.links[node].max_tokens_per_message;
            for (c, chunk) in toks.chunks(max).enumerate() {
                let first = c * max;
                let r = &csr[node];
                let (a, b) = (r.offsets[first] as usize, r.offsets[first + chunk.len()] as usize);
                let local = v1::Routing {
                    offsets: r.offsets[first..=first + chunk.len()].iter().map(|&o| o - a as u32).collect(),
                    experts: r.experts[a..b].to_vec(),
                    weights: r.weights[a..b].to_vec(),
                };
                rows.clear();
                for &t in chunk {
                    rows.extend_from_slice(&hidden[t as usize * h..(t as usize + 1) * h]);
                }
                let request = ForwardRequest {
                    id: self.next_id.fetch_add(1, Ordering::Relaxed),
                    layer: layer as u32,
                    epoch: 0,
                    dtype: dtype as i32,
                    hidden_size: h as u32,
                    num_tokens: chunk.len() as u32,
                    activations: codec::encode(&rows, dtype),
                    routing: Some(local),
                    deadline_us: self.options.deadline.as_micros() as u64,
                };
                let (node, answer) = match self.send(node, request.clone()) {
                    Ok(answer) => (node, answer),
                    // The node went down since the assignment above: a replica of all the piece's experts takes it.
                    Err(why) => {
                        let routing = request.routing.clone().unwrap_or_default();
                        let other = self.replica_for(layer, &routing, node).ok_or_else(|| fail(why))?;
                        self.stats.resent.fetch_add(1, Ordering::Relaxed);
                        (other, self.send(other, request.clone()).map_err(&fail)?)
                    }
                };
                pieces.push(Piece { node, tokens: chunk.to_vec(), request, answer });
            }
        }
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
        while i < this.pieces.len() {
            let waited = Instant::now();
            let piece = &mut this.pieces[i];
            let answer =
                remote.runtime.block_on(async { tokio::time::timeout_at(deadline.into(), &mut piece.answer).await });
            remote.stats.wait_ns.fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
            let link = &remote.links[piece.node];
            link.settle(piece.tokens.len());
            this.settled = i + 1;
            let sums = match answer {
                Err(_) => {
                    return Err(fail(format!(
                        "expert node {} did not answer within {:?}",
                        link.addr, remote.options.deadline
                    )))
                }
                Ok(Err(_)) => return Err(fail(format!("expert node {}: the answer was lost", link.addr))),
                Ok(Ok(Err(why))) if why.starts_with(DOWN) => {
                    // Send the same piece to a live replica of all its experts, if there is one.
                    let routing = piece.request.routing.clone().unwrap_or_default();
                    let Some(other) = remote.replica_for(layer, &routing, piece.node) else {
                        return Err(fail(why));
                    };
                    let mut request = piece.request.clone();
                    request.id = remote.next_id.fetch_add(1, Ordering::Relaxed);
                    let answer = remote.send(other, request.clone()).map_err(&fail)?;
                    tracing::warn!(layer, from = %link.addr, to = %remote.links[other].addr, "piece sent again");
                    remote.stats.resent.fetch_add(1, Ordering::Relaxed);
                    let tokens = std::mem::take(&mut piece.tokens);
                    this.pieces[i] = Piece { node: other, tokens, request, answer };
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
