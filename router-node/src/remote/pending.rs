//! Sending one layer's work and waiting for it: the pieces in flight, the rule applied to each failure, and holding
//! work whose experts have no live replica.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use moe_model::{ModelError, PendingExperts};
use moe_proto::codec;
use moe_proto::v1::{self, Dtype, ForwardRequest, Reduce};
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
    /// The message's span, when its step is traced: from send to answer.
    span: Option<tracing::Span>,
    sent_at: Instant,
    deadline: Instant,
    /// Whether its pairs were taken off the node's outstanding count.
    settled: bool,
}

impl Sent {
    /// Takes the piece's pairs off its node's outstanding count, once.
    fn settle(&mut self) {
        if !std::mem::replace(&mut self.settled, true) {
            self.link.settle(self.pairs());
        }
    }

    /// Gives the piece up: off its node's outstanding count, and cancelled there (see [`Link::cancel`]).
    fn cancel(&mut self, stats: &super::RemoteStats) {
        self.settle();
        self.link.cancel(&[self.request.id]);
        stats.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    /// The (token, expert) pairs the piece carries: its weight in the node's outstanding work.
    fn pairs(&self) -> usize {
        self.request.routing.as_ref().map_or(self.tokens.len(), |r| r.experts.len())
    }

    /// A copy of the piece's work, to hedge it away from its node.
    fn copy_owned(&self, hidden: usize) -> Result<Owned, String> {
        let dtype = Dtype::try_from(self.request.dtype).unwrap_or(Dtype::F32);
        let mut rows = vec![0f32; self.request.num_tokens as usize * hidden];
        codec::decode_into(&self.request.activations, dtype, &mut rows).map_err(|e| e.to_string())?;
        Ok(Owned {
            rows,
            tokens: self.tokens.clone(),
            routing: self.request.routing.clone().unwrap_or_default(),
            avoid: Some(Arc::clone(&self.link)),
            not_before: None,
        })
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
        for ((link, v), b) in topo.links.iter().zip(&nodes).zip(&before) {
            link.sent_pairs.fetch_add(v.sent - b, Ordering::Relaxed);
        }
        self.series.planned(
            layer,
            topo.links.iter().zip(&nodes).zip(&before).map(|((link, v), b)| (link.name().to_owned(), v.sent - b)),
        );

        let dtype = self.shared.options.wire_dtype;
        let deadline = self.shared.options.deadline;
        let reduce = self.shared.options.reduce;
        // Inside a traced step, each message gets a span and carries its context to the node.
        let traced = moe_telemetry::trace::traceparent(&tracing::Span::current()).is_some();
        let mut pieces = Vec::new();
        let mut buf = Vec::new();
        for (link, share) in topo.links.iter().zip(&shares) {
            for (chunk, routing) in plan::chunks(share, link.max_tokens_per_message) {
                buf.clear();
                for &row in chunk {
                    buf.extend_from_slice(&work.rows[row as usize * h..(row as usize + 1) * h]);
                }
                let tokens: Vec<u32> = chunk.iter().map(|&row| work.tokens[row as usize]).collect();
                let span = traced.then(|| {
                    tracing::info_span!(
                        "moe.dispatch",
                        layer,
                        node = link.name(),
                        tokens = chunk.len(),
                        "otel.kind" = "client"
                    )
                });
                let request = ForwardRequest {
                    traceparent: span.as_ref().and_then(moe_telemetry::trace::traceparent).unwrap_or_default(),
                    id: self.next_id.fetch_add(1, Ordering::Relaxed),
                    layer: layer as u32,
                    epoch: topo.epoch,
                    dtype: dtype as i32,
                    hidden_size: h as u32,
                    num_tokens: chunk.len() as u32,
                    activations: codec::encode(&buf, dtype),
                    routing: Some(routing),
                    deadline_us: deadline.as_micros() as u64,
                    reduce: reduce as i32,
                    cancel: Vec::new(),
                };
                let bytes = request.activations.len() as u64;
                match link.send(request.clone()) {
                    Ok(answer) => {
                        self.stats.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
                        self.series.sent(link.name(), bytes);
                        pieces.push(Piece::Sent(Sent {
                            link: Arc::clone(link),
                            tokens,
                            request,
                            answer,
                            span,
                            sent_at: Instant::now(),
                            deadline: Instant::now() + deadline,
                            settled: false,
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
    /// Work given up on (an error in another piece, a hold that ended, a forward that failed elsewhere) stops
    /// counting as outstanding, so that replica choice is not skewed by answers nobody waits for, and is cancelled
    /// on its nodes, one message per node.
    fn drop(&mut self) {
        let mut abandoned: Vec<(Arc<Link>, Vec<u64>)> = Vec::new();
        for piece in &mut self.pieces {
            if let Piece::Sent(s) = piece {
                if s.settled {
                    continue;
                }
                s.settle();
                match abandoned.iter_mut().find(|(l, _)| Arc::ptr_eq(l, &s.link)) {
                    Some((_, ids)) => ids.push(s.request.id),
                    None => abandoned.push((Arc::clone(&s.link), vec![s.request.id])),
                }
            }
        }
        for (link, ids) in abandoned {
            self.remote.stats.cancelled.fetch_add(ids.len() as u64, Ordering::Relaxed);
            link.cancel(&ids);
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
        // Sums per token are added as they come, in piece order (node order), which fixes each token's summation
        // order for one placement; rows per pair are kept and added in expert order once all are in.
        let mut pairs = PairRows::default();
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
            let awaited = remote.await_piece(layer, piece);
            remote.stats.wait_ns.fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
            piece.settle();
            let result = match awaited {
                Awaited::Own(result) => result,
                Awaited::Hedged(copies) => {
                    piece.link.suspect(format!(
                        "a piece's copy on another node answered first, after {:?}",
                        piece.sent_at.elapsed()
                    ));
                    remote.stats.hedges_won.fetch_add(1, Ordering::Relaxed);
                    for (mut copy, sums) in copies {
                        add_sums(remote, &copy, &sums, h, out, &mut pairs).map_err(fail)?;
                        copy.span.take();
                        copy.link.answered_well();
                    }
                    i += 1;
                    continue;
                }
            };
            let failure = match result {
                Ok(sums) if !sums_finite(&sums) => Failure::BadAnswer {
                    message: format!("expert node {} answered non-finite partial sums", piece.link.addr),
                },
                Ok(sums) => {
                    add_sums(remote, piece, &sums, h, out, &mut pairs).map_err(fail)?;
                    piece.span.take();
                    piece.link.observe(piece.sent_at.elapsed(), piece.pairs());
                    piece.link.answered_well();
                    i += 1;
                    continue;
                }
                Err(failure) => failure,
            };
            let Piece::Sent(mut piece) = std::mem::replace(&mut this.pieces[i], placeholder()) else { continue };
            if matches!(failure, Failure::Deadline { .. }) {
                // Its node may still have it queued: it goes elsewhere (or there again, as a new request).
                piece.cancel(&remote.stats);
            }
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
        pairs.combine(h, out);
        Ok(())
    }
}

/// Answers per (token, expert) pair, kept until every piece is in.
#[derive(Default)]
struct PairRows {
    /// The expert outputs, a row of `hidden` values each.
    rows: Vec<f32>,
    /// For each row: its token in the batch, its expert and the router weight.
    pairs: Vec<(u32, u32, f32)>,
}

impl PairRows {
    /// Weighs and adds each token's rows in expert order, as the single-process combine does, and adds the result
    /// to `out`: onto the +0 it was filled with (the combine's bits exactly), or onto per-token sums an older node
    /// sent for the same token.
    fn combine(self, h: usize, out: &mut [f32]) {
        if self.pairs.is_empty() {
            return;
        }
        let mut order: Vec<usize> = (0..self.pairs.len()).collect();
        order.sort_by_key(|&r| self.pairs[r].0);
        let mut sum = vec![0f32; h];
        for group in order.chunk_by(|&a, &b| self.pairs[a].0 == self.pairs[b].0) {
            let t = self.pairs[group[0]].0 as usize;
            let terms = group.iter().map(|&r| (self.pairs[r].1, self.pairs[r].2, &self.rows[r * h..(r + 1) * h]));
            moe_model::combine_experts(&mut sum, terms);
            for (o, s) in out[t * h..(t + 1) * h].iter_mut().zip(&sum) {
                *o += s;
            }
        }
    }
}

/// How much later than its node's recent answers say it should a piece may be before it is hedged.
const HEDGE_FACTOR: u32 = 8;
/// The expert compute rate assumed before any node has answered: a slow CPU's, so that the first pieces are
/// hedged only when they are really late (with the factor above: 8 × what 10 GFLOP/s would take).
const COLD_FLOPS_PER_S: f64 = 10e9;

/// What waiting for one piece gave.
enum Awaited {
    /// Its own answer, or why there is none.
    Own(Answer),
    /// A copy of it, sent to other nodes once it was late, answered whole first: the copies and their answers.
    Hedged(Vec<(Sent, v1::PartialSums)>),
}

impl RemoteExperts {
    /// Waits for `piece`'s answer until its deadline. Past its hedge point (see [`RemoteOptions::hedge_min`]), with
    /// every expert of it hosted by another trusted node, a copy goes there and the first whole answer wins.
    fn await_piece(&self, layer: usize, piece: &mut Sent) -> Awaited {
        let deadline = piece.deadline;
        let late = Failure::Deadline { after: self.shared.options.deadline };
        let dropped = |link: &Link| Failure::NodeDown { reason: format!("the stream to {} was dropped", link.addr) };
        let hedge_at = self.shared.options.hedge_min.map(|min| {
            let expected = self.expected(&piece.link, piece.pairs()) * HEDGE_FACTOR;
            piece.sent_at + min.max(expected)
        });
        let first = hedge_at.filter(|&t| t < deadline).unwrap_or(deadline);
        let rt = self.runtime.handle();
        // The timers are made inside the runtime's context (in the async blocks), which they need.
        match rt.block_on(async { tokio::time::timeout_at(first.into(), &mut piece.answer).await }) {
            Ok(answer) => return Awaited::Own(answer.unwrap_or_else(|_| Err(dropped(&piece.link)))),
            Err(_) if first == deadline => return Awaited::Own(Err(late)),
            Err(_) => {}
        }
        let Some(mut copies) = self.hedge(layer, piece) else {
            return match rt.block_on(async { tokio::time::timeout_at(deadline.into(), &mut piece.answer).await }) {
                Ok(answer) => Awaited::Own(answer.unwrap_or_else(|_| Err(dropped(&piece.link)))),
                Err(_) => Awaited::Own(Err(late)),
            };
        };
        self.stats.hedged.fetch_add(1, Ordering::Relaxed);
        tracing::info!(layer, node = piece.link.name(), "a piece is late: copied to {} other node(s)", copies.len());
        enum Won {
            Own(Result<Answer, oneshot::error::RecvError>),
            Copies(Vec<v1::PartialSums>),
            Late,
        }
        let won = rt.block_on(async {
            // The copies count only whole and good; one that fails leaves the original to answer.
            let all = async {
                let mut got = Vec::with_capacity(copies.len());
                for copy in copies.iter_mut() {
                    match (&mut copy.answer).await {
                        Ok(Ok(sums)) if sums_finite(&sums) => got.push(sums),
                        _ => return None,
                    }
                }
                Some(got)
            };
            tokio::select! {
                answer = &mut piece.answer => Won::Own(answer),
                Some(got) = all => Won::Copies(got),
                _ = tokio::time::sleep_until(deadline.into()) => Won::Late,
            }
        });
        match won {
            Won::Copies(got) => {
                for copy in &mut copies {
                    copy.settle();
                    copy.link.observe(copy.sent_at.elapsed(), copy.pairs());
                }
                // The late original: the slow node drops it if it has not begun it yet.
                piece.cancel(&self.stats);
                Awaited::Hedged(copies.into_iter().zip(got).collect())
            }
            own => {
                for copy in &mut copies {
                    copy.cancel(&self.stats);
                }
                match own {
                    Won::Own(answer) => Awaited::Own(answer.unwrap_or_else(|_| Err(dropped(&piece.link)))),
                    _ => Awaited::Own(Err(late)),
                }
            }
        }
    }

    /// What `pairs` (token, expert) pairs should take on `link`: by its own recent answers; before it has any, by
    /// the fastest estimate of the other live nodes (so that a node slow from its first answer is not the measure
    /// of itself); before any node has answered, by a deliberately slow rate for this model's experts, so that a
    /// cold router does not hedge a first large piece at the floor.
    fn expected(&self, link: &Link, pairs: usize) -> Duration {
        let topo = self.current();
        let c = &self.shared.config;
        reference(
            link.expected(pairs),
            topo.links.iter().filter(|l| !l.is_down()).map(|l| l.expected(pairs)),
            cold(c.hidden_size, c.moe_intermediate_size, pairs),
        )
    }

    /// Sends a copy of `piece` to other nodes, if every one of its experts has a trusted live replica elsewhere;
    /// the copies sent, or `None` when it cannot be hedged.
    fn hedge(&self, layer: usize, piece: &Sent) -> Option<Vec<Sent>> {
        let topo = self.current();
        let slow = topo.index_of(&piece.link)?;
        let table = topo.placement.get(layer)?;
        let routing = piece.request.routing.as_ref()?;
        let elsewhere = |e: &u32| {
            table.get(*e as usize).is_some_and(|replicas| {
                replicas.iter().any(|&r| r != slow && topo.links[r].is_trusted() && !topo.links[r].is_down())
            })
        };
        if !routing.experts.iter().all(elsewhere) {
            return None;
        }
        let work = piece.copy_owned(self.shared.config.hidden_size).ok()?;
        let pieces = self.scatter(&topo, layer, work.work()).ok()?;
        let mut copies = Vec::with_capacity(pieces.len());
        let mut whole = true;
        for p in pieces {
            match p {
                Piece::Sent(s) if !Arc::ptr_eq(&s.link, &piece.link) => copies.push(s),
                Piece::Sent(mut s) => {
                    s.settle();
                    whole = false;
                }
                Piece::Held(_) => whole = false,
            }
        }
        if !whole {
            copies.iter_mut().for_each(Sent::settle);
            return None;
        }
        Some(copies)
    }
}

/// What a piece should take: its node's own estimate, else the fastest of the others', else the cold estimate.
fn reference(own: Option<Duration>, others: impl Iterator<Item = Option<Duration>>, cold: Duration) -> Duration {
    own.or_else(|| others.flatten().min()).unwrap_or(cold)
}

/// What `pairs` (token, expert) pairs take at [`COLD_FLOPS_PER_S`]: gate, up and down projections, three matrices
/// of hidden × moe_intermediate at 2 FLOPs per weight.
fn cold(hidden: usize, moe_intermediate: usize, pairs: usize) -> Duration {
    let flops = 6.0 * (hidden * moe_intermediate) as f64 * pairs.max(1) as f64;
    Duration::from_secs_f64(flops / COLD_FLOPS_PER_S)
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
    pairs: &mut PairRows,
) -> Result<(), String> {
    let decoding = Instant::now();
    let addr = &piece.link.addr;
    let dtype = Dtype::try_from(sums.dtype).unwrap_or(Dtype::Unspecified);
    let size = dtype.size().ok_or_else(|| format!("expert node {addr} answered in dtype {}", sums.dtype))?;
    // The answer says its form: a node older than per-pair answers sends per-token sums whatever was asked, and
    // those are added as such (right, but grouped by node).
    let per_pair = sums.reduce == Reduce::Pair as i32;
    if per_pair && piece.request.reduce != Reduce::Pair as i32 {
        return Err(format!("expert node {addr} answered per pair where one sum per token was asked"));
    }
    let routing = piece.request.routing.as_ref();
    let rows = if per_pair { routing.map_or(0, |r| r.experts.len()) } else { piece.tokens.len() };
    if sums.num_tokens as usize != piece.tokens.len() || sums.sums.len() != rows * h * size {
        return Err(format!(
            "expert node {addr} answered {} bytes for {} tokens ({} expected: {rows} rows of {h})",
            sums.sums.len(),
            sums.num_tokens,
            rows * h * size
        ));
    }
    let bytes: &Bytes = &sums.sums;
    match routing.filter(|_| per_pair) {
        Some(routing) => {
            let at = pairs.rows.len();
            pairs.rows.resize(at + rows * h, 0.0);
            codec::decode_into(bytes, dtype, &mut pairs.rows[at..]).map_err(|e| e.to_string())?;
            for (k, &t) in piece.tokens.iter().enumerate() {
                let (a, b) = (routing.offsets[k] as usize, routing.offsets[k + 1] as usize);
                for j in a..b {
                    pairs.pairs.push((t, routing.experts[j], routing.weights[j]));
                }
            }
        }
        None => {
            for (k, &t) in piece.tokens.iter().enumerate() {
                let t = t as usize;
                codec::add_into(&bytes[k * h * size..(k + 1) * h * size], dtype, &mut out[t * h..(t + 1) * h])
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    let stats = &remote.stats;
    stats.decode_ns.fetch_add(decoding.elapsed().as_nanos() as u64, Ordering::Relaxed);
    stats.messages.fetch_add(1, Ordering::Relaxed);
    stats.bytes_received.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    remote.series.answered(piece.link.name(), piece.sent_at.elapsed(), bytes.len() as u64);
    if let Some(t) = &sums.timings {
        stats.node_queue_us.fetch_add(t.queue_us, Ordering::Relaxed);
        stats.node_codec_us.fetch_add(t.decode_us + t.encode_us, Ordering::Relaxed);
        stats.node_compute_us.fetch_add(t.compute_us, Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_piece_is_measured_by_its_node_then_by_the_fastest_other_then_by_the_cold_rate() {
        let cold = cold(2048, 512, 4096);
        // The bench model's 512-token prefill on two nodes: about 4096 pairs each, 2.6 s at the cold rate, so
        // 21 s with the hedge factor: a cold router does not hedge it at the 250 ms floor.
        assert!((2.5..2.7).contains(&cold.as_secs_f64()), "{cold:?}");
        assert!(cold * HEDGE_FACTOR > Duration::from_millis(250) * 80);
        // A decode step's piece (8 pairs) stays under the floor.
        assert!(super::cold(2048, 512, 8) * HEDGE_FACTOR < Duration::from_millis(250));
        assert_eq!(reference(Some(5 * MS), [Some(MS)].into_iter(), cold), 5 * MS, "its own answers come first");
        // A node that never won (its answers always came after a copy's) is measured by the fastest other node, so
        // a node slow from its first answer does not set its own, slow, measure.
        assert_eq!(reference(None, [None, Some(9 * MS), Some(3 * MS)].into_iter(), cold), 3 * MS);
        assert_eq!(reference(None, [None, None].into_iter(), cold), cold);
    }
}
