//! Sending one layer's work and waiting for it: the pieces in flight, the rule applied to each failure, and holding
//! work whose experts have no live replica.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moe_model::{ModelError, PendingExperts};
use moe_proto::codec;
use moe_proto::v1::{self, Dtype, ForwardRequest};
use tokio::sync::oneshot;

use super::link::{Answer, Link};
use super::outcome::{Failure, Mark, Next};
use super::plan::{self, NodeView, Unplaceable};
use super::topology::Topology;
use super::RemoteExperts;

/// Work not (or no longer) in flight: the hidden vectors of some of the batch's tokens, their indices in the batch
/// and their routing (CSR over the rows).
pub(crate) struct Owned {
    pub rows: Vec<f32>,
    pub tokens: Vec<u32>,
    pub routing: v1::Routing,
    /// The node it failed on: used again only for experts no other live node hosts.
    pub avoid: Option<Arc<Link>>,
    /// Not to be planned before (a backoff).
    pub not_before: Option<Instant>,
}

/// One message in flight: where it went, which of the batch's tokens it carries, and the request (kept to plan it
/// again if its node fails or refuses it).
pub(crate) struct Sent {
    link: Arc<Link>,
    tokens: Vec<u32>,
    request: ForwardRequest,
    answer: oneshot::Receiver<Answer>,
    deadline: Instant,
}

impl Sent {
    /// The (token, expert) pairs the piece carries: its weight in the node's outstanding work.
    fn pairs(&self) -> usize {
        self.request.routing.as_ref().map_or(self.tokens.len(), |r| r.experts.len())
    }

    /// The piece's work back, to plan again.
    fn into_owned(self, hidden: usize, avoid: bool, not_before: Option<Instant>) -> Result<Owned, String> {
        let dtype = Dtype::try_from(self.request.dtype).unwrap_or(Dtype::F32);
        let mut rows = vec![0f32; self.request.num_tokens as usize * hidden];
        codec::decode_into(&self.request.activations, dtype, &mut rows).map_err(|e| e.to_string())?;
        Ok(Owned {
            rows,
            tokens: self.tokens,
            routing: self.request.routing.unwrap_or_default(),
            avoid: avoid.then_some(self.link),
            not_before,
        })
    }
}

impl Owned {
    pub(crate) fn work(&self) -> Work<'_> {
        Work { rows: &self.rows, tokens: &self.tokens, routing: &self.routing, avoid: self.avoid.as_ref() }
    }
}

/// Work to plan, borrowed: from the model's buffers at dispatch (nothing is copied unless it has to be held), or
/// from a held piece.
#[derive(Clone, Copy)]
pub(crate) struct Work<'a> {
    pub rows: &'a [f32],
    pub tokens: &'a [u32],
    pub routing: &'a v1::Routing,
    pub avoid: Option<&'a Arc<Link>>,
}

impl Work<'_> {
    /// The work kept, to hold it.
    pub(crate) fn held(self) -> Owned {
        Owned {
            rows: self.rows.to_vec(),
            tokens: self.tokens.to_vec(),
            routing: self.routing.clone(),
            avoid: self.avoid.cloned(),
            not_before: None,
        }
    }
}

pub(crate) enum Piece {
    Sent(Sent),
    Held(Owned),
}

/// Why work could not be sent at all.
pub(crate) enum Stall {
    /// No live node hosts this expert now.
    NoLiveReplica(String),
    /// The work is wrong: a bug on this side.
    Bug(String),
}

impl RemoteExperts {
    /// Plans and sends `work` (one layer's) under `topo`: each token once per node, with its (expert, weight) pairs
    /// local to that node, chunked under the node's message limit. A chunk whose send fails comes back held (away
    /// from that node); nothing is sent when some expert has no live replica.
    pub(crate) fn scatter(&self, topo: &Topology, layer: usize, work: Work<'_>) -> Result<Vec<Piece>, Stall> {
        let h = self.shared.config.hidden_size;
        let Some(table) = topo.placement.get(layer).filter(|t| !t.is_empty()) else {
            return Err(if topo.links.is_empty() {
                Stall::NoLiveReplica("no placement yet: waiting for the controller and the expert nodes".into())
            } else {
                Stall::Bug(format!("layer {layer} is not a MoE layer"))
            });
        };
        let avoided = work.avoid.and_then(|a| topo.index_of(a));
        let mut nodes: Vec<NodeView> = topo
            .links
            .iter()
            .enumerate()
            .map(|(i, l)| NodeView {
                live: !l.is_down(),
                preferred: l.is_trusted() && Some(i) != avoided,
                load: l.outstanding.load(Ordering::Relaxed),
                sent: l.sent_pairs.load(Ordering::Relaxed),
            })
            .collect();
        let before: Vec<u64> = nodes.iter().map(|v| v.sent).collect();
        let shares = plan::plan(work.routing, table, &mut nodes).map_err(|u| match u {
            Unplaceable::NoLiveReplica { expert } => {
                let why: Vec<_> = table
                    .get(expert as usize)
                    .into_iter()
                    .flatten()
                    .filter_map(|&r| topo.links[r].down_reason())
                    .collect();
                let why = if why.is_empty() { "no node hosts it".to_owned() } else { why.join("; ") };
                Stall::NoLiveReplica(format!("no live node hosts expert {expert} of layer {layer}: {why}"))
            }
            Unplaceable::NoSuchExpert { expert } => {
                Stall::Bug(format!("expert {expert} of layer {layer} is not in the placement"))
            }
        })?;
        for ((link, v), b) in topo.links.iter().zip(&nodes).zip(before) {
            link.sent_pairs.fetch_add(v.sent - b, Ordering::Relaxed);
        }

        let dtype = self.shared.options.wire_dtype;
        let deadline = self.shared.options.deadline;
        let mut pieces = Vec::new();
        let mut buf = Vec::new();
        for (link, share) in topo.links.iter().zip(&shares) {
            for (chunk, routing) in plan::chunks(share, link.max_tokens_per_message) {
                buf.clear();
                for &row in chunk {
                    buf.extend_from_slice(&work.rows[row as usize * h..(row as usize + 1) * h]);
                }
                let tokens: Vec<u32> = chunk.iter().map(|&row| work.tokens[row as usize]).collect();
                let request = ForwardRequest {
                    id: self.next_id.fetch_add(1, Ordering::Relaxed),
                    layer: layer as u32,
                    epoch: topo.epoch,
                    dtype: dtype as i32,
                    hidden_size: h as u32,
                    num_tokens: chunk.len() as u32,
                    activations: codec::encode(&buf, dtype),
                    routing: Some(routing),
                    deadline_us: deadline.as_micros() as u64,
                };
                let bytes = request.activations.len() as u64;
                match link.send(request.clone()) {
                    Ok(answer) => {
                        self.stats.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
                        pieces.push(Piece::Sent(Sent {
                            link: Arc::clone(link),
                            tokens,
                            request,
                            answer,
                            deadline: Instant::now() + deadline,
                        }));
                    }
                    Err(failure) => {
                        // Down since the plan, or its queue is full: this chunk goes again, elsewhere if it can.
                        let not_before = (failure.next() == Next::Backoff).then(|| Instant::now() + BACKOFF);
                        tracing::debug!(layer, addr = %link.addr, "send failed: {failure}");
                        pieces.push(Piece::Held(Owned {
                            rows: buf.clone(),
                            tokens,
                            routing: request.routing.unwrap_or_default(),
                            avoid: Some(Arc::clone(link)),
                            not_before,
                        }));
                    }
                }
            }
        }
        Ok(pieces)
    }
}

/// The wait before planning again a piece refused because its node is full.
const BACKOFF: Duration = Duration::from_millis(20);
/// The longest a held piece waits for a change of placement before it looks again anyway.
const HOLD_POLL: Duration = Duration::from_millis(250);

pub(crate) struct RemotePending<'a> {
    remote: &'a RemoteExperts,
    layer: usize,
    ntok: usize,
    pieces: Vec<Piece>,
    /// When this wait began holding (cleared when held work could be sent).
    holding_since: Option<Instant>,
}

impl<'a> RemotePending<'a> {
    pub(crate) fn new(remote: &'a RemoteExperts, layer: usize, ntok: usize, pieces: Vec<Piece>) -> Self {
        RemotePending { remote, layer, ntok, pieces, holding_since: None }
    }

    /// Blocks until the topology changes (or `HOLD_POLL` passes) after generation `seen`.
    fn wait_for_change(&self, seen: u64) {
        let mut rx = self.remote.shared.generation.subscribe();
        self.remote.runtime.handle().block_on(async {
            let _ = tokio::time::timeout(HOLD_POLL, rx.wait_for(|g| *g != seen)).await;
        });
    }

    /// Counts the wait as holding; `Err` once the hold has to end.
    fn hold(&mut self, why: &str) -> Result<(), String> {
        let remote = self.remote;
        let since = match self.holding_since {
            Some(since) => since,
            None => {
                remote.stats.holds.fetch_add(1, Ordering::Relaxed);
                remote.stats.holding.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(layer = self.layer, "holding the step: {why}");
                *self.holding_since.insert(Instant::now())
            }
        };
        let limit = remote.shared.options.hold_timeout;
        let gave_up = if !remote.wanted() {
            Some("no sequence of the step waits for it any more".to_owned())
        } else if since.elapsed() >= limit {
            Some(format!("held for {limit:?}"))
        } else {
            None
        };
        match gave_up {
            Some(reason) => {
                remote.stats.holds_abandoned.fetch_add(1, Ordering::Relaxed);
                Err(format!("{why} ({reason})"))
            }
            None => Ok(()),
        }
    }

    fn end_hold(&mut self) {
        if self.holding_since.take().is_some() {
            self.remote.stats.holding.fetch_sub(1, Ordering::Relaxed);
            tracing::info!(layer = self.layer, "held work sent again");
        }
    }
}

impl Drop for RemotePending<'_> {
    /// Work given up on (an error in another piece, or a forward that failed elsewhere) stops counting as
    /// outstanding, so that replica choice is not skewed by answers nobody waits for.
    fn drop(&mut self) {
        for piece in &self.pieces {
            if let Piece::Sent(s) = piece {
                s.link.settle(s.pairs());
            }
        }
        self.end_hold();
    }
}

impl PendingExperts for RemotePending<'_> {
    fn wait(self: Box<Self>, out: &mut [f32]) -> moe_model::Result<()> {
        let mut this = *self;
        let (remote, layer, ntok) = (this.remote, this.layer, this.ntok);
        let h = remote.shared.config.hidden_size;
        let fail = |message: String| ModelError::Experts { layer, message };
        if out.len() != ntok * h {
            return Err(fail(format!("output has {} values for {ntok} tokens of width {h}", out.len())));
        }
        out.fill(0.0);
        // Pieces are in node order; adding them in that order fixes each token's summation order.
        let mut i = 0;
        while i < this.pieces.len() {
            if let Piece::Held(work) = &this.pieces[i] {
                if let Some(t) = work.not_before {
                    std::thread::sleep(t.saturating_duration_since(Instant::now()));
                }
                let seen = *remote.shared.generation.borrow();
                match remote.scatter(&remote.current(), layer, work.work()) {
                    Ok(again) => {
                        this.pieces.splice(i..=i, again);
                        if this.pieces[i..].iter().all(|p| matches!(p, Piece::Sent(_))) {
                            this.end_hold();
                        }
                    }
                    Err(Stall::NoLiveReplica(why)) => {
                        this.hold(&why).map_err(fail)?;
                        this.wait_for_change(seen);
                    }
                    Err(Stall::Bug(why)) => return Err(fail(why)),
                }
                continue;
            }
            let Piece::Sent(piece) = &mut this.pieces[i] else { continue };
            let waited = Instant::now();
            let deadline = piece.deadline;
            let answer = remote
                .runtime
                .handle()
                .block_on(async { tokio::time::timeout_at(deadline.into(), &mut piece.answer).await });
            remote.stats.wait_ns.fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
            piece.link.settle(piece.pairs());
            let result = match answer {
                Err(_) => Err(Failure::Deadline { after: remote.shared.options.deadline }),
                Ok(Err(_)) => {
                    Err(Failure::NodeDown { reason: format!("the stream to {} was dropped", piece.link.addr) })
                }
                Ok(Ok(result)) => result,
            };
            let failure = match result {
                Ok(sums) if !sums_finite(&sums) => Failure::BadAnswer {
                    message: format!("expert node {} answered non-finite partial sums", piece.link.addr),
                },
                Ok(sums) => {
                    add_sums(remote, piece, &sums, h, out).map_err(fail)?;
                    piece.link.answered_well();
                    i += 1;
                    continue;
                }
                Err(failure) => failure,
            };
            let Piece::Sent(piece) = std::mem::replace(&mut this.pieces[i], placeholder()) else { continue };
            let addr = piece.link.addr.clone();
            let next = failure.next();
            let seen = *remote.shared.generation.borrow();
            let owned = match next {
                Next::Fail => return Err(fail(format!("expert node {addr}: {failure}"))),
                Next::Elsewhere(mark) => {
                    if mark == Mark::Suspect {
                        piece.link.suspect(failure.to_string());
                    }
                    piece.into_owned(h, true, None)
                }
                Next::AfterPlacementChange => {
                    this.hold(&format!("expert node {addr}: {failure}")).map_err(fail)?;
                    this.wait_for_change(seen);
                    piece.into_owned(h, true, None)
                }
                Next::Backoff => {
                    this.hold(&format!("expert node {addr}: {failure}")).map_err(fail)?;
                    piece.into_owned(h, true, Some(Instant::now() + BACKOFF))
                }
            }
            .map_err(fail)?;
            tracing::warn!(layer, from = %addr, "{failure}; planning the piece again");
            remote.stats.resent.fetch_add(1, Ordering::Relaxed);
            this.pieces[i] = Piece::Held(owned);
        }
        Ok(())
    }
}

/// A piece that stands for nothing, while the real one is being replaced.
fn placeholder() -> Piece {
    Piece::Held(Owned {
        rows: Vec::new(),
        tokens: Vec::new(),
        routing: v1::Routing::default(),
        avoid: None,
        not_before: None,
    })
}

/// Whether every partial sum of an answer is finite (checked before any is added). A NaN or infinity from a node
/// is a fault of that node; computed on valid activations with finite weights, no partial sum is one.
fn sums_finite(sums: &v1::PartialSums) -> bool {
    let bytes: &[u8] = &sums.sums;
    match Dtype::try_from(sums.dtype) {
        Ok(Dtype::F32) => bytes.chunks_exact(4).all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
        // bf16: all exponent bits set is an infinity or a NaN.
        Ok(Dtype::Bf16) => bytes.chunks_exact(2).all(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 != 0x7f80),
        // Checked, and refused, where the sums are added.
        _ => true,
    }
}

/// Checks one answer against its piece and adds its partial sums into `out`.
fn add_sums(
    remote: &RemoteExperts,
    piece: &Sent,
    sums: &v1::PartialSums,
    h: usize,
    out: &mut [f32],
) -> Result<(), String> {
    let decoding = Instant::now();
    let addr = &piece.link.addr;
    let dtype = Dtype::try_from(sums.dtype).unwrap_or(Dtype::Unspecified);
    let size = dtype.size().ok_or_else(|| format!("expert node {addr} answered in dtype {}", sums.dtype))?;
    if sums.num_tokens as usize != piece.tokens.len() || sums.sums.len() != piece.tokens.len() * h * size {
        return Err(format!(
            "expert node {addr} answered {} bytes for {} tokens ({} expected)",
            sums.sums.len(),
            sums.num_tokens,
            piece.tokens.len() * h * size
        ));
    }
    let bytes: &Bytes = &sums.sums;
    for (k, &t) in piece.tokens.iter().enumerate() {
        let t = t as usize;
        codec::add_into(&bytes[k * h * size..(k + 1) * h * size], dtype, &mut out[t * h..(t + 1) * h])
            .map_err(|e| e.to_string())?;
    }
    let stats = &remote.stats;
    stats.decode_ns.fetch_add(decoding.elapsed().as_nanos() as u64, Ordering::Relaxed);
    stats.messages.fetch_add(1, Ordering::Relaxed);
    stats.bytes_received.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    if let Some(t) = &sums.timings {
        stats.node_queue_us.fetch_add(t.queue_us, Ordering::Relaxed);
        stats.node_codec_us.fetch_add(t.decode_us + t.encode_us, Ordering::Relaxed);
        stats.node_compute_us.fetch_add(t.compute_us, Ordering::Relaxed);
    }
    Ok(())
}
