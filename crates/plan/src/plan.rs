//! The search: every layout in the space is costed, simulated under the traffic, checked for memory and the SLO,
//! and priced; the answer is the cheapest layout that meets the SLO, next to the best co-located one and the Pareto
//! set of throughput per node against per-user speed.

use serde::Serialize;

use crate::cost::{Cluster, ExpertLoad, Layout};
use crate::error::{PlanError, Result};
use crate::hardware::Profile;
use crate::shape::{Shape, STATE_BYTES};
use crate::simulate::{simulate, Arrivals, EngineLimits, Outcome, Traffic};

/// Latency objectives, at one percentile.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Slo {
    pub ttft_s: Option<f64>,
    pub tpot_s: Option<f64>,
    /// 50, 90 or 99.
    pub percentile: u32,
}

/// The layouts to try.
#[derive(Debug, Clone, PartialEq)]
pub struct Space {
    pub routers: Vec<usize>,
    pub expert_nodes: Vec<usize>,
    /// Numbers of hot experts given a second copy.
    pub replicas: Vec<usize>,
    pub micro_batches: Vec<usize>,
}

/// Memory one node needs, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Memory {
    pub weights: f64,
    pub kv_pages: f64,
    pub deltanet_slots: f64,
    pub activations: f64,
    pub wire_buffers: f64,
    pub total: f64,
    pub available: f64,
    pub fits: bool,
}

impl Memory {
    fn new(
        weights: f64,
        kv_pages: f64,
        deltanet_slots: f64,
        activations: f64,
        wire_buffers: f64,
        available: f64,
    ) -> Self {
        let total = weights + kv_pages + deltanet_slots + activations + wire_buffers;
        Memory {
            weights,
            kv_pages,
            deltanet_slots,
            activations,
            wire_buffers,
            total,
            available,
            fits: total <= available,
        }
    }
}

/// The memory of a router holding `sequences` sequences of up to `context` tokens (their reservations), and of the
/// busiest expert node.
pub fn memory(
    shape: &Shape,
    cluster: &Cluster<'_>,
    limits: &EngineLimits,
    sequences: usize,
    context: usize,
) -> (Memory, Memory) {
    let layout = &cluster.layout;
    let t = limits.max_batch_tokens as f64;
    let h = shape.hidden as f64;
    let k = shape.top_k as f64;
    let colocated = layout.expert_nodes == 0;
    // Hidden states, norms, projections and the widest intermediate of a step, and the logits of its decode tokens.
    let widest = (shape.conv_channels.max(2 * shape.heads * shape.head_dim).max(shape.expert_width * 2)) as f64;
    let logits = (sequences.min(limits.max_batch_tokens).max(1) * shape.vocab) as f64 * STATE_BYTES;
    let mut activations = t * (6.0 * h + 2.0 * widest) * STATE_BYTES + logits;
    if colocated {
        activations += t * k * (2.0 * shape.expert_width as f64 + h) * STATE_BYTES;
    }
    let wire =
        if colocated { 0.0 } else { 2.0 * t * h * (1.0 + k) * cluster.wire_value_bytes * layout.micro_batches as f64 };
    let weights = shape.router_weight_bytes() + if colocated { shape.all_expert_bytes() } else { 0.0 };
    let router = Memory::new(
        weights,
        sequences as f64 * context as f64 * shape.kv_bytes_per_token(),
        sequences as f64 * shape.deltanet_slot_bytes(),
        activations,
        wire,
        cluster.router.memory_bytes,
    );
    if colocated {
        return (router, Memory::default());
    }
    let busiest = (0..cluster.placement.nodes.len()).map(|j| cluster.placement.hosted(j)).max().unwrap_or(0);
    let routers = layout.routers as f64;
    let node_available = if layout.one_machine { cluster.router.memory_bytes } else { cluster.expert.memory_bytes };
    let node = Memory::new(
        busiest as f64 * shape.expert_bytes() * shape.moe_layers as f64,
        0.0,
        0.0,
        t * k * (2.0 * shape.expert_width as f64 + h) * STATE_BYTES,
        2.0 * routers * t * h * (1.0 + k) * cluster.wire_value_bytes,
        node_available,
    );
    (router, node)
}

/// One layout, costed.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub routers: usize,
    pub expert_nodes: usize,
    pub replicas: usize,
    pub micro_batches: usize,
    pub colocated: bool,
    pub nodes: usize,
    pub router_memory: Memory,
    pub expert_node_memory: Memory,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub output_tokens_per_s_per_node: f64,
    /// Output tokens per second one user sees (1 / median TPOT).
    pub user_tokens_per_s: f64,
    pub cost_per_hour: f64,
    pub dollars_per_million_output_tokens: f64,
    pub meets_slo: bool,
    /// What keeps it from the answer, if anything.
    pub verdict: String,
    pub pareto: bool,
}

/// The whole answer.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub candidates: Vec<Candidate>,
    /// Index of the cheapest layout that fits and meets the SLO.
    pub best: Option<usize>,
    /// Index of the cheapest co-located layout that does.
    pub best_colocated: Option<usize>,
}

/// Everything a plan is made from.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub shape: &'a Shape,
    pub router: &'a Profile,
    pub expert: &'a Profile,
    pub traffic: Traffic,
    pub slo: Slo,
    pub load: ExpertLoad,
    pub limits: EngineLimits,
    pub space: Space,
    pub one_machine: bool,
    pub wire_value_bytes: f64,
}

impl Inputs<'_> {
    pub fn check(&self) -> Result<()> {
        if let (Some(ttft), Some(tpot)) = (self.slo.ttft_s, self.slo.tpot_s) {
            if ttft <= 0.0 || tpot <= 0.0 {
                return Err(PlanError::argument("slo", "ttft and tpot must be positive"));
            }
        }
        if ![50, 90, 99].contains(&self.slo.percentile) {
            return Err(PlanError::argument("slo", format!("p={}: 50, 90 or 99", self.slo.percentile)));
        }
        if self.space.routers.contains(&0) {
            return Err(PlanError::argument("routers", "at least 1"));
        }
        if self.space.micro_batches.contains(&0) {
            return Err(PlanError::argument("micro-batches", "at least 1"));
        }
        if self.one_machine && self.space.routers.iter().any(|&r| r != 1) {
            return Err(PlanError::argument("routers", "one machine (moectl up) runs one router"));
        }
        Ok(())
    }

    /// Costs one layout.
    pub fn evaluate(&self, layout: Layout) -> Candidate {
        let mut cluster = Cluster::new(self.shape, self.router, self.expert, layout.clone(), &self.load);
        cluster.wire_value_bytes = self.wire_value_bytes;
        let outcome = simulate(&cluster, &self.traffic, &self.limits);
        let context = self.traffic.prompt.max() + self.traffic.output.max();
        let sequences = outcome.peak_running.max(1);
        let (router_memory, node_memory) = memory(self.shape, &cluster, &self.limits, sequences, context);
        let nodes = layout.nodes();
        let cost_per_hour = if layout.one_machine {
            self.router.cost_per_hour
        } else {
            layout.routers as f64 * self.router.cost_per_hour + layout.expert_nodes as f64 * self.expert.cost_per_hour
        };
        let q = self.slo.percentile;
        let ttft = outcome.ttft_s.at(q);
        let tpot = outcome.tpot_s.at(q);
        let mut misses = Vec::new();
        if !router_memory.fits {
            misses.push(format!(
                "router needs {:.1} GB of {:.1}",
                router_memory.total / 1e9,
                router_memory.available / 1e9
            ));
        }
        if layout.expert_nodes > 0 && !node_memory.fits {
            misses.push(format!(
                "expert node needs {:.1} GB of {:.1}",
                node_memory.total / 1e9,
                node_memory.available / 1e9
            ));
        }
        if outcome.saturated {
            misses.push("saturated: the load is more than it serves".into());
        }
        if let Some(limit) = self.slo.ttft_s.filter(|&l| ttft > l) {
            misses.push(format!("TTFT p{q} {:.0} ms > {:.0} ms", ttft * 1e3, limit * 1e3));
        }
        if let Some(limit) = self.slo.tpot_s.filter(|&l| tpot > l) {
            misses.push(format!("TPOT p{q} {:.1} ms > {:.1} ms", tpot * 1e3, limit * 1e3));
        }
        let meets_slo = misses.is_empty();
        let throughput = outcome.output_tokens_per_s;
        Candidate {
            routers: layout.routers,
            expert_nodes: layout.expert_nodes,
            replicas: layout.replicas,
            micro_batches: layout.micro_batches,
            colocated: layout.expert_nodes == 0,
            nodes,
            router_memory,
            expert_node_memory: node_memory,
            output_tokens_per_s_per_node: throughput / nodes as f64,
            user_tokens_per_s: if outcome.tpot_s.p50 > 0.0 { 1.0 / outcome.tpot_s.p50 } else { 0.0 },
            cost_per_hour,
            dollars_per_million_output_tokens: if throughput > 0.0 {
                cost_per_hour / (throughput * 3600.0) * 1e6
            } else {
                f64::INFINITY
            },
            meets_slo,
            verdict: if meets_slo { "meets the SLO".into() } else { misses.join("; ") },
            pareto: false,
            outcome,
        }
    }

    /// Costs every layout of the space.
    pub fn plan(&self) -> Result<Plan> {
        self.check()?;
        let mut candidates = Vec::new();
        for &routers in &self.space.routers {
            for &expert_nodes in &self.space.expert_nodes {
                let replicas: &[usize] = if expert_nodes >= 2 { &self.space.replicas } else { &[0] };
                let micro: &[usize] = if expert_nodes >= 1 { &self.space.micro_batches } else { &[1] };
                for &replicas in replicas {
                    for &micro_batches in micro {
                        let layout =
                            Layout { routers, expert_nodes, replicas, micro_batches, one_machine: self.one_machine };
                        candidates.push(self.evaluate(layout));
                    }
                }
            }
        }
        mark_pareto(&mut candidates);
        let cheapest = |colocated: Option<bool>| {
            candidates
                .iter()
                .enumerate()
                .filter(|(_, c)| c.meets_slo && colocated.is_none_or(|want| c.colocated == want))
                .min_by(|(_, a), (_, b)| {
                    a.cost_per_hour
                        .total_cmp(&b.cost_per_hour)
                        .then(b.outcome.output_tokens_per_s.total_cmp(&a.outcome.output_tokens_per_s))
                })
                .map(|(i, _)| i)
        };
        let best = cheapest(None);
        let best_colocated = cheapest(Some(true));
        Ok(Plan { candidates, best, best_colocated })
    }
}

/// Marks the layouts no other beats on both throughput per node and per-user speed (among those that fit and are
/// not saturated).
fn mark_pareto(candidates: &mut [Candidate]) {
    let ok = |c: &Candidate| c.router_memory.fits && (c.colocated || c.expert_node_memory.fits) && !c.outcome.saturated;
    let points: Vec<(f64, f64, bool)> =
        candidates.iter().map(|c| (c.output_tokens_per_s_per_node, c.user_tokens_per_s, ok(c))).collect();
    for (i, c) in candidates.iter_mut().enumerate() {
        let (x, y, fine) = points[i];
        c.pareto = fine
            && !points
                .iter()
                .enumerate()
                .any(|(j, &(x2, y2, f2))| j != i && f2 && x2 >= x && y2 >= y && (x2 > x || y2 > y));
    }
}

/// The plan for a closed-loop benchmark at one concurrency on one layout: what `moectl bench` should measure.
pub fn predict(inputs: &Inputs<'_>, layout: Layout) -> Candidate {
    inputs.evaluate(layout)
}

/// The traffic's offered output rate, for messages.
pub fn offered_output(traffic: &Traffic) -> Option<f64> {
    match traffic.arrivals {
        Arrivals::Rate(r) => Some(r * traffic.output.mean()),
        Arrivals::Concurrency(_) => None,
    }
}
