//! The router's `/metrics`: vLLM's series under vLLM's names and meanings (so that its dashboards and alerts work
//! unchanged), the engine's `moe_*` counters, and the data plane's expert-parallel series.
//!
//! Request latencies are recorded per sequence (each choice of a request) by [`RequestTimer`], on the task that
//! relays the engine's events to the client, so they measure what the client sees. Occupancy and counters kept
//! in atomics elsewhere are read at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use moe_telemetry::metrics::{
    histogram, registry_for_model, token_buckets, Scrape, ScrapeWith, ITL_BUCKETS, REQUEST_BUCKETS, TTFT_BUCKETS,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::EngineStats;
use crate::remote::RemoteExperts;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedReason {
    finished_reason: &'static str,
}

/// Sums of the latency histograms, in microseconds, with their counts: the dashboard's mean TTFT and ITL over a
/// window come from their differences (prometheus-client does not expose a histogram's sum).
#[derive(Debug, Default)]
pub struct LatencySums {
    pub ttft_us: AtomicU64,
    pub ttft_count: AtomicU64,
    pub itl_us: AtomicU64,
    pub itl_count: AtomicU64,
}

/// Per-request series, vLLM's.
#[derive(Debug, Clone)]
pub struct RequestMetrics {
    pub sums: Arc<LatencySums>,
    success: Family<FinishedReason, Counter>,
    ttft: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue: Histogram,
    prefill: Histogram,
    decode: Histogram,
    prompt_tokens: Histogram,
    generation_tokens: Histogram,
}

impl RequestMetrics {
    /// Token-count histograms have vLLM's 1-2-5 buckets up to `max_model_len`.
    pub fn new(max_model_len: usize) -> Self {
        let tokens = token_buckets(max_model_len);
        // Every reason from the start, at 0, so that rates and dashboards have a series before the first finish.
        let success = Family::default();
        for finished_reason in ["stop", "length", "abort"] {
            let _ = success.get_or_create(&FinishedReason { finished_reason });
        }
        RequestMetrics {
            sums: Arc::default(),
            success,
            ttft: histogram(TTFT_BUCKETS),
            itl: histogram(ITL_BUCKETS),
            e2e: histogram(REQUEST_BUCKETS),
            queue: histogram(REQUEST_BUCKETS),
            prefill: histogram(REQUEST_BUCKETS),
            decode: histogram(REQUEST_BUCKETS),
            prompt_tokens: histogram(&tokens),
            generation_tokens: histogram(&tokens),
        }
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "vllm:request_success",
            "Sequences finished, by reason: stop (a stop token or string), length (max_tokens) or abort (the \
             client went away)",
            self.success.clone(),
        );
        r.register(
            "vllm:time_to_first_token_seconds",
            "From submission to the first generated token",
            self.ttft.clone(),
        );
        r.register(
            "vllm:inter_token_latency_seconds",
            "Between two consecutive tokens of a sequence",
            self.itl.clone(),
        );
        r.register("vllm:e2e_request_latency_seconds", "From submission to the last token", self.e2e.clone());
        r.register("vllm:request_queue_time_seconds", "Waiting for admission", self.queue.clone());
        r.register("vllm:request_prefill_time_seconds", "From admission to the first token", self.prefill.clone());
        r.register("vllm:request_decode_time_seconds", "From the first token to the last", self.decode.clone());
        r.register("vllm:request_prompt_tokens", "Prompt tokens of each finished sequence", self.prompt_tokens.clone());
        r.register(
            "vllm:request_generation_tokens",
            "Generated tokens of each finished sequence",
            self.generation_tokens.clone(),
        );
    }
}

/// One sequence's instants, recorded into [`RequestMetrics`] as its events arrive.
#[derive(Debug)]
pub struct RequestTimer {
    metrics: RequestMetrics,
    submitted: Instant,
    admitted: Option<Instant>,
    first: Option<Instant>,
    last: Option<Instant>,
    done: bool,
}

/// How a sequence ended, as vLLM's `finished_reason` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Stop,
    Length,
    Abort,
}

impl RequestTimer {
    pub fn new(metrics: &RequestMetrics, submitted: Instant) -> Self {
        RequestTimer { metrics: metrics.clone(), submitted, admitted: None, first: None, last: None, done: false }
    }

    pub fn admitted(&mut self) {
        let now = Instant::now();
        self.admitted = Some(now);
        self.metrics.queue.observe((now - self.submitted).as_secs_f64());
    }

    pub fn token(&mut self) {
        let now = Instant::now();
        match self.last {
            None => {
                self.first = Some(now);
                let ttft = now - self.submitted;
                self.metrics.ttft.observe(ttft.as_secs_f64());
                let sums = &self.metrics.sums;
                sums.ttft_us.fetch_add(ttft.as_micros() as u64, Ordering::Relaxed);
                sums.ttft_count.fetch_add(1, Ordering::Relaxed);
                let admitted = self.admitted.unwrap_or(self.submitted);
                self.metrics.prefill.observe((now - admitted).as_secs_f64());
            }
            Some(last) => {
                let itl = now - last;
                self.metrics.itl.observe(itl.as_secs_f64());
                let sums = &self.metrics.sums;
                sums.itl_us.fetch_add(itl.as_micros() as u64, Ordering::Relaxed);
                sums.itl_count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.last = Some(now);
    }

    /// The sequence ended: counted once, whatever is called after.
    pub fn ended(&mut self, how: Ended, prompt_tokens: usize, completion_tokens: usize) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let now = Instant::now();
        let m = &self.metrics;
        let finished_reason = match how {
            Ended::Stop => "stop",
            Ended::Length => "length",
            Ended::Abort => "abort",
        };
        m.success.get_or_create(&FinishedReason { finished_reason }).inc();
        if how == Ended::Abort {
            return;
        }
        m.e2e.observe((now - self.submitted).as_secs_f64());
        m.decode.observe((now - self.first.unwrap_or(now)).as_secs_f64());
        m.prompt_tokens.observe(prompt_tokens as f64);
        m.generation_tokens.observe(completion_tokens as f64);
    }
}

/// Everything `/metrics` shows, in Prometheus text format.
pub fn exposition(
    model_name: &str,
    requests: &RequestMetrics,
    stats: &Arc<EngineStats>,
    state_budget: u64,
    remote: Option<&Arc<RemoteExperts>>,
) -> String {
    let mut registry = registry_for_model(model_name);
    requests.register(&mut registry);
    let stats = Arc::clone(stats);
    registry.register_collector(Box::new(ScrapeWith(move |s: &mut Scrape<'_>| engine_series(s, &stats, state_budget))));
    if let Some(remote) = remote {
        remote.series.register(&mut registry);
        let remote = Arc::clone(remote);
        registry.register_collector(Box::new(ScrapeWith(move |s: &mut Scrape<'_>| {
            remote_series(s, &remote)?;
            remote.series.scrape(s)
        })));
    }
    moe_telemetry::metrics::encode(&registry)
}

fn engine_series(s: &mut Scrape<'_>, st: &EngineStats, budget: u64) -> Result<(), std::fmt::Error> {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let running = st.running.load(Ordering::Relaxed) as i64;
    let waiting = st.waiting.load(Ordering::Relaxed) as i64;
    let reserved = get(&st.state_bytes_reserved);
    s.gauge("vllm:num_requests_running", "Sequences in the running batch", running)?;
    s.gauge("vllm:num_requests_waiting", "Sequences waiting for admission", waiting)?;
    s.gauge_f64(
        "vllm:kv_cache_usage_perc",
        "Share of the sequence-state budget reserved (KV pages and Gated DeltaNet slots), 0 to 1",
        if budget > 0 { reserved as f64 / budget as f64 } else { 0.0 },
    )?;
    s.counter("vllm:prompt_tokens", "Prompt tokens processed", get(&st.prompt_tokens))?;
    s.counter("vllm:generation_tokens", "Tokens generated", get(&st.generated_tokens))?;
    s.counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", get(&st.prefix_queries))?;
    s.counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", get(&st.prefix_hits))?;
    s.gauge(
        "moe_prefix_cache_bytes",
        "Sequence state the prefix cache holds (an upper bound: shared KV pages count once per holder)",
        get(&st.prefix_cache_bytes) as i64,
    )?;
    s.gauge(
        "moe_prefix_cache_entries",
        "Prompt prefixes whose state is cached",
        st.prefix_cache_entries.load(Ordering::Relaxed) as i64,
    )?;
    s.counter(
        "moe_prefix_cache_evictions",
        "Cached prefixes evicted to make room (for a request, or a newer prefix)",
        get(&st.prefix_evictions),
    )?;
    s.gauge("moe_num_requests_running", "Sequences in the running batch", running)?;
    s.gauge("moe_num_requests_waiting", "Sequences waiting for admission", waiting)?;
    s.gauge(
        "moe_state_bytes_reserved",
        "Sequence state memory reserved (KV pages and DeltaNet slots)",
        reserved as i64,
    )?;
    s.counter("moe_prompt_tokens", "Prompt tokens processed", get(&st.prompt_tokens))?;
    s.counter("moe_generation_tokens", "Tokens generated", get(&st.generated_tokens))?;
    s.counter("moe_engine_steps", "Forward steps", get(&st.steps))?;
    s.counter("moe_requests_finished", "Sequences finished", get(&st.finished))?;
    s.counter("moe_requests_cancelled", "Sequences cancelled (client gone or stop string)", get(&st.cancelled))?;
    s.counter("moe_requests_failed", "Sequences failed", get(&st.failed))?;
    s.counter(
        "moe_requests_shed",
        "Requests shed after waiting longer than the queue limit (HTTP 503 with Retry-After)",
        get(&st.shed),
    )?;
    s.counter("moe_requests_expired", "Sequences ended by their deadline in the engine", get(&st.expired))
}

fn remote_series(s: &mut Scrape<'_>, remote: &RemoteExperts) -> Result<(), std::fmt::Error> {
    let r = &remote.stats;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    s.gauge("moe_placement_epoch", "Placement epoch dispatches carry (0: static placement)", remote.epoch() as i64)?;
    s.gauge("moe_expert_nodes", "Expert nodes in the placement in use", remote.nodes().len() as i64)?;
    s.counter("moe_expert_messages", "Messages answered by expert nodes", get(&r.messages))?;
    s.counter("moe_expert_bytes_sent", "Activation bytes sent to expert nodes", get(&r.bytes_sent))?;
    s.counter("moe_expert_bytes_received", "Partial-sum bytes received from expert nodes", get(&r.bytes_received))?;
    s.counter(
        "moe_expert_pieces_resent",
        "Pieces sent again elsewhere (node down, or no longer serving the piece's epoch or experts)",
        get(&r.resent),
    )?;
    s.counter(
        "moe_expert_pieces_hedged",
        "Late pieces copied to other replicas (the first whole answer is used)",
        get(&r.hedged),
    )?;
    s.counter("moe_expert_hedges_won", "Hedged pieces whose copy answered first", get(&r.hedges_won))?;
    s.counter(
        "moe_expert_pieces_cancelled",
        "Pieces in flight whose answer stopped being wanted (a hedge's loser, past its deadline, a step given up), \
         cancelled on their node",
        get(&r.cancelled),
    )?;
    s.counter("moe_expert_holds", "Layer waits held because some expert had no live replica", get(&r.holds))?;
    s.counter(
        "moe_expert_holds_abandoned",
        "Holds given up (nobody waited any more, or the hold limit passed)",
        get(&r.holds_abandoned),
    )?;
    s.gauge("moe_expert_holding", "Layer waits holding now", get(&r.holding) as i64)?;
    s.counter("moe_expert_reconnects", "Links re-opened to expert nodes that had gone down", get(&r.reconnects))
}
