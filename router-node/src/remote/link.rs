//! One expert node as the router sees it: its HTTP/2 channel, the long-lived `Forward` stream with its reader task,
//! the answers it waits for, and its health.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moe_proto::v1::{self, forward_response, ForwardRequest, Reduce, StatusRequest};
use moe_proto::ExpertServiceClient;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::outcome::Failure;
use super::RemoteOptions;
use crate::RouterError;

/// What one answer carried back.
pub(crate) type Answer = Result<v1::PartialSums, Failure>;

/// Whether a link may be given work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Health {
    Up,
    /// Up, but its last answers failed in a way that points at the node (compute failure, no answer in time):
    /// used only for experts no other live node hosts, until [`SUSPECT_FOR`] passes or it answers well.
    Suspect {
        why: String,
        since: Instant,
    },
    /// Its stream ended; never used again (a reconnect makes a new link).
    Down {
        why: String,
    },
}

/// How long a suspect node is kept out of replica choice.
pub(crate) const SUSPECT_FOR: Duration = Duration::from_secs(10);

const UP: u8 = 0;
const SUSPECT: u8 = 1;
const DOWN: u8 = 2;

pub(crate) struct Link {
    pub addr: String,
    pub node_id: String,
    /// What the node reports hosting (static placements are built from it): read when the link opens, and again
    /// whenever a static placement is refreshed.
    pub hosted: Mutex<Vec<(usize, Vec<u32>)>>,
    requests: mpsc::Sender<ForwardRequest>,
    waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>,
    state: Arc<AtomicU8>,
    health: Arc<Mutex<Health>>,
    /// (token, expert) pairs sent and not answered yet, for picking among replicas.
    pub outstanding: AtomicUsize,
    /// (token, expert) pairs ever sent, the last tie-breaker between replicas.
    pub sent_pairs: AtomicU64,
    /// The recent round trip per (token, expert) pair in nanoseconds, a moving average of good answers (0: none
    /// yet): what a piece of this size should take here, to tell a late answer from a slow one.
    pair_ns: AtomicU64,
    pub max_tokens_per_message: usize,
    pub client: ExpertServiceClient<Channel>,
}

impl Link {
    /// How metrics and logs name the node: its member id, else its address.
    pub fn name(&self) -> &str {
        if self.node_id.is_empty() {
            &self.addr
        } else {
            &self.node_id
        }
    }

    /// Takes `pairs` answered (or abandoned) (token, expert) pairs off the outstanding count.
    pub fn settle(&self, pairs: usize) {
        let _ = self.outstanding.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(pairs)));
    }

    pub fn is_down(&self) -> bool {
        self.state.load(Ordering::Acquire) == DOWN
    }

    /// Why the node is down, once it is.
    pub fn down_reason(&self) -> Option<String> {
        if !self.is_down() {
            return None;
        }
        match &*self.health.lock().unwrap_or_else(|p| p.into_inner()) {
            Health::Down { why } => Some(why.clone()),
            _ => None,
        }
    }

    /// Live and not suspect: a node replica choice prefers.
    pub fn is_trusted(&self) -> bool {
        match self.state.load(Ordering::Acquire) {
            UP => true,
            SUSPECT => {
                let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
                if matches!(&*h, Health::Suspect { since, .. } if since.elapsed() >= SUSPECT_FOR) {
                    *h = Health::Up;
                    self.state.store(UP, Ordering::Release);
                    return true;
                }
                false
            }
            _ => false,
        }
    }

    pub fn health(&self) -> Health {
        self.health.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Marks the node suspect (unless it is down).
    pub fn suspect(&self, why: String) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(*h, Health::Down { .. }) {
            tracing::warn!(node = %self.node_id, addr = %self.addr, "expert node suspect: {why}");
            *h = Health::Suspect { why, since: Instant::now() };
            self.state.store(SUSPECT, Ordering::Release);
        }
    }

    /// Folds one good answer's round trip into the per-pair average (weight 1/8; racing updates may lose one
    /// sample, which an average can afford).
    pub fn observe(&self, took: Duration, pairs: usize) {
        let sample = (took.as_nanos() / pairs.max(1) as u128).min(u64::MAX as u128) as u64;
        let old = self.pair_ns.load(Ordering::Relaxed);
        let new = if old == 0 { sample } else { old - old / 8 + sample / 8 };
        self.pair_ns.store(new.max(1), Ordering::Relaxed);
    }

    /// What `pairs` pairs should take here by the recent answers (`None` before the first).
    pub fn expected(&self, pairs: usize) -> Option<Duration> {
        match self.pair_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns.saturating_mul(pairs.max(1) as u64))),
        }
    }

    /// A good answer clears suspicion.
    pub fn answered_well(&self) {
        if self.state.load(Ordering::Acquire) == SUSPECT {
            let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(*h, Health::Suspect { .. }) {
                *h = Health::Up;
                self.state.store(UP, Ordering::Release);
            }
        }
    }

    /// Sends one prepared request on the stream and returns the receiver of its answer. Never blocks on a full
    /// stream: a node that reads nothing fails the send rather than stall the caller.
    pub fn send(&self, req: ForwardRequest) -> Result<oneshot::Receiver<Answer>, Failure> {
        let down = |why: String| Failure::NodeDown { reason: why };
        if let Some(reason) = self.down_reason() {
            return Err(down(reason));
        }
        let (tx, rx) = oneshot::channel();
        let id = req.id;
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        // The reader marks the link down before it fails what is waiting: checked after the insert, a request is
        // either failed by the reader or refused here, never left waiting for nobody.
        if let Some(reason) = self.down_reason() {
            self.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            return Err(down(reason));
        }
        let pairs = req.routing.as_ref().map_or(req.num_tokens as usize, |r| r.experts.len());
        self.outstanding.fetch_add(pairs, Ordering::Relaxed);
        if let Err(e) = self.requests.try_send(req) {
            self.waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            self.settle(pairs);
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => Failure::Refused {
                    code: v1::ErrorCode::ResourceExhausted,
                    field: String::new(),
                    message: format!("{STREAM_DEPTH} messages are already queued for {}", self.addr),
                },
                mpsc::error::TrySendError::Closed(_) => down(format!("the stream to {} is closed", self.addr)),
            });
        }
        Ok(rx)
    }
}

impl Link {
    /// Tells the node that the answers to `ids` (requests sent on this link) are no longer wanted: it drops those
    /// still queued there, and nothing here waits for them any more. Best effort: on a full or closed stream
    /// nothing is sent, the node computes them, and their answers are dropped on arrival as they are now.
    pub fn cancel(&self, ids: &[u64]) {
        if ids.is_empty() {
            return;
        }
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            for id in ids {
                waiting.remove(id);
            }
        }
        if self.is_down() {
            return;
        }
        // An id no request has: an older node refuses the message, and that answer finds no one waiting.
        let req = ForwardRequest { id: CANCEL_ID, cancel: ids.to_vec(), ..Default::default() };
        if self.requests.try_send(req).is_err() {
            tracing::debug!(addr = %self.addr, "could not send a cancellation: the stream is full or closed");
        }
    }
}

/// The id of a message that only cancels; requests are numbered from 1 up.
const CANCEL_ID: u64 = u64::MAX;

/// Messages a stream may have queued on this side before sends are refused as `RESOURCE_EXHAUSTED`.
const STREAM_DEPTH: usize = 256;
/// Smallest message limit the router plans with.
const MIN_MESSAGE_BYTES: usize = 4 << 10;
/// Room left in each message for the fields other than activations and routing.
const ENVELOPE_BYTES: usize = 256;

/// Connects to one node: channel, status, and the forward stream with its reader task (spawned on the current
/// runtime). `on_down` runs once, when the stream ends.
pub(crate) async fn open(
    addr: &str,
    options: &RemoteOptions,
    hidden: usize,
    top_k: usize,
    on_down: impl FnOnce() + Send + 'static,
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
    let channel = match &options.tls {
        Some(identity) => {
            endpoint.connect_with_connector(moe_tls::Connector::new(identity.clone(), moe_tls::Role::Expert)).await
        }
        None => endpoint.connect().await,
    }
    .map_err(|e| unreachable(error_chain(&e)))?;
    let mut probe = ExpertServiceClient::new(channel.clone());
    let mut req = tonic::Request::new(StatusRequest {});
    req.set_timeout(options.connect_timeout);
    let status = probe.status(req).await.map_err(|s| unreachable(format!("Status: {}", s.message())))?.into_inner();
    let max_bytes = options.max_message_bytes.min(status.max_message_bytes as usize).max(MIN_MESSAGE_BYTES);
    // Activations plus the routing (at most 15 bytes per pair, packed varints and floats) and the envelope.
    let row = hidden * options.wire_dtype.size().unwrap_or(4);
    let mut per_token = row + 15 * top_k + 5;
    if options.reduce == Reduce::Pair {
        // The answer carries a row per pair, up to top-k of them per token: the larger message bounds the chunk.
        per_token = per_token.max(top_k * row + 5);
    }
    let max_tokens_per_message = ((max_bytes - ENVELOPE_BYTES) / per_token).max(1);
    // A message of one token may still exceed a tiny limit; the limits set here are the ones the node enforces.
    let limit = max_bytes.max(per_token + ENVELOPE_BYTES);
    let mut client =
        ExpertServiceClient::new(channel).max_decoding_message_size(limit).max_encoding_message_size(limit);

    let (requests, outbound) = mpsc::channel::<ForwardRequest>(STREAM_DEPTH);
    let inbound = client
        .forward(ReceiverStream::new(outbound))
        .await
        .map_err(|s| unreachable(format!("Forward: {}", s.message())))?
        .into_inner();
    let waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>> = Arc::default();
    let health = Arc::new(Mutex::new(Health::Up));
    let state = Arc::new(AtomicU8::new(UP));
    tokio::spawn(read_answers(inbound, waiting.clone(), health.clone(), state.clone(), addr.to_owned(), on_down));
    let hosted = hosted_rows(&status);
    let link = Link {
        addr: addr.to_owned(),
        node_id: status.node_id.clone(),
        hosted: Mutex::new(hosted),
        requests,
        waiting,
        state,
        health,
        outstanding: AtomicUsize::new(0),
        sent_pairs: AtomicU64::new(0),
        pair_ns: AtomicU64::new(0),
        max_tokens_per_message,
        client,
    };
    Ok((link, status))
}

/// What a Status answer says the node hosts, per MoE layer.
pub(crate) fn hosted_rows(status: &v1::StatusResponse) -> Vec<(usize, Vec<u32>)> {
    status
        .hosted
        .as_ref()
        .map(|h| h.layers.iter().map(|row| (row.layer as usize, row.experts.clone())).collect())
        .unwrap_or_default()
}

/// The reader of one stream: hands each answer to its waiter; when the stream ends, marks the link down and fails
/// every answer still awaited with that reason.
async fn read_answers(
    mut inbound: tonic::Streaming<v1::ForwardResponse>,
    waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>,
    health: Arc<Mutex<Health>>,
    state: Arc<AtomicU8>,
    addr: String,
    on_down: impl FnOnce(),
) {
    let reason = loop {
        match inbound.message().await {
            Ok(Some(resp)) => {
                let tx = waiting.lock().unwrap_or_else(|p| p.into_inner()).remove(&resp.id);
                let answer = match resp.result {
                    Some(forward_response::Result::Sums(sums)) => Ok(sums),
                    Some(forward_response::Result::Error(e)) => Err(Failure::refused(e)),
                    None => Err(Failure::Refused {
                        code: v1::ErrorCode::Unspecified,
                        field: "result".into(),
                        message: "an answer without a result".into(),
                    }),
                };
                if let Some(tx) = tx {
                    let _ = tx.send(answer);
                }
            }
            Ok(None) => break format!("expert node {addr} closed the stream"),
            Err(status) => break format!("expert node {addr}: {}", status_reason(&status)),
        };
    };
    tracing::warn!("{reason}; marking it down");
    *health.lock().unwrap_or_else(|p| p.into_inner()) = Health::Down { why: reason.clone() };
    state.store(DOWN, Ordering::Release);
    let orphans: Vec<_> = waiting.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
    for (_, tx) in orphans {
        let _ = tx.send(Err(Failure::NodeDown { reason: reason.clone() }));
    }
    on_down();
}

/// A stream's end status in words, naming a keepalive timeout (a hung node) as such rather than as whatever the
/// HTTP/2 layer calls it.
fn status_reason(status: &tonic::Status) -> String {
    let chain = std::error::Error::source(status).map(error_chain).unwrap_or_default();
    let text = format!("{} {chain}", status.message()).to_lowercase();
    if text.contains("keep-alive") || text.contains("keepalive") || text.contains("ping") {
        return format!("no answer to HTTP/2 keepalive pings: the node is hung or unreachable ({})", status.message());
    }
    if chain.is_empty() {
        format!("{:?}: {}", status.code(), status.message())
    } else {
        format!("{:?}: {}: {chain}", status.code(), status.message())
    }
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
