//! The expert shard a node hosts, the checks every request passes, and the compute queue.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use moe_model::{Checkpoint, Family, ModelConfig, Residency, Routing};
use moe_proto::codec;
use moe_proto::v1::{
    forward_response, Dtype, ErrorCode, ExpertSet, ForwardError, ForwardRequest, ForwardResponse, ModelInfo,
    PartialSums, Reduce, Timings,
};

use crate::shard::Shard;
use crate::spec::ExpertSpec;
use crate::NodeError;

/// An expert node's model, shard and counters. Shared by every stream and call.
pub struct ExpertNode {
    pub node_id: String,
    config: ModelConfig,
    ckpt: Checkpoint,
    experts: Shard,
    info: ModelInfo,
    /// The placement epochs served: `epoch_lo..=epoch_hi` (both 0 under a static placement).
    epoch_lo: AtomicU64,
    epoch_hi: AtomicU64,
    pub(crate) max_message_bytes: usize,
    pub(crate) counters: Counters,
    /// The series of `/metrics`.
    pub(crate) metrics: crate::metrics::NodeMetrics,
    /// (token, expert) pairs computed per (layer, expert) since the last [`ExpertNode::take_load`].
    expert_load: Vec<Vec<AtomicU64>>,
    /// One load or unload at a time; forwards go on meanwhile.
    pub(crate) shard_lock: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub tokens: AtomicU64,
    pub errors: AtomicU64,
}

impl std::fmt::Debug for ExpertNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertNode").field("node_id", &self.node_id).field("experts", &self.experts).finish()
    }
}

/// A request refused before or instead of computing; becomes a [`ForwardError`] on the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub field: String,
    pub message: String,
}

impl Refusal {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Refusal { code: ErrorCode::InvalidArgument, field: field.into(), message: message.into() }
    }

    fn precondition(field: impl Into<String>, message: impl Into<String>) -> Self {
        Refusal { code: ErrorCode::FailedPrecondition, field: field.into(), message: message.into() }
    }

    pub fn into_response(self, id: u64) -> ForwardResponse {
        ForwardResponse {
            id,
            result: Some(forward_response::Result::Error(ForwardError {
                code: self.code as i32,
                field: self.field,
                message: self.message,
            })),
        }
    }
}

impl ExpertNode {
    /// Opens the model in `dir` and loads the experts of `spec` onto `device`, calling `progress(bytes_loaded)` as
    /// they load.
    pub fn load(
        dir: &Path,
        spec: &ExpertSpec,
        device: &moe_cuda::Device,
        residency: Residency,
        node_id: String,
        max_message_bytes: usize,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Self, NodeError> {
        let config_path = dir.join("config.json");
        let config_bytes =
            std::fs::read(&config_path).map_err(|source| NodeError::Io { path: config_path.clone(), source })?;
        let config = ModelConfig::from_file(&config_path)?;
        spec.validate(config.num_hidden_layers, config.num_experts)?;
        let ckpt = Checkpoint::open_with(dir, residency)?;
        let experts = Shard::empty(&config, device)?;
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !done.load(Ordering::Acquire) {
                    progress(ckpt.bytes_loaded());
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
            let loaded = experts.load_more(&ckpt, &config, |l, e| spec.contains(l, e));
            done.store(true, Ordering::Release);
            loaded
        })?;
        progress(ckpt.bytes_loaded());
        let info = ModelInfo {
            fingerprint: ckpt.fingerprint(&config_bytes),
            hidden_size: config.hidden_size as u32,
            num_layers: config.num_hidden_layers as u32,
            num_experts: config.num_experts as u32,
            moe_intermediate_size: config.moe_intermediate_size as u32,
            model_type: match config.family {
                Family::Qwen3Next => "qwen3_next".into(),
                Family::Qwen35Moe => "qwen3_5_moe".into(),
            },
        };
        let expert_load = (0..config.num_hidden_layers)
            .map(|_| (0..config.num_experts).map(|_| AtomicU64::new(0)).collect())
            .collect();
        Ok(ExpertNode {
            node_id,
            config,
            ckpt,
            experts,
            info,
            epoch_lo: AtomicU64::new(0),
            epoch_hi: AtomicU64::new(0),
            max_message_bytes,
            counters: Counters::default(),
            metrics: crate::metrics::NodeMetrics::default(),
            expert_load,
            shard_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The newest placement epoch served.
    pub fn epoch(&self) -> u64 {
        self.epoch_hi.load(Ordering::Acquire)
    }

    /// The placement epochs served, oldest and newest.
    pub fn epochs(&self) -> (u64, u64) {
        (self.epoch_lo.load(Ordering::Acquire), self.epoch_hi.load(Ordering::Acquire))
    }

    /// Serves the placement epochs `lo..=hi` from now on: work for any other epoch is refused, so that a router
    /// on a placement this node no longer (or not yet) follows cannot mix two placements.
    pub fn set_epochs(&self, lo: u64, hi: u64) {
        // Widen first, then narrow: a request checked in between sees a range that holds both.
        if hi >= self.epoch_hi.load(Ordering::Acquire) {
            self.epoch_hi.store(hi, Ordering::Release);
            self.epoch_lo.store(lo.min(hi), Ordering::Release);
        } else {
            self.epoch_lo.store(lo.min(hi), Ordering::Release);
            self.epoch_hi.store(hi, Ordering::Release);
        }
    }

    fn count_load(&self, req: &ForwardRequest) {
        let (Some(row), Some(routing)) = (self.expert_load.get(req.layer as usize), &req.routing) else { return };
        for &e in &routing.experts {
            if let Some(c) = row.get(e as usize) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// (token, expert) pairs computed per (MoE layer, expert) since the last call, in the order of `moe_layers`.
    pub fn take_load(&self, moe_layers: &[u32]) -> Vec<Vec<u64>> {
        moe_layers
            .iter()
            .map(|&l| {
                self.expert_load
                    .get(l as usize)
                    .map_or_else(Vec::new, |row| row.iter().map(|c| c.swap(0, Ordering::Relaxed)).collect())
            })
            .collect()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn hosted(&self) -> ExpertSet {
        ExpertSet::from_rows(self.experts.hosted())
    }

    /// The devices computing, as members list them: `cpu`, or one line per GPU.
    pub fn devices(&self) -> Vec<String> {
        self.experts.devices()
    }

    pub fn device_kind(&self) -> moe_proto::v1::DeviceKind {
        if self.experts.device_memory().is_some() {
            moe_proto::v1::DeviceKind::Cuda
        } else {
            moe_proto::v1::DeviceKind::Cpu
        }
    }

    /// Device memory free for experts when the devices opened (GPUs only).
    pub fn device_memory(&self) -> Option<u64> {
        self.experts.device_memory()
    }

    pub fn resident_bytes(&self) -> u64 {
        self.experts.resident_bytes() as u64
    }

    /// Checks an expert set from LoadExperts / UnloadExperts against the model.
    pub fn check_set(&self, set: &ExpertSet, field: &str) -> Result<(), Refusal> {
        for (i, row) in set.layers.iter().enumerate() {
            let layer = row.layer as usize;
            if layer >= self.config.num_hidden_layers || !self.config.is_moe_layer(layer) {
                return Err(Refusal::invalid(
                    format!("{field}.layers[{i}].layer"),
                    format!("layer {layer} is not a MoE layer of this model"),
                ));
            }
            if let Some((j, e)) = row.experts.iter().enumerate().find(|(_, &e)| e as usize >= self.config.num_experts) {
                return Err(Refusal::invalid(
                    format!("{field}.layers[{i}].experts[{j}]"),
                    format!("expert {e} does not exist (the model has {})", self.config.num_experts),
                ));
            }
        }
        Ok(())
    }

    /// Loads the experts of `set` that are not held yet (blocking: reads the checkpoint).
    pub fn load_set(&self, set: &ExpertSet) -> Result<moe_model::ShardChange, NodeError> {
        let wanted = set_contains(set);
        self.experts.load_more(&self.ckpt, &self.config, wanted)
    }

    /// Bytes the experts of `set` not held yet would add (three bf16 matrices each).
    pub fn bytes_to_load(&self, set: &ExpertSet) -> u64 {
        let c = &self.config;
        let per_expert = 3 * c.hidden_size as u64 * c.moe_intermediate_size as u64 * 2;
        let hosted: std::collections::BTreeSet<(u32, u32)> =
            self.experts.hosted().into_iter().flat_map(|(l, es)| es.into_iter().map(move |e| (l as u32, e))).collect();
        let mut missing = std::collections::BTreeSet::new();
        for row in &set.layers {
            for &e in &row.experts {
                if !hosted.contains(&(row.layer, e)) {
                    missing.insert((row.layer, e));
                }
            }
        }
        missing.len() as u64 * per_expert
    }

    pub fn unload_set(&self, set: &ExpertSet) -> moe_model::ShardChange {
        let wanted = set_contains(set);
        self.experts.unload(wanted)
    }

    /// Checks everything about a request that can be checked without computing. Returns its dtype.
    pub fn check(&self, req: &ForwardRequest) -> Result<Dtype, Refusal> {
        let h = self.config.hidden_size;
        let dtype = match Dtype::try_from(req.dtype) {
            Ok(Dtype::Unspecified) | Err(_) => {
                return Err(Refusal::invalid("dtype", format!("dtype {} is not BF16 or F32", req.dtype)));
            }
            Ok(d) => d,
        };
        let layer = req.layer as usize;
        if layer >= self.config.num_hidden_layers {
            return Err(Refusal::invalid(
                "layer",
                format!("layer {layer} does not exist (the model has {})", self.config.num_hidden_layers),
            ));
        }
        if !self.config.is_moe_layer(layer) {
            return Err(Refusal::invalid("layer", format!("layer {layer} has a dense MLP, no routed experts")));
        }
        if req.hidden_size as usize != h {
            return Err(Refusal::invalid(
                "hidden_size",
                format!("hidden size {} does not match the model's {h}", req.hidden_size),
            ));
        }
        let (lo, hi) = self.epochs();
        if req.epoch < lo || req.epoch > hi {
            let serves = if lo == hi { format!("epoch {hi}") } else { format!("epochs {lo}..={hi}") };
            return Err(Refusal::precondition(
                "epoch",
                format!("placement epoch {} is not served here (this node serves {serves})", req.epoch),
            ));
        }
        if Reduce::try_from(req.reduce).is_err() {
            return Err(Refusal::invalid("reduce", format!("{} is not a form of answer this node knows", req.reduce)));
        }
        let n = req.num_tokens as usize;
        if n == 0 {
            return Err(Refusal::invalid("num_tokens", "a request must carry at least one token"));
        }
        let size = dtype.size().unwrap_or(0);
        let expected = n.checked_mul(h).and_then(|v| v.checked_mul(size));
        if expected != Some(req.activations.len()) {
            return Err(Refusal::invalid(
                "activations",
                format!(
                    "{} bytes for {n} tokens × hidden {h} × {size} bytes ({} expected)",
                    req.activations.len(),
                    expected.map_or("overflow".into(), |v| v.to_string())
                ),
            ));
        }
        let Some(routing) = &req.routing else {
            return Err(Refusal::invalid("routing", "missing"));
        };
        if routing.offsets.len() != n + 1 {
            return Err(Refusal::invalid(
                "routing.offsets",
                format!("{} offsets for {n} tokens ({} expected)", routing.offsets.len(), n + 1),
            ));
        }
        if routing.weights.len() != routing.experts.len() {
            return Err(Refusal::invalid(
                "routing.weights",
                format!("{} weights for {} experts", routing.weights.len(), routing.experts.len()),
            ));
        }
        if routing.offsets[0] != 0 {
            return Err(Refusal::invalid("routing.offsets[0]", "must be 0"));
        }
        for t in 0..n {
            let (a, b) = (routing.offsets[t], routing.offsets[t + 1]);
            if b < a || b as usize > routing.experts.len() {
                return Err(Refusal::invalid(
                    format!("routing.offsets[{}]", t + 1),
                    format!("offset {b} after {a} with {} experts", routing.experts.len()),
                ));
            }
            let experts = &routing.experts[a as usize..b as usize];
            for (j, &e) in experts.iter().enumerate() {
                let k = a as usize + j;
                if e as usize >= self.config.num_experts {
                    return Err(Refusal::invalid(
                        format!("routing.experts[{k}]"),
                        format!("expert {e} does not exist (the model has {})", self.config.num_experts),
                    ));
                }
                if experts[..j].contains(&e) {
                    return Err(Refusal::invalid(
                        format!("routing.experts[{k}]"),
                        format!("expert {e} appears twice for token {t}"),
                    ));
                }
                if !self.experts.is_loaded(layer, e as usize) {
                    return Err(Refusal::precondition(
                        format!("routing.experts[{k}]"),
                        format!("expert {e} of layer {layer} is not loaded on node {}", self.node_id),
                    ));
                }
                let w = routing.weights[k];
                if !w.is_finite() {
                    return Err(Refusal::invalid(format!("routing.weights[{k}]"), format!("weight {w} is not finite")));
                }
            }
        }
        if *routing.offsets.last().unwrap_or(&0) as usize != routing.experts.len() {
            return Err(Refusal::invalid(
                format!("routing.offsets[{n}]"),
                format!("last offset must equal the number of experts ({})", routing.experts.len()),
            ));
        }
        Ok(dtype)
    }

    /// Checks and computes one request as the service does, without its queue: the sums, or the refusal.
    pub fn forward(&self, req: &ForwardRequest) -> Result<ForwardResponse, Refusal> {
        let dtype = self.check(req)?;
        self.compute(req, dtype, Duration::ZERO)
    }

    /// Decodes, computes and encodes a checked request.
    fn compute(&self, req: &ForwardRequest, dtype: Dtype, queued: Duration) -> Result<ForwardResponse, Refusal> {
        let h = self.config.hidden_size;
        let n = req.num_tokens as usize;
        let t0 = Instant::now();
        // A slow node, for the fault tests (`FAILPOINTS=expert-compute=sleep(MS)`).
        fail::fail_point!("expert-compute");
        let mut hidden = vec![0f32; n * h];
        codec::decode_into(&req.activations, dtype, &mut hidden)
            .map_err(|e| Refusal::invalid("activations", e.to_string()))?;
        let routing = req.routing.as_ref().ok_or_else(|| Refusal::invalid("routing", "missing"))?;
        // A node older than per-pair answers, for the tests (`FAILPOINTS=expert-old-answers=return`): it ignores
        // `reduce` and answers per-token sums without saying so.
        let older = || -> bool {
            fail::fail_point!("expert-old-answers", |_| true);
            false
        };
        let reduce = if older() { Reduce::Token } else { Reduce::try_from(req.reduce).unwrap_or(Reduce::Token) };
        let (hidden, routing) = match reduce {
            Reduce::Pair => per_pair(&hidden, h, routing),
            _ => (
                hidden,
                Routing {
                    offsets: routing.offsets.clone(),
                    experts: routing.experts.clone(),
                    weights: routing.weights.clone(),
                },
            ),
        };
        let rows = routing.num_tokens();
        let t1 = Instant::now();
        let mut out = vec![0f32; rows * h];
        self.experts.experts().forward(req.layer as usize, &hidden, &routing, &mut out).map_err(|e| {
            let layer = req.layer as usize;
            match routing.experts.iter().position(|&x| !self.experts.is_loaded(layer, x as usize)) {
                // The shard changed between the check and the compute (an unload raced this request).
                Some(k) => Refusal::precondition(format!("routing.experts[{k}]"), e.to_string()),
                // Everything was there and the compute still failed: the node is at fault, not the request.
                None => Refusal { code: ErrorCode::Internal, field: String::new(), message: e.to_string() },
            }
        })?;
        // A node that computes garbage, for the fault tests (`FAILPOINTS=expert-nan-sums=N*return`).
        let poisoned = || -> bool {
            fail::fail_point!("expert-nan-sums", |_| true);
            false
        };
        if poisoned() {
            out.fill(f32::NAN);
        }
        let t2 = Instant::now();
        let sums = codec::encode(&out, dtype);
        let t3 = Instant::now();
        let us = |d: Duration| d.as_micros() as u64;
        Ok(ForwardResponse {
            id: req.id,
            result: Some(forward_response::Result::Sums(PartialSums {
                dtype: dtype as i32,
                num_tokens: n as u32,
                sums,
                reduce: reduce as i32,
                timings: Some(Timings {
                    queue_us: us(queued),
                    decode_us: us(t1 - t0),
                    compute_us: us(t2 - t1),
                    encode_us: us(t3 - t2),
                }),
            })),
        })
    }
}

/// A request answered per pair, as one the kernels compute per token: each (token, expert) pair becomes a row of its
/// own (the token's hidden state again) routed to that expert alone with weight 1, so the sum computed for the row
/// is the expert's output itself (`0 + 1 · y`: the bits of `y`, but for a zero's sign, which the router's sum,
/// starting from +0, never shows). The kernels give a row the same result in any
/// batch, so these outputs are the ones the single-process engine weighs and adds.
fn per_pair(hidden: &[f32], h: usize, routing: &moe_proto::v1::Routing) -> (Vec<f32>, Routing) {
    let pairs = routing.experts.len();
    let mut rows = Vec::with_capacity(pairs * h);
    for (t, w) in routing.offsets.windows(2).enumerate() {
        for _ in w[0]..w[1] {
            rows.extend_from_slice(&hidden[t * h..(t + 1) * h]);
        }
    }
    let routing =
        Routing { offsets: (0..=pairs as u32).collect(), experts: routing.experts.clone(), weights: vec![1.0; pairs] };
    (rows, routing)
}

fn set_contains(set: &ExpertSet) -> impl Fn(usize, usize) -> bool + Sync + '_ {
    move |l, e| set.layers.iter().any(|row| row.layer as usize == l && row.experts.contains(&(e as u32)))
}

/// A checked request waiting for the compute thread.
pub(crate) struct Job {
    pub req: ForwardRequest,
    pub dtype: Dtype,
    pub enqueued: Instant,
    pub deadline: Option<Instant>,
    /// A slot reserved in the stream's reply queue: answering never waits for a router that does not read.
    pub reply: tokio::sync::mpsc::OwnedPermit<Result<ForwardResponse, tonic::Status>>,
    /// Its stream's cancellations: a job cancelled before the compute thread takes it is dropped unanswered.
    pub cancels: Arc<Cancels>,
}

/// The requests of one `Forward` stream that are queued, and those of them its router has cancelled. Only a
/// queued id can be cancelled, so neither set outlives the requests it names.
#[derive(Debug, Default)]
pub(crate) struct Cancels {
    ids: Mutex<(HashSet<u64>, HashSet<u64>)>,
}

impl Cancels {
    fn lock(&self) -> std::sync::MutexGuard<'_, (HashSet<u64>, HashSet<u64>)> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes `id` as queued (before it is submitted).
    pub fn queued(&self, id: u64) {
        self.lock().0.insert(id);
    }

    /// Cancels each of `ids` still queued; returns how many were.
    pub fn cancel(&self, ids: &[u64]) -> usize {
        let mut g = self.lock();
        let (queued, cancelled) = &mut *g;
        ids.iter().filter(|id| queued.contains(id) && cancelled.insert(**id)).count()
    }

    /// Takes `id` off the queue; whether it was cancelled while it waited.
    pub fn take(&self, id: u64) -> bool {
        let mut g = self.lock();
        g.0.remove(&id);
        g.1.remove(&id)
    }
}

/// The thread that computes requests one at a time, in arrival order, each spread over all cores by the matmul
/// pool: requests of one layer from several routers queue rather than fight over the cores.
#[derive(Clone)]
pub(crate) struct ComputeQueue {
    tx: mpsc::SyncSender<Job>,
    depth: usize,
}

/// Why a job was not queued.
pub(crate) enum Rejected {
    /// The queue holds its limit; the job comes back to be answered `RESOURCE_EXHAUSTED`.
    Full(Box<Job>),
    /// The compute thread has stopped.
    Closed,
}

impl ComputeQueue {
    /// Starts the compute thread with a queue of at most `depth` jobs.
    pub fn start(node: Arc<ExpertNode>, depth: usize) -> std::io::Result<Self> {
        let depth = depth.max(1);
        let (tx, rx) = mpsc::sync_channel::<Job>(depth);
        std::thread::Builder::new().name("expert-compute".into()).spawn(move || {
            for job in rx {
                let id = job.req.id;
                node.metrics.dequeued(job.enqueued.elapsed());
                if job.cancels.take(id) {
                    // Its router took the answer from elsewhere or gave the step up: the slot is freed unanswered.
                    node.metrics.cancelled();
                    tracing::debug!(id, layer = job.req.layer, "dropped a cancelled request before computing it");
                    continue;
                }
                let started = Instant::now();
                let response = if job.deadline.is_some_and(|d| Instant::now() > d) {
                    Err(Refusal {
                        code: ErrorCode::DeadlineExceeded,
                        field: "deadline_us".into(),
                        message: format!("the deadline passed after {:?} in the queue", job.enqueued.elapsed()),
                    })
                } else if job.req.traceparent.is_empty() {
                    node.compute(&job.req, job.dtype, job.enqueued.elapsed())
                } else {
                    // Work of a traced request: its compute is a child of the router's dispatch span.
                    let queued = job.enqueued.elapsed();
                    let span = tracing::info_span!(
                        "expert.compute",
                        layer = job.req.layer,
                        tokens = job.req.num_tokens,
                        node = %node.node_id,
                        queue_us = queued.as_micros() as u64,
                        "otel.kind" = "server",
                    );
                    moe_telemetry::trace::set_parent(&span, &job.req.traceparent);
                    span.in_scope(|| node.compute(&job.req, job.dtype, queued))
                };
                let response = match response {
                    Ok(r) => {
                        node.counters.requests.fetch_add(1, Ordering::Relaxed);
                        node.counters.tokens.fetch_add(u64::from(job.req.num_tokens), Ordering::Relaxed);
                        node.count_load(&job.req);
                        let pairs = job.req.routing.as_ref().map_or(0, |r| r.experts.len() as u64);
                        node.metrics.computed(started.elapsed(), u64::from(job.req.num_tokens), pairs);
                        r
                    }
                    Err(refusal) => {
                        node.counters.errors.fetch_add(1, Ordering::Relaxed);
                        node.metrics.refused(refusal.code);
                        tracing::warn!(id, field = %refusal.field, "{}", refusal.message);
                        refusal.into_response(id)
                    }
                };
                // The slot was reserved when the request arrived: this never blocks.
                job.reply.send(Ok(response));
            }
        })?;
        Ok(ComputeQueue { tx, depth })
    }

    /// Queues `job` unless the queue is full or the compute thread is gone.
    pub fn submit(&self, node: &ExpertNode, job: Job) -> Result<(), Rejected> {
        // Counted before it is sent, so that the compute thread never takes off what was not added yet.
        node.metrics.queued();
        let (id, cancels) = (job.req.id, Arc::clone(&job.cancels));
        cancels.queued(id);
        self.tx.try_send(job).map_err(|e| {
            node.metrics.dequeued(Duration::ZERO);
            cancels.take(id);
            match e {
                mpsc::TrySendError::Full(job) => Rejected::Full(Box::new(job)),
                mpsc::TrySendError::Disconnected(_) => Rejected::Closed,
            }
        })
    }

    pub fn depth(&self) -> usize {
        self.depth
    }
}

#[cfg(test)]
mod tests {
    use super::Cancels;

    #[test]
    fn only_queued_requests_are_cancelled_and_nothing_is_kept_after_them() {
        let c = Cancels::default();
        c.queued(1);
        c.queued(2);
        // 3 was never queued (done, computing or unknown): nothing to cancel, nothing remembered.
        assert_eq!(c.cancel(&[2, 3, 2]), 1);
        assert!(!c.take(1), "1 was not cancelled");
        assert!(c.take(2), "2 was cancelled while queued");
        // Taken off the queue, neither id can be cancelled later, and an id used again starts clean.
        assert_eq!(c.cancel(&[1, 2]), 0);
        c.queued(2);
        assert!(!c.take(2));
        let ids = c.lock();
        assert!(ids.0.is_empty() && ids.1.is_empty(), "ids outlived their requests");
    }
}
