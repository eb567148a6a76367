//! The engine's continuous batching, replayed step by step on the cost model: requests arrive (open loop at a rate,
//! or closed loop at a concurrency), every step takes one decode token per running sequence and then prompt chunks
//! in arrival order up to the token budget, as `router-node`'s engine does, and each request's TTFT, TPOT and end
//! are read off the simulated clock.

use crate::cost::{Cluster, Step};

/// A length distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Length {
    Fixed(usize),
    /// Uniform over `lo..=hi`.
    Uniform(usize, usize),
}

impl Length {
    pub fn mean(&self) -> f64 {
        match *self {
            Length::Fixed(n) => n as f64,
            Length::Uniform(lo, hi) => (lo + hi) as f64 / 2.0,
        }
    }

    pub fn max(&self) -> usize {
        match *self {
            Length::Fixed(n) | Length::Uniform(_, n) => n,
        }
    }

    fn draw(&self, rng: &mut Rng) -> usize {
        match *self {
            Length::Fixed(n) => n,
            Length::Uniform(lo, hi) => lo + (rng.next() % (hi - lo + 1) as u64) as usize,
        }
    }
}

/// From a closed-loop client's last token to its next request in the engine's queue (the response's end, a new
/// connection's request, tokenizing): the engine starts its next step at once and does not wait for it.
const CLIENT_TURNAROUND_S: f64 = 1e-3;

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// Poisson arrivals at this many requests per second over the whole cluster.
    Rate(f64),
    /// This many clients, each sending its next request when the last is answered (`vllm bench serve
    /// --max-concurrency`, `moectl bench --concurrency`).
    Concurrency(usize),
}

/// The load to plan for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Traffic {
    pub arrivals: Arrivals,
    pub prompt: Length,
    pub output: Length,
    /// Requests simulated (the benchmark's `--num-prompts`).
    pub requests: usize,
}

/// The engine's limits (`router-node --max-batch-tokens`, `--max-running`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineLimits {
    pub max_batch_tokens: usize,
    pub max_running: usize,
}

impl Default for EngineLimits {
    fn default() -> Self {
        EngineLimits { max_batch_tokens: 512, max_running: 256 }
    }
}

/// p50, p90 and p99 of a measure, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Percentiles {
    pub fn of(mut xs: Vec<f64>) -> Percentiles {
        if xs.is_empty() {
            return Percentiles::default();
        }
        xs.sort_by(f64::total_cmp);
        let at = |q: f64| xs[(((xs.len() as f64) * q).ceil() as usize).clamp(1, xs.len()) - 1];
        Percentiles { mean: xs.iter().sum::<f64>() / xs.len() as f64, p50: at(0.5), p90: at(0.9), p99: at(0.99) }
    }

    /// The percentile named by `q` (50, 90 or 99).
    pub fn at(&self, q: u32) -> f64 {
        match q {
            50 => self.p50,
            90 => self.p90,
            _ => self.p99,
        }
    }
}

/// What one router saw over a simulated run, and the whole cluster's rates.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Outcome {
    pub ttft_s: Percentiles,
    pub tpot_s: Percentiles,
    pub e2e_s: Percentiles,
    /// Output tokens per second over the whole cluster.
    pub output_tokens_per_s: f64,
    pub requests_per_s: f64,
    /// Mean tokens per step.
    pub mean_step_tokens: f64,
    /// Mean decode sequences per step.
    pub mean_decode_batch: f64,
    /// Fraction of time the busiest expert node computes (all routers' work).
    pub node_utilisation: f64,
    /// Fraction of the busiest link's bandwidth in use (all routers' work).
    pub link_utilisation: f64,
    /// Bytes over the wire per output token.
    pub wire_bytes_per_output_token: f64,
    /// Whether the offered load is more than the cluster serves (the queue grows for as long as it is offered).
    pub saturated: bool,
    /// Most sequences held at once on one router (what its KV pages and DeltaNet slots must hold).
    pub peak_running: usize,
}

/// A small, seeded generator: the same inputs give the same plan.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

#[derive(Debug, Clone)]
struct Request {
    arrival: f64,
    prompt: usize,
    output: usize,
    prefilled: usize,
    generated: usize,
    first: f64,
    done: f64,
}

/// Runs the traffic through one of the cluster's routers (each router gets its share of the load; the expert nodes
/// see the work of all of them).
pub fn simulate(cluster: &Cluster<'_>, traffic: &Traffic, limits: &EngineLimits) -> Outcome {
    let routers = cluster.layout.routers.max(1);
    // The expert nodes also serve the other routers: their busy fraction is found by iterating.
    let mut others = 0.0;
    let mut out = run(cluster, traffic, limits, routers, others);
    for _ in 0..4 {
        if routers == 1 || cluster.layout.expert_nodes == 0 {
            break;
        }
        let per_router = out.node_utilisation / routers as f64;
        others = per_router * (routers - 1) as f64;
        if others >= 1.0 {
            out.saturated = true;
            break;
        }
        out = run(cluster, traffic, limits, routers, others);
    }
    out
}

fn run(cluster: &Cluster<'_>, traffic: &Traffic, limits: &EngineLimits, routers: usize, others: f64) -> Outcome {
    let mut rng = Rng(0x5eed);
    let n = traffic.requests.max(1).div_ceil(routers);
    let mut reqs: Vec<Request> = Vec::with_capacity(n);
    let make = |arrival: f64, rng: &mut Rng| Request {
        arrival,
        prompt: traffic.prompt.draw(rng).max(1),
        output: traffic.output.draw(rng).max(1),
        prefilled: 0,
        generated: 0,
        first: 0.0,
        done: 0.0,
    };
    let mut clients = 0;
    match traffic.arrivals {
        Arrivals::Rate(rate) => {
            let per_router = rate / routers as f64;
            let mut t = 0.0;
            for _ in 0..n {
                t += -rng.unit().ln() / per_router;
                reqs.push(make(t, &mut rng));
            }
        }
        Arrivals::Concurrency(c) => {
            clients = c.div_ceil(routers).max(1).min(n);
            for _ in 0..clients {
                reqs.push(make(0.0, &mut rng));
            }
        }
    }
    let budget = limits.max_batch_tokens.max(1);
    let mut now = 0.0f64;
    let mut next = 0; // first request not yet admitted
    let mut running: Vec<usize> = Vec::new();
    let (mut steps, mut step_tokens, mut decode_seqs) = (0usize, 0usize, 0usize);
    let (mut node_busy, mut link_bytes, mut wire_bytes) = (0f64, 0f64, 0f64);
    let mut peak_running = 0;
    // Bounded: every step makes progress on at least one token of one request.
    let bound: usize = 4 * (traffic.prompt.max() + traffic.output.max() + 1) * n + 16;
    while steps < bound {
        while next < reqs.len() && reqs[next].arrival <= now && running.len() < limits.max_running {
            running.push(next);
            next += 1;
        }
        if running.is_empty() {
            if next < reqs.len() {
                now = now.max(reqs[next].arrival);
                continue;
            }
            break;
        }
        peak_running = peak_running.max(running.len());
        let mut step = Step::default();
        let mut left = budget;
        let mut chunks: Vec<(usize, usize)> = Vec::new();
        let mut decoders: Vec<usize> = Vec::new();
        for &i in &running {
            let r = &reqs[i];
            if r.prefilled == r.prompt && left > 0 {
                decoders.push(i);
                step.decode += 1;
                step.logits += 1;
                step.decode_context += (r.prompt + r.generated) as f64;
                left -= 1;
            }
        }
        for &i in &running {
            let r = &reqs[i];
            if r.prefilled < r.prompt && left > 0 {
                let take = (r.prompt - r.prefilled).min(left);
                left -= take;
                step.prefill += take;
                // Positions prefilled..prefilled+take attend to themselves and all before.
                let (a, b) = (r.prefilled as f64, (r.prefilled + take) as f64);
                step.prefill_context += (b * (b + 1.0) - a * (a + 1.0)) / 2.0;
                if r.prefilled + take == r.prompt {
                    step.logits += 1;
                }
                chunks.push((i, take));
            }
        }
        let cost = cluster.step(&step, others);
        now += cost.total;
        steps += 1;
        step_tokens += step.tokens();
        decode_seqs += step.decode;
        node_busy += cost.node_busy;
        link_bytes += cost.link_bytes;
        wire_bytes += cost.wire_bytes;
        for &i in &decoders {
            reqs[i].generated += 1;
        }
        for &(i, take) in &chunks {
            let r = &mut reqs[i];
            r.prefilled += take;
            if r.prefilled == r.prompt {
                r.generated = 1;
                r.first = now;
            }
        }
        let mut finished = 0;
        running.retain(|&i| {
            let r = &mut reqs[i];
            if r.generated >= r.output {
                r.done = now;
                finished += 1;
                false
            } else {
                true
            }
        });
        if clients > 0 {
            for _ in 0..finished {
                if reqs.len() < n {
                    // The client's next request arrives once the engine has begun its next step: it waits that
                    // step out.
                    let r = make(now + CLIENT_TURNAROUND_S, &mut rng);
                    reqs.push(r);
                }
            }
        }
        if next >= reqs.len() && running.is_empty() && reqs.len() >= n {
            break;
        }
    }
    let done: Vec<&Request> = reqs.iter().filter(|r| r.done > 0.0).collect();
    let duration = done.iter().map(|r| r.done).fold(0.0, f64::max) - reqs.first().map_or(0.0, |r| r.arrival);
    let duration = duration.max(1e-9);
    let output: usize = done.iter().map(|r| r.output).sum();
    let ttft: Vec<f64> = done.iter().map(|r| r.first - r.arrival).collect();
    let tpot: Vec<f64> =
        done.iter().filter(|r| r.output > 1).map(|r| (r.done - r.first) / (r.output - 1) as f64).collect();
    let e2e: Vec<f64> = done.iter().map(|r| r.done - r.arrival).collect();
    let saturated = match traffic.arrivals {
        // Open loop: served slower than offered, or the later requests wait far longer than the first.
        Arrivals::Rate(_) => {
            // The rate these arrivals realised (a Poisson draw of a few hundred is a few per cent off the mean).
            let span = reqs.last().map_or(0.0, |r| r.arrival) - reqs.first().map_or(0.0, |r| r.arrival);
            let offered = reqs.len().saturating_sub(1) as f64 / span.max(1e-9);
            let served = done.len() as f64 / duration;
            let quarter = (ttft.len() / 4).max(1);
            let early = ttft[..quarter.min(ttft.len())].iter().sum::<f64>() / quarter as f64;
            let late = ttft[ttft.len().saturating_sub(quarter)..].iter().sum::<f64>() / quarter as f64;
            served < 0.9 * offered || late > 4.0 * early.max(1e-3)
        }
        Arrivals::Concurrency(_) => false,
    };
    let r = routers as f64;
    let link_bw = cluster.router.network.bandwidth_bytes_per_s;
    Outcome {
        ttft_s: Percentiles::of(ttft),
        tpot_s: Percentiles::of(tpot),
        e2e_s: Percentiles::of(e2e),
        output_tokens_per_s: output as f64 / duration * r,
        requests_per_s: done.len() as f64 / duration * r,
        mean_step_tokens: step_tokens as f64 / steps.max(1) as f64,
        mean_decode_batch: decode_seqs as f64 / steps.max(1) as f64,
        node_utilisation: (node_busy / duration * r).min(1.0),
        link_utilisation: (link_bytes / duration / link_bw).min(1.0),
        wire_bytes_per_output_token: wire_bytes / output.max(1) as f64,
        saturated,
        peak_running,
    }
}
