//! The serving engine: continuous batching with chunked prefill on one thread that owns the model.
//!
//! Requests arrive through an [`EngineHandle`] into a bounded queue. Every step the engine
//! 1. drops sequences whose client went away (their state is freed at once),
//! 2. admits queued requests while the state memory budget allows (each reserves its whole footprint up front: the
//!    fixed Gated DeltaNet slots plus the KV pages of prompt + max_tokens, so a running sequence never has to be
//!    preempted; the caches grow a page at a time, so a sequence holds at most what it reserved),
//!    A request whose prompt starts with a prefix in the [`PrefixCache`] starts from a copy of that prefix's state.
//! 3. forms a batch under the token budget: one decode token for every running sequence that has finished its prompt,
//!    then prompt chunks in arrival order with what is left; a chunk that stops short of the prompt's end stops on a
//!    multiple of [`ALIGN_TOKENS`],
//! 4. runs it ([`Decoder::forward_pipelined`] with the configured micro-batches) and samples each sequence's next token,
//!    and keeps a snapshot of prompts whose chunk ended on a boundary worth caching.
//!
//! The kernels are batch-invariant and prompt chunks end on aligned positions (where a state depends only on the
//! tokens before it), so a sequence's tokens depend neither on what else is in the batch nor on how the load cut its
//! prompt, nor on whether its prefix came from the cache: greedy output does not change with load.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use moe_model::cpu::ops::log_softmax;
use moe_model::state::ALIGN_TOKENS;
use moe_model::{Decoder, Experts, LayerKind, LogitsFor, Sampler, SamplingParams, Segment, SequenceState};
use tokio::sync::mpsc::UnboundedSender;

use crate::prefix::{last_boundary, PrefixCache};

/// The fewest prompt tokens between two snapshots of one sequence mid-prompt (each copies the DeltaNet state, 12.6 MB
/// on the bench model): a prompt fed in small chunks under load is not snapshotted at every one.
const SNAPSHOT_EVERY: usize = 256;

/// From this many prompt tokens before its last aligned boundary on, a prompt is cut there even the first time its
/// beginning is seen: the extra step for its last 1 to 32 tokens costs little beside the rest. A shorter prompt is
/// cut there only once its first block has been seen before (a shared beginning), since for a 128-token prompt that
/// step added 10-20 % to its time to first token with the experts in the process, about 20 % with them on two nodes.
const CUT_UNSEEN_FROM: usize = 512;

/// Tunables of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most tokens in one forward step (decode tokens plus prompt chunks).
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Most requests waiting for admission; beyond it, submissions are refused (HTTP 429).
    pub max_queue: usize,
    /// Memory for per-sequence state (KV pages and Gated DeltaNet slots), in bytes.
    pub state_budget_bytes: u64,
    /// Micro-batches per step (ping-pong with remote experts).
    pub micro_batches: usize,
    /// The longest a request waits for admission; beyond it, it is shed (HTTP 503 with `Retry-After`).
    pub max_queue_wait: Duration,
    /// Keep prompt-prefix states in what the state budget leaves free, and start requests from them.
    pub prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_tokens: 512,
            max_running: 256,
            max_queue: 1024,
            state_budget_bytes: 4 << 30,
            micro_batches: 1,
            max_queue_wait: Duration::from_secs(60),
            prefix_caching: true,
        }
    }
}

/// What a sequence asks of the engine.
#[derive(Debug, Clone)]
pub struct SequenceParams {
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub sampling: SamplingParams,
    /// Top log-probs to report per generated token (`None`: none; `Some(0)`: only the chosen token's).
    pub logprobs: Option<usize>,
    /// Report log-probs of the prompt tokens too.
    pub prompt_logprobs: bool,
    /// Ids that end the sequence (EOS unless `ignore_eos`, plus `stop_token_ids`), kept in the output.
    pub stop_ids: Vec<u32>,
    /// Ids that end the sequence even with `ignore_eos`.
    pub eos_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// vLLM's: logits of tokens already in the prompt or output are divided (if positive) or multiplied by it.
    pub repetition_penalty: f32,
}

/// The log-probability of one token and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop id (or, decided by the caller, a stop string).
    Stop,
    /// `max_tokens`.
    Length,
}

/// What the engine tells the submitter of a sequence, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum SequenceEvent {
    /// The sequence left the queue and runs (its state is reserved); `cached_tokens` of its prompt came from the
    /// prefix cache and are not computed again.
    Admitted {
        cached_tokens: usize,
    },
    /// Log-probs of prompt tokens 1.. (the first token has none), when asked.
    PromptLogprobs(Vec<TokenLogprob>),
    /// A generated token.
    Token {
        id: u32,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        reason: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The step failed (a request the expert nodes refused, or one held longer than the hold limit); the sequence
    /// is gone.
    Failed(String),
    /// The request waited in the queue longer than the limit and was not started.
    Shed {
        waited: Duration,
    },
    /// The request's deadline passed before it finished; it is gone.
    Expired {
        after: Duration,
    },
}

/// A request to the engine.
#[derive(Debug)]
pub struct SequenceRequest {
    /// The request's span when its trace is sampled: the steps it takes part in are traced under it.
    pub trace: Option<tracing::Span>,
    pub prompt: Vec<u32>,
    pub params: SequenceParams,
    pub events: UnboundedSender<SequenceEvent>,
    /// Set by the caller (a stop string matched, the client left) to end the sequence at the next step.
    pub cancel: Arc<AtomicBool>,
    /// When the request must have ended; past it the sequence ends with [`SequenceEvent::Expired`].
    pub deadline: Option<Instant>,
    /// When it was submitted: a request not admitted by `submitted + max_queue_wait` is shed.
    pub submitted: Instant,
    /// The grammar its output must follow, when constrained.
    pub guide: Option<crate::guide::Guide>,
}

/// How a sequence ended early, for the counters: each ends in exactly one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EarlyEnd {
    Cancelled,
    Expired,
    Shed,
}

/// The sequences of the step in progress, for the experts' [`crate::remote::StepInterest`]: a step held for
/// experts without a live replica is worth holding while one of them is still waited for.
#[derive(Debug, Default)]
pub struct InStep {
    members: Mutex<Vec<Waiter>>,
}

#[derive(Debug)]
struct Waiter {
    cancel: Arc<AtomicBool>,
    events: UnboundedSender<SequenceEvent>,
    deadline: Option<Instant>,
}

impl InStep {
    fn set(&self, running: &[Running]) {
        let members = running
            .iter()
            .map(|s| Waiter {
                cancel: Arc::clone(&s.req.cancel),
                events: s.req.events.clone(),
                deadline: s.req.deadline,
            })
            .collect();
        *self.members.lock().unwrap_or_else(|p| p.into_inner()) = members;
    }

    fn clear(&self) {
        self.members.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl crate::remote::StepInterest for InStep {
    fn wanted(&self) -> bool {
        let now = Instant::now();
        self.members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|w| !w.cancel.load(Ordering::Acquire) && !w.events.is_closed() && w.deadline.is_none_or(|d| now < d))
    }
}

/// A submission that did not get into the queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is at capacity ({0} requests waiting); retry later")]
    QueueFull(usize),
    #[error("the request needs {needed} bytes of sequence state, more than the budget of {budget}")]
    TooLarge { needed: u64, budget: u64 },
    #[error("the engine has stopped")]
    Stopped,
}

/// Live figures of the engine, for /metrics and tests.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub state_bytes_reserved: AtomicU64,
    pub steps: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub finished: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    /// Requests shed after waiting too long in the queue, and sequences ended by their deadline.
    pub shed: AtomicU64,
    pub expired: AtomicU64,
    /// Prompt tokens of requests looked up in the prefix cache, and of those the tokens found there.
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
    /// What the prefix cache holds (bytes an upper bound: shared KV pages are counted by each holder).
    pub prefix_cache_bytes: AtomicU64,
    pub prefix_cache_entries: AtomicUsize,
    /// Prefix-cache entries evicted to make room.
    pub prefix_evictions: AtomicU64,
    /// Set when the engine thread has ended (all handles dropped, or a panic): nothing is served any more.
    pub stopped: AtomicBool,
}

/// The submit side of the engine; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<SequenceRequest>,
    pub stats: Arc<EngineStats>,
    /// Who the step in progress is for (see [`InStep`]).
    pub in_step: Arc<InStep>,
    max_queue: usize,
    max_queue_wait: Duration,
    budget: u64,
    footprint: Footprint,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").field("max_queue", &self.max_queue).finish_non_exhaustive()
    }
}

impl EngineHandle {
    /// Queues a sequence; refused when the queue is full or it could never fit.
    pub fn submit(&self, req: SequenceRequest) -> Result<(), SubmitError> {
        let needed = self.footprint.bytes(req.prompt.len() + req.params.max_tokens);
        if needed > self.budget {
            return Err(SubmitError::TooLarge { needed, budget: self.budget });
        }
        let waiting = self.stats.waiting.fetch_add(1, Ordering::AcqRel);
        if waiting >= self.max_queue {
            self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::QueueFull(waiting));
        }
        self.tx.send(req).map_err(|_| {
            self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
            SubmitError::Stopped
        })
    }

    /// The longest a request waits for admission.
    pub fn max_queue_wait(&self) -> Duration {
        self.max_queue_wait
    }

    /// The memory for sequence state, in bytes.
    pub fn state_budget(&self) -> u64 {
        self.budget
    }

    /// Whether the engine thread still runs.
    pub fn is_alive(&self) -> bool {
        !self.stats.stopped.load(Ordering::Acquire)
    }

    /// Bytes of state one sequence of `tokens` tokens reserves.
    pub fn footprint(&self, tokens: usize) -> u64 {
        self.footprint.bytes(tokens)
    }
}

/// Per-sequence state memory as a function of its length.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    fixed: u64,
    per_page: u64,
    page_tokens: usize,
}

impl Footprint {
    fn new(model: &dyn Decoder, page_tokens: usize) -> Self {
        let cfg = model.config();
        let full = cfg.layer_types.iter().filter(|k| **k == LayerKind::Full).count() as u64;
        let per_token = full * 2 * (cfg.num_key_value_heads * cfg.head_dim) as u64 * 4;
        Footprint { fixed: model.new_state().bytes() as u64, per_page: per_token * page_tokens as u64, page_tokens }
    }

    fn bytes(&self, tokens: usize) -> u64 {
        self.fixed + tokens.div_ceil(self.page_tokens) as u64 * self.per_page
    }
}

struct Running {
    req: SequenceRequest,
    state: SequenceState,
    sampler: Sampler,
    /// Prompt tokens fed so far.
    fed: usize,
    generated: Vec<u32>,
    /// The token to feed next once the prompt is in.
    next: Option<u32>,
    reserved: u64,
    prompt_logprobs: Vec<TokenLogprob>,
    /// The prompt position of this sequence's last snapshot in the prefix cache (or where it started from one).
    snapshot_at: usize,
    /// Its prompt is cut at its last aligned boundary, so that its state there can be kept (see [`CUT_UNSEEN_FROM`]).
    cut_at_last: bool,
}

/// Starts the engine thread; it owns `model` and `experts` and stops when every handle is dropped.
pub fn start(
    model: Arc<dyn Decoder>,
    experts: Arc<dyn Experts>,
    config: EngineConfig,
) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let stats = Arc::new(EngineStats::default());
    let in_step = Arc::new(InStep::default());
    let footprint = Footprint::new(model.as_ref(), moe_model::state::KV_PAGE_TOKENS);
    let handle = EngineHandle {
        tx,
        stats: Arc::clone(&stats),
        in_step: Arc::clone(&in_step),
        max_queue: config.max_queue,
        max_queue_wait: config.max_queue_wait,
        budget: config.state_budget_bytes,
        footprint,
    };
    let thread = std::thread::Builder::new().name("engine".into()).spawn(move || {
        let _stopped = Stopped(Arc::clone(&stats));
        // Chunks can end on aligned positions only when a step holds at least one aligned block.
        let align = if config.max_batch_tokens >= ALIGN_TOKENS { ALIGN_TOKENS } else { 1 };
        // States another decoder keeps (on a GPU) cannot be copied here.
        let copyable = model.new_state().snapshot().is_some();
        let cache = (config.prefix_caching && align > 1 && copyable).then(PrefixCache::new);
        if config.prefix_caching && align == 1 {
            tracing::warn!(
                "prefix caching is off: --max-batch-tokens {} is below the {ALIGN_TOKENS}-token blocks it caches",
                config.max_batch_tokens
            );
        } else if config.prefix_caching && !copyable {
            tracing::info!("prefix caching is off: this decoder's sequence states live on its device");
        }
        Engine { model, experts, config, stats, in_step, footprint, rx, waiting: VecDeque::new(), align, cache }.run()
    })?;
    Ok((handle, thread))
}

/// Marks the engine stopped when its thread ends, however it ends.
struct Stopped(Arc<EngineStats>);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Release);
        if std::thread::panicking() {
            tracing::error!("the engine thread panicked; the router no longer serves");
        }
    }
}

/// Marks the engine stopped when dropped by a panic's unwinding.
struct StoppedOnPanic(Arc<EngineStats>);

impl Drop for StoppedOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.stopped.store(true, Ordering::Release);
        }
    }
}

/// A request in the queue, with when it arrived.
struct Queued {
    req: SequenceRequest,
    since: Instant,
}

struct Engine {
    model: Arc<dyn Decoder>,
    experts: Arc<dyn Experts>,
    config: EngineConfig,
    stats: Arc<EngineStats>,
    in_step: Arc<InStep>,
    footprint: Footprint,
    rx: mpsc::Receiver<SequenceRequest>,
    waiting: VecDeque<Queued>,
    /// Prompt chunks that stop short of the prompt's end stop on multiples of this.
    align: usize,
    cache: Option<PrefixCache>,
}

impl Engine {
    fn run(mut self) {
        let mut running: Vec<Running> = Vec::new();
        let mut reserved = 0u64;
        // Declared after `running`, so dropped before it: a panic marks the engine stopped before the sequences'
        // event channels close, so a client that sees its stream fail already finds `/livez` false.
        let _stopped_first = StoppedOnPanic(Arc::clone(&self.stats));
        loop {
            // Block only when there is nothing to do.
            if running.is_empty() && self.waiting.is_empty() {
                match self.rx.recv() {
                    Ok(req) => self.waiting.push_back(Queued { req, since: Instant::now() }),
                    Err(_) => return,
                }
            }
            while let Ok(req) = self.rx.try_recv() {
                self.waiting.push_back(Queued { req, since: Instant::now() });
            }
            // A dead engine thread, for the fault tests (`FAILPOINTS=engine-step=N*off->panic`).
            fail::fail_point!("engine-step");
            let now = Instant::now();
            // Requests past their deadline, requests that waited too long, and clients that left. (The HTTP side
            // enforces the same instants while the engine is inside a step; whichever acts first, each request is
            // counted once.)
            let (stats, max_wait) = (&self.stats, self.config.max_queue_wait);
            self.waiting.retain(|q| match early_end(stats, max_wait, &q.req, now, true) {
                None => true,
                Some(end) => {
                    self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
                    let _ = q.req.events.send(match end {
                        EarlyEnd::Shed => SequenceEvent::Shed { waited: now - q.since },
                        _ => SequenceEvent::Expired { after: now - q.req.submitted },
                    });
                    false
                }
            });
            running.retain(|s| match early_end(stats, max_wait, &s.req, now, false) {
                None => true,
                Some(_) => {
                    let _ = s.req.events.send(SequenceEvent::Expired { after: now - s.req.submitted });
                    reserved -= s.reserved;
                    false
                }
            });
            // Admission, first come first served, under the state budget.
            while running.len() < self.config.max_running {
                let Some(front) = self.waiting.front() else { break };
                let need = self.footprint.bytes(front.req.prompt.len() + front.req.params.max_tokens);
                if reserved + need > self.config.state_budget_bytes {
                    break;
                }
                // Cached prefixes give way to requests.
                self.make_room(self.config.state_budget_bytes - reserved - need);
                let Some(Queued { req, .. }) = self.waiting.pop_front() else { break };
                self.stats.waiting.fetch_sub(1, Ordering::AcqRel);
                match Sampler::new(req.params.sampling) {
                    Ok(sampler) => {
                        reserved += need;
                        let (state, fed, cut_at_last) = self.first_state(&req);
                        let _ = req.events.send(SequenceEvent::Admitted { cached_tokens: fed });
                        running.push(Running {
                            state,
                            sampler,
                            fed,
                            generated: Vec::new(),
                            next: None,
                            reserved: need,
                            prompt_logprobs: Vec::new(),
                            snapshot_at: fed,
                            cut_at_last,
                            req,
                        });
                    }
                    Err(e) => {
                        self.stats.failed.fetch_add(1, Ordering::Relaxed);
                        let _ = req.events.send(SequenceEvent::Failed(e.to_string()));
                    }
                }
            }
            self.stats.running.store(running.len(), Ordering::Relaxed);
            self.stats.state_bytes_reserved.store(reserved, Ordering::Relaxed);
            if running.is_empty() {
                continue;
            }
            self.in_step.set(&running);
            let stepped = self.step(&mut running, self.config.state_budget_bytes.saturating_sub(reserved));
            self.in_step.clear();
            if let Err(e) = stepped {
                // A failed step leaves the states of its sequences half-advanced: they all end. (A step whose
                // experts lost their last replica is held instead, and fails only once nobody waits for it or
                // the hold limit passed.)
                tracing::error!("engine step failed: {e}");
                let now = Instant::now();
                for s in running.drain(..) {
                    if self.early_end(&s.req, now, false).is_none() {
                        self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = s.req.events.send(SequenceEvent::Failed(e.to_string()));
                }
                reserved = 0;
            }
            running.retain(|s| {
                let done = s.next.is_none() && s.fed == s.req.prompt.len();
                if done {
                    reserved -= s.reserved;
                }
                !done
            });
            self.stats.running.store(running.len(), Ordering::Relaxed);
            self.stats.state_bytes_reserved.store(reserved, Ordering::Relaxed);
            self.publish_cache();
        }
    }

    /// A new sequence's state: a copy of its longest cached prefix's, or a fresh one; and how much of the prompt it
    /// has fed. A request that wants the prompt's log-probs feeds it all.
    /// Also whether to cut the prompt at its last aligned boundary: when its beginning was found or seen before, or
    /// the prompt is long.
    fn first_state(&mut self, req: &SequenceRequest) -> (SequenceState, usize, bool) {
        let Some(cache) = self.cache.as_mut().filter(|_| !req.params.prompt_logprobs) else {
            return (self.model.new_state(), 0, false);
        };
        self.stats.prefix_queries.fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
        let seen = cache.seen_before(&req.prompt);
        let long = last_boundary(req.prompt.len()) >= CUT_UNSEEN_FROM;
        match cache.lookup(&req.prompt) {
            Some(hit) => {
                self.stats.prefix_hits.fetch_add(hit.tokens as u64, Ordering::Relaxed);
                (hit.state, hit.tokens, true)
            }
            None => (self.model.new_state(), 0, seen || long),
        }
    }

    /// Evicts cached prefixes until they hold at most `room` bytes.
    fn make_room(&mut self, room: u64) {
        if let Some(cache) = self.cache.as_mut() {
            let evicted = cache.shrink_to(room);
            self.stats.prefix_evictions.fetch_add(evicted as u64, Ordering::Relaxed);
        }
    }

    fn publish_cache(&self) {
        if let Some(cache) = &self.cache {
            self.stats.prefix_cache_bytes.store(cache.bytes(), Ordering::Relaxed);
            self.stats.prefix_cache_entries.store(cache.len(), Ordering::Relaxed);
        }
    }

    /// Keeps a snapshot of `s` if its prompt chunk ended where one is worth keeping: the prompt's last aligned
    /// boundary (which a repeated or continued prompt starts from), or a boundary far enough past its last snapshot.
    fn remember(cache: &mut PrefixCache, stats: &EngineStats, s: &mut Running, room: u64) {
        let last = last_boundary(s.req.prompt.len());
        let worth = s.fed == last || s.fed >= s.snapshot_at + SNAPSHOT_EVERY;
        if s.fed == 0 || !s.fed.is_multiple_of(ALIGN_TOKENS) || s.fed > last || !worth {
            return;
        }
        if let Some(evicted) = cache.insert(&s.req.prompt[..s.fed], &s.state, room) {
            s.snapshot_at = s.fed;
            stats.prefix_evictions.fetch_add(evicted as u64, Ordering::Relaxed);
            stats.prefix_cache_bytes.store(cache.bytes(), Ordering::Relaxed);
            stats.prefix_cache_entries.store(cache.len(), Ordering::Relaxed);
        }
    }

    /// Where the prompt chunk of a sequence that has fed `fed` of `len` prompt tokens ends in a step with `budget`
    /// tokens left: at the prompt's end if it fits, else on an aligned position; with a prefix cache and
    /// `cut_at_last`, also at the prompt's last aligned boundary, so that its state there can be kept. 0 when no
    /// aligned chunk fits.
    fn chunk(&self, fed: usize, len: usize, budget: usize, cut_at_last: bool) -> usize {
        let mut end = (fed + budget).min(len);
        if end < len {
            end = end / self.align * self.align;
        }
        if self.cache.is_some() && cut_at_last {
            let last = last_boundary(len);
            if fed < last && last < end {
                end = last;
            }
        }
        end.saturating_sub(fed)
    }

    fn early_end(&self, req: &SequenceRequest, now: Instant, waiting: bool) -> Option<EarlyEnd> {
        early_end(&self.stats, self.config.max_queue_wait, req, now, waiting)
    }

    /// One forward step over the running sequences; `room` is what the state budget leaves for the prefix cache.
    fn step(&mut self, running: &mut [Running], room: u64) -> moe_model::Result<()> {
        let vocab = self.model.config().vocab_size;
        let mut budget = self.config.max_batch_tokens.max(1);
        // Which sequences take part, with how many tokens: decodes first, then prompt chunks.
        let mut plan: Vec<(usize, usize)> = Vec::new();
        for (i, s) in running.iter().enumerate() {
            if s.next.is_some() && budget > 0 {
                plan.push((i, 1));
                budget -= 1;
            }
        }
        for (i, s) in running.iter().enumerate() {
            let left = s.req.prompt.len() - s.fed;
            if s.next.is_none() && left > 0 && budget > 0 {
                let n = self.chunk(s.fed, s.req.prompt.len(), budget, s.cut_at_last);
                if n > 0 {
                    plan.push((i, n));
                    budget -= n;
                }
            }
        }
        plan.sort_unstable();
        // A step with traced sequences is traced under the first one's request, linked to the others'; its
        // dispatches and the expert nodes' compute are traced under it. Untraced steps create no span.
        let traced: Vec<&tracing::Span> = plan.iter().filter_map(|&(i, _)| running[i].req.trace.as_ref()).collect();
        let step_span = match traced.split_first() {
            Some((first, others)) => {
                let tokens: usize = plan.iter().map(|&(_, n)| n).sum();
                let span = tracing::info_span!(parent: *first, "engine.step", tokens, sequences = plan.len());
                for other in others {
                    span.follows_from(*other);
                }
                span
            }
            None => tracing::Span::none(),
        };
        let started = Instant::now();
        let mut segs: Vec<Segment<'_>> = Vec::with_capacity(plan.len());
        let mut tokens_in_step = 0;
        {
            let mut p = plan.iter().peekable();
            for (i, s) in running.iter_mut().enumerate() {
                let Some(&&(_, n)) = p.peek().filter(|(j, _)| *j == i) else { continue };
                p.next();
                tokens_in_step += n;
                let (tokens, logits): (&[u32], LogitsFor) = match &s.next {
                    Some(tok) => (std::slice::from_ref(tok), LogitsFor::Last),
                    None => {
                        let chunk = &s.req.prompt[s.fed..s.fed + n];
                        let last = s.fed + n == s.req.prompt.len();
                        let want = if s.req.params.prompt_logprobs {
                            LogitsFor::All
                        } else if last {
                            LogitsFor::Last
                        } else {
                            LogitsFor::None
                        };
                        (chunk, want)
                    }
                };
                segs.push(Segment { state: &mut s.state, tokens, logits });
            }
        }
        let outs = step_span
            .in_scope(|| self.model.forward_pipelined(&mut segs, self.experts.as_ref(), self.config.micro_batches))?;
        drop(segs);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(tokens = tokens_in_step, sequences = plan.len(), elapsed = ?started.elapsed(), "step");

        for ((i, n), rows) in plan.into_iter().zip(outs) {
            let s = &mut running[i];
            let last_row = if s.next.is_some() {
                s.next = None;
                rows
            } else {
                let start = s.fed;
                s.fed += n;
                self.stats.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
                if s.req.params.prompt_logprobs {
                    // Row r predicts prompt token start + r + 1.
                    for (r, row) in rows.chunks_exact(vocab).enumerate() {
                        if let Some(&id) = s.req.prompt.get(start + r + 1) {
                            let top = s.req.params.logprobs.unwrap_or(0);
                            s.prompt_logprobs.push(token_logprob(row, id, top));
                        }
                    }
                }
                if let Some(cache) = self.cache.as_mut() {
                    Self::remember(cache, &self.stats, s, room);
                }
                if s.fed < s.req.prompt.len() {
                    continue;
                }
                if s.req.params.prompt_logprobs {
                    let _ = s.req.events.send(SequenceEvent::PromptLogprobs(std::mem::take(&mut s.prompt_logprobs)));
                }
                rows[rows.len() - vocab..].to_vec()
            };
            // Log-probs are the model's own (before penalties and constraints), as vLLM reports them by default.
            let processed = s.req.params.repetition_penalty != 1.0
                || s.generated.len() < s.req.params.min_tokens
                || s.req.guide.is_some();
            let id = if processed {
                let mut logits = last_row.clone();
                self.process_logits(s, &mut logits);
                if let Some(guide) = s.req.guide.as_mut() {
                    // The mask was computed while this step ran; a sequence whose grammar cannot go on ends.
                    if let Err(e) = guide.restrict(&mut logits) {
                        self.stats.failed.fetch_add(1, Ordering::Relaxed);
                        let _ = s.req.events.send(SequenceEvent::Failed(format!("structured output: {e}")));
                        s.next = None;
                        continue;
                    }
                }
                s.sampler.sample(&logits)
            } else {
                s.sampler.sample(&last_row)
            };
            if let Some(guide) = s.req.guide.as_mut() {
                if let Err(e) = guide.commit(id) {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    let _ = s.req.events.send(SequenceEvent::Failed(format!("structured output: {e}")));
                    s.next = None;
                    continue;
                }
            }
            let logprob = s.req.params.logprobs.map(|top| token_logprob(&last_row, id, top));
            s.generated.push(id);
            self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
            let _ = s.req.events.send(SequenceEvent::Token { id, logprob });
            let p = &s.req.params;
            // A constrained output ends at its end token even with `ignore_eos`: the grammar allows it only once
            // the output is complete.
            let ends = p.eos_ids.contains(&id) && (!p.ignore_eos || s.req.guide.is_some());
            let stop = p.stop_ids.contains(&id) || ends;
            let finish = if stop && s.generated.len() >= p.min_tokens {
                Some(Finish::Stop)
            } else if s.generated.len() >= p.max_tokens {
                Some(Finish::Length)
            } else {
                None
            };
            match finish {
                Some(reason) => {
                    self.stats.finished.fetch_add(1, Ordering::Relaxed);
                    let _ = s.req.events.send(SequenceEvent::Finished {
                        reason,
                        prompt_tokens: s.req.prompt.len(),
                        completion_tokens: s.generated.len(),
                    });
                }
                None => s.next = Some(id),
            }
        }
        Ok(())
    }

    /// Applies repetition penalty and min_tokens to one row of logits before sampling.
    fn process_logits(&self, s: &Running, logits: &mut [f32]) {
        let p = &s.req.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in s.req.prompt.iter().chain(&s.generated) {
                if let Some(flag) = seen.get_mut(t as usize) {
                    *flag = true;
                }
            }
            for (l, _) in logits.iter_mut().zip(&seen).filter(|(_, &s)| s) {
                *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            }
        }
        if s.generated.len() < p.min_tokens {
            for &t in p.stop_ids.iter().chain(&p.eos_ids) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// Whether `req` ends before the next step, and how; counts it.
fn early_end(
    stats: &EngineStats,
    max_queue_wait: Duration,
    req: &SequenceRequest,
    now: Instant,
    waiting: bool,
) -> Option<EarlyEnd> {
    let end = if req.deadline.is_some_and(|d| now >= d) {
        EarlyEnd::Expired
    } else if waiting && now >= req.submitted + max_queue_wait {
        EarlyEnd::Shed
    } else if req.cancel.load(Ordering::Acquire) || req.events.is_closed() {
        EarlyEnd::Cancelled
    } else {
        return None;
    };
    let counter = match end {
        EarlyEnd::Cancelled => &stats.cancelled,
        EarlyEnd::Expired => &stats.expired,
        EarlyEnd::Shed => &stats.shed,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    Some(end)
}

/// `id`'s log-probability in `row` and the `top` most likely tokens.
fn token_logprob(row: &[f32], id: u32, top: usize) -> TokenLogprob {
    let lp = log_softmax(row);
    let logprob = lp.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY);
    let top = if top == 0 {
        Vec::new()
    } else {
        let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
        let n = top.min(idx.len());
        idx.select_nth_unstable_by(n - 1, |&a, &b| lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b)));
        let mut t: Vec<(u32, f32)> = idx[..n].iter().map(|&i| (i, lp[i as usize])).collect();
        t.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        t
    };
    TokenLogprob { id, logprob, top }
}
