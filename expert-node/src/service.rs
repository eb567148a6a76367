//! The `ExpertService` gRPC server: the `Forward` stream, shard changes, status, and the standard health service.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use moe_proto::v1::{
    ExpertSet, ForwardRequest, ForwardResponse, LoadExpertsRequest, ShardChange, StatusRequest, StatusResponse,
    UnloadExpertsRequest,
};
use moe_proto::{ExpertService, ExpertServiceServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::node::{Cancels, ComputeQueue, ExpertNode, Job, Refusal, Rejected};
use crate::NodeError;

/// Transport settings of the server. The defaults suit activations of a few MiB per message on a datacenter link.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Largest message accepted or sent. Routers chunk their requests under the limit the node reports in `Status`.
    pub max_message_bytes: usize,
    /// HTTP/2 PING interval on idle connections, and how long to wait for the answer before dropping the peer.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// HTTP/2 flow-control windows: large enough that a whole message is in flight without waiting for WINDOW_UPDATE.
    pub stream_window_bytes: u32,
    pub connection_window_bytes: u32,
    /// Requests waiting for the compute thread, over all streams; beyond it requests are answered
    /// `RESOURCE_EXHAUSTED` at once (routers send them to another replica, or again after a backoff).
    pub max_queued: usize,
    /// Mutual TLS: peers must present a certificate chained to the cluster CA, and their role decides what they
    /// may call ([`moe_tls::Peer::may`]). `None`: plaintext, anyone who reaches the port may call anything.
    pub tls: Option<Arc<moe_tls::Identity>>,
    /// The most memory experts may take here: a `LoadExperts` beyond it is refused.
    pub memory_limit: Option<u64>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            keepalive_interval: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(5),
            stream_window_bytes: 16 << 20,
            connection_window_bytes: 64 << 20,
            max_queued: 256,
            tls: None,
            memory_limit: None,
        }
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// 16 MiB: a 2048-wide bf16 activation block of 4096 tokens, with room for its routing.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Answers a stream may have unread (requests queued or computing included) before the node stops reading it:
/// backpressure reaches that router alone, through HTTP/2 flow control, and the compute thread never waits for it.
const STREAM_DEPTH: usize = 64;

#[derive(Clone)]
struct Service {
    node: Arc<ExpertNode>,
    queue: ComputeQueue,
    /// Whether peers are authenticated (mutual TLS); if not, every call is allowed.
    authenticated: bool,
    memory_limit: Option<u64>,
}

impl Service {
    /// Allows `method` to the peer of `request` if its certificate's role may call it.
    fn authorize<T>(&self, request: &Request<T>, method: &str) -> Result<(), Status> {
        if !self.authenticated {
            return Ok(());
        }
        // The handshake already refused clients without a certificate chained to the CA.
        let certs = request.peer_certs().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let peer = certs
            .first()
            .and_then(moe_tls::Peer::of)
            .ok_or_else(|| Status::permission_denied("the client certificate carries no moe-mesh role"))?;
        if !peer.may(method) {
            tracing::warn!(peer = %peer, addr = ?request.remote_addr(), "refused {method}: not allowed for its role");
            return Err(Status::permission_denied(format!("{peer} may not call {method}")));
        }
        Ok(())
    }
}

type ForwardStream = Pin<Box<dyn Stream<Item = Result<ForwardResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExpertService for Service {
    type ForwardStream = ForwardStream;

    async fn forward(&self, request: Request<Streaming<ForwardRequest>>) -> Result<Response<ForwardStream>, Status> {
        self.authorize(&request, "Forward")?;
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_DEPTH);
        let (node, queue) = (Arc::clone(&self.node), self.queue.clone());
        let cancels = Arc::new(Cancels::default());
        tokio::spawn(async move {
            tracing::debug!(?peer, "forward stream opened");
            loop {
                let req = match inbound.message().await {
                    Ok(Some(req)) => req,
                    Ok(None) => break,
                    Err(status) => {
                        // The router went away, or sent a message over the size limit or one that does not decode:
                        // this stream ends with that status (if anyone still reads it), the node goes on.
                        tracing::info!(?peer, "forward stream ended: {}", status.message());
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                let received = Instant::now();
                let id = req.id;
                if !req.cancel.is_empty() {
                    let n = cancels.cancel(&req.cancel);
                    tracing::debug!(?peer, asked = req.cancel.len(), queued = n, "cancelled");
                    if req.num_tokens == 0 && req.routing.is_none() && req.activations.is_empty() {
                        continue;
                    }
                }
                // A slot for the answer, whatever it is: waits only while this stream's router leaves its answers
                // unread.
                let Ok(slot) = tx.clone().reserve_owned().await else { break };
                match node.check(&req) {
                    Ok(dtype) => {
                        let deadline = (req.deadline_us > 0).then(|| received + Duration::from_micros(req.deadline_us));
                        let cancels = Arc::clone(&cancels);
                        let job = Job { req, dtype, enqueued: received, deadline, reply: slot, cancels };
                        match queue.submit(&node, job) {
                            Ok(()) => {}
                            Err(Rejected::Full(job)) => {
                                node.counters.errors.fetch_add(1, Ordering::Relaxed);
                                node.metrics.refused(moe_proto::v1::ErrorCode::ResourceExhausted);
                                let refusal = Refusal {
                                    code: moe_proto::v1::ErrorCode::ResourceExhausted,
                                    field: String::new(),
                                    message: format!("{} requests are waiting for compute here", queue.depth()),
                                };
                                job.reply.send(Ok(refusal.into_response(id)));
                            }
                            Err(Rejected::Closed) => {
                                let _ = tx.send(Err(Status::unavailable("the compute thread has stopped"))).await;
                                break;
                            }
                        }
                    }
                    Err(refusal) => {
                        node.counters.errors.fetch_add(1, Ordering::Relaxed);
                        node.metrics.refused(refusal.code);
                        tracing::warn!(?peer, id, field = %refusal.field, "refused: {}", refusal.message);
                        slot.send(Ok(refusal.into_response(id)));
                    }
                }
            }
            tracing::debug!(?peer, "forward stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn load_experts(&self, request: Request<LoadExpertsRequest>) -> Result<Response<ShardChange>, Status> {
        self.authorize(&request, "LoadExperts")?;
        let set = request.into_inner().experts.unwrap_or_default();
        self.node.check_set(&set, "experts").map_err(refusal_status)?;
        let _guard = self.node.shard_lock.lock().await;
        if let Some(limit) = self.memory_limit {
            let after = self.node.resident_bytes() + self.node.bytes_to_load(&set);
            if after > limit {
                return Err(Status::resource_exhausted(format!(
                    "experts: loading them would take {:.2} GiB, beyond the {:.2} GiB this node offers",
                    after as f64 / GIB,
                    limit as f64 / GIB
                )));
            }
        }
        let node = Arc::clone(&self.node);
        let started = Instant::now();
        let change = tokio::task::spawn_blocking(move || node.load_set(&set))
            .await
            .map_err(|e| Status::internal(format!("loading experts: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(experts = change.experts, bytes = change.bytes, elapsed = ?started.elapsed(), "experts loaded");
        Ok(Response::new(self.shard_change(change)))
    }

    async fn unload_experts(&self, request: Request<UnloadExpertsRequest>) -> Result<Response<ShardChange>, Status> {
        self.authorize(&request, "UnloadExperts")?;
        let set = request.into_inner().experts.unwrap_or_default();
        self.node.check_set(&set, "experts").map_err(refusal_status)?;
        let _guard = self.node.shard_lock.lock().await;
        let change = self.node.unload_set(&set);
        tracing::info!(experts = change.experts, bytes = change.bytes, "experts unloaded");
        Ok(Response::new(self.shard_change(change)))
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        self.authorize(&request, "Status")?;
        let node = &self.node;
        Ok(Response::new(StatusResponse {
            node_id: node.node_id.clone(),
            model: Some(node.info().clone()),
            device: node.device_kind() as i32,
            hosted: Some(node.hosted()),
            resident_bytes: node.resident_bytes(),
            epoch: node.epoch(),
            max_message_bytes: node.max_message_bytes as u64,
            requests: node.counters.requests.load(Ordering::Relaxed),
            tokens: node.counters.tokens.load(Ordering::Relaxed),
            errors: node.counters.errors.load(Ordering::Relaxed),
        }))
    }
}

impl Service {
    fn shard_change(&self, change: moe_model::ShardChange) -> ShardChange {
        ShardChange {
            experts_changed: change.experts as u32,
            bytes_changed: change.bytes as u64,
            hosted: Some(self.node.hosted()),
            resident_bytes: self.node.resident_bytes(),
        }
    }
}

fn refusal_status(r: Refusal) -> Status {
    let message = format!("{}: {}", r.field, r.message);
    match r.code {
        moe_proto::v1::ErrorCode::FailedPrecondition => Status::failed_precondition(message),
        _ => Status::invalid_argument(message),
    }
}

/// Serves `node` on `listener` until `shutdown` resolves, then drains: open streams end once their requests are
/// answered.
pub async fn serve(
    node: Arc<ExpertNode>,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let queue = ComputeQueue::start(Arc::clone(&node), options.max_queued).map_err(NodeError::Thread)?;
    let service = Service { node, queue, authenticated: options.tls.is_some(), memory_limit: options.memory_limit };
    let service = ExpertServiceServer::new(service)
        .max_decoding_message_size(options.max_message_bytes)
        .max_encoding_message_size(options.max_message_bytes);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<ExpertServiceServer<Service>>().await;
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(options.keepalive_interval))
        .http2_keepalive_timeout(Some(options.keepalive_timeout))
        .initial_stream_window_size(options.stream_window_bytes)
        .initial_connection_window_size(options.connection_window_bytes)
        .add_service(health)
        .add_service(service);
    let served = match &options.tls {
        Some(identity) => {
            identity.watch();
            router.serve_with_incoming_shutdown(moe_tls::incoming(listener, identity.clone()), shutdown).await
        }
        None => {
            // Accepted sockets get TCP_NODELAY here: the builder's setting only applies to listeners it binds
            // itself, and without it Nagle's algorithm and delayed ACKs add 40 ms to every answer that spans
            // several segments. (The TLS acceptor sets it too.)
            let incoming = TcpListenerStream::new(listener).map(|conn| {
                conn.inspect(|stream| {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::warn!("cannot set TCP_NODELAY: {e}");
                    }
                })
            });
            router.serve_with_incoming_shutdown(incoming, shutdown).await
        }
    };
    served.map_err(|e| NodeError::Transport(e.to_string()))
}

/// Binds `addr` (port 0 picks a free port) and returns the listener with the address it got.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), NodeError> {
    let listener = TcpListener::bind(addr).await.map_err(|e| NodeError::Bind(addr, e))?;
    let local = listener.local_addr().map_err(|e| NodeError::Bind(addr, e))?;
    Ok((listener, local))
}

/// The set of everything, for tests and tools.
pub fn expert_set(rows: impl IntoIterator<Item = (usize, Vec<u32>)>) -> ExpertSet {
    ExpertSet::from_rows(rows)
}
