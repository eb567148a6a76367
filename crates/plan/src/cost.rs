//! The time of one engine step on a cluster configuration: each stage at its roofline on the machine it runs on,
//! times the profile's measured correction, the expert nodes' share of the routed work with the hot-expert skew,
//! the wire between them, and the ping-pong of micro-batches.

use crate::hardware::{Profile, Stage};
use crate::shape::Shape;

/// How a cluster is laid out.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub routers: usize,
    /// Expert nodes; 0 keeps the experts in the routers' processes (co-located).
    pub expert_nodes: usize,
    /// How many of the hottest experts get a second copy on another node (their load split between the two).
    pub replicas: usize,
    /// Micro-batches per step (attention of one overlaps the experts of the other).
    pub micro_batches: usize,
    /// Every process on one machine of the router's profile, its cores split as `moectl up` splits them.
    pub one_machine: bool,
}

impl Layout {
    pub fn nodes(&self) -> usize {
        if self.one_machine {
            1
        } else {
            self.routers + self.expert_nodes
        }
    }
}

/// How the routed pairs spread over the experts: each expert's share of all pairs, summing to 1.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertLoad {
    pub shares: Vec<f64>,
}

impl ExpertLoad {
    /// Loads following a Zipf law of exponent `s` over `experts` experts (0: uniform), hottest first.
    pub fn zipf(experts: usize, s: f64) -> ExpertLoad {
        let raw: Vec<f64> = (0..experts.max(1)).map(|i| 1.0 / ((i + 1) as f64).powf(s)).collect();
        Self::from_counts(&raw)
    }

    /// Loads from measured counts (any scale), sorted hottest first.
    pub fn from_counts(counts: &[f64]) -> ExpertLoad {
        let total: f64 = counts.iter().sum();
        let mut shares: Vec<f64> = if total > 0.0 {
            counts.iter().map(|c| c / total).collect()
        } else {
            vec![1.0 / counts.len().max(1) as f64; counts.len().max(1)]
        };
        shares.sort_by(|a, b| b.total_cmp(a));
        ExpertLoad { shares }
    }

    /// Loads from measured counts per MoE layer (`[layer][expert]`, as etcd's `load/` keys sum them): each layer's
    /// shares sorted hottest first and averaged rank by rank over the layers that saw any load, since the balancer
    /// places every layer on its own and what costs time is how uneven each layer is, not which expert is hot.
    pub fn from_layers(counts: &[Vec<f64>]) -> ExpertLoad {
        let experts = counts.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut sum = vec![0.0; experts];
        let mut layers = 0usize;
        for row in counts {
            let total: f64 = row.iter().filter(|c| c.is_finite() && **c > 0.0).sum();
            if total <= 0.0 {
                continue;
            }
            let mut shares: Vec<f64> =
                row.iter().map(|c| if c.is_finite() { c.max(0.0) / total } else { 0.0 }).collect();
            shares.resize(experts, 0.0);
            shares.sort_by(|a, b| b.total_cmp(a));
            for (s, v) in sum.iter_mut().zip(shares) {
                *s += v;
            }
            layers += 1;
        }
        if layers == 0 {
            return ExpertLoad::zipf(experts, 0.0);
        }
        ExpertLoad::from_counts(&sum)
    }
}

/// What each expert node hosts: (share of all pairs, the fraction of that expert's pairs it answers).
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub nodes: Vec<Vec<(f64, f64)>>,
}

impl Placement {
    /// Experts dealt hottest first to the least loaded node, as the balancer does; the `replicas` hottest get a
    /// second copy on the least loaded other node, and each copy answers half.
    pub fn balanced(load: &ExpertLoad, nodes: usize, replicas: usize) -> Placement {
        let n = nodes.max(1);
        let mut out: Vec<Vec<(f64, f64)>> = vec![Vec::new(); n];
        let mut sums = vec![0f64; n];
        let least = |sums: &[f64], skip: Option<usize>| -> usize {
            (0..sums.len()).filter(|&j| Some(j) != skip).min_by(|&a, &b| sums[a].total_cmp(&sums[b])).unwrap_or(0)
        };
        for (i, &share) in load.shares.iter().enumerate() {
            if i < replicas && n > 1 {
                let a = least(&sums, None);
                out[a].push((share, 0.5));
                sums[a] += share / 2.0;
                let b = least(&sums, Some(a));
                out[b].push((share, 0.5));
                sums[b] += share / 2.0;
            } else {
                let a = least(&sums, None);
                out[a].push((share, 1.0));
                sums[a] += share;
            }
        }
        Placement { nodes: out }
    }

    /// Experts (copies) on node `j`.
    pub fn hosted(&self, j: usize) -> usize {
        self.nodes.get(j).map_or(0, Vec::len)
    }
}

/// The tokens of one step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Step {
    /// Sequences taking one decode token.
    pub decode: usize,
    /// Prompt tokens in chunks.
    pub prefill: usize,
    /// Tokens that need logits (every decode token, the last token of a finished prompt).
    pub logits: usize,
    /// Sum over the decode tokens of the positions each attends to.
    pub decode_context: f64,
    /// The same for the prompt tokens.
    pub prefill_context: f64,
}

impl Step {
    pub fn tokens(&self) -> usize {
        self.decode + self.prefill
    }
}

/// Where the time of a step went, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepCost {
    pub dense: f64,
    pub experts: f64,
    pub deltanet: f64,
    pub attention: f64,
    pub wire: f64,
    pub rest: f64,
    /// The step, with the overlap of micro-batches.
    pub total: f64,
    /// Time the busiest expert node computed in this step (0 when co-located).
    pub node_busy: f64,
    /// Bytes over the busiest link in this step.
    pub link_bytes: f64,
    /// Bytes over all links in this step.
    pub wire_bytes: f64,
}

/// A configuration to cost steps on.
#[derive(Debug, Clone)]
pub struct Cluster<'a> {
    pub shape: &'a Shape,
    pub router: &'a Profile,
    pub expert: &'a Profile,
    pub layout: Layout,
    pub placement: Placement,
    /// Bytes of one activation value on the wire (4: f32, 2: bf16).
    pub wire_value_bytes: f64,
}

/// Compute threads of the router and of each expert node when `total` cores hold them all: the rule of
/// `moectl up` (turns without micro-batches: the router takes every core and the nodes share them; with
/// micro-batches the two sides overlap and each gets half).
pub fn split_threads(total: usize, nodes: usize, micro_batches: usize) -> (usize, usize) {
    if nodes == 0 {
        return (total.max(1), 0);
    }
    let overlap = micro_batches > 1;
    let router = if overlap { (total / 2).max(1) } else { total.max(1) };
    let for_nodes = if overlap { total.saturating_sub(router).max(1) } else { total.max(1) };
    (router, (for_nodes / nodes).max(1))
}

impl<'a> Cluster<'a> {
    pub fn new(shape: &'a Shape, router: &'a Profile, expert: &'a Profile, layout: Layout, load: &ExpertLoad) -> Self {
        let placement = Placement::balanced(load, layout.expert_nodes.max(1), layout.replicas);
        Cluster { shape, router, expert, layout, placement, wire_value_bytes: 4.0 }
    }

    /// The share of its machine's cores the router computes on, and each expert node.
    fn shares(&self) -> (f64, f64) {
        if !self.layout.one_machine {
            return (1.0, 1.0);
        }
        let cores = self.router.cores;
        let nodes = self.layout.expert_nodes;
        let (r, n) = split_threads(cores, nodes, self.layout.micro_batches);
        // The nodes compute their pieces of a layer at the same time: more of their threads than cores share them.
        let n = if nodes > 0 { (n as f64).min(cores as f64 / nodes as f64) } else { 0.0 };
        (r as f64 / cores as f64, n / cores as f64)
    }

    /// The profile the expert nodes run on.
    fn node_profile(&self) -> &Profile {
        if self.layout.one_machine {
            self.router
        } else {
            self.expert
        }
    }

    /// The routed experts' time on the busiest holder for a step of `tokens` tokens, and the pairs and token rows
    /// each holder gets.
    fn experts_on_nodes(&self, tokens: f64, profile: &Profile, share: f64) -> (f64, Vec<(f64, f64)>) {
        let s = self.shape;
        let k = s.top_k as f64;
        let mut busiest = 0f64;
        let mut traffic = Vec::with_capacity(self.placement.nodes.len());
        for hosted in &self.placement.nodes {
            let mut pairs = 0.0;
            let mut distinct = 0.0;
            let mut node_share = 0.0;
            for &(expert_share, fraction) in hosted {
                let per_token = (k * expert_share).min(1.0) * fraction;
                pairs += tokens * per_token;
                distinct += 1.0 - (1.0 - per_token).powf(tokens);
                node_share += expert_share * fraction;
            }
            let flops = s.expert_flops(pairs);
            let bytes = distinct * s.expert_bytes() * s.moe_layers as f64;
            let t = profile.stage_time(Stage::RoutedExperts, flops, bytes, tokens, share);
            busiest = busiest.max(t);
            // A token is sent to a node when one of its k choices is there.
            let rows = tokens * (1.0 - (1.0 - node_share).powf(k)).min(1.0);
            traffic.push((rows, pairs));
        }
        (busiest, traffic)
    }

    /// The router's own stages for a step (everything but the routed experts), in seconds on `share` of its cores.
    fn router_stages(&self, step: &Step, share: f64) -> (f64, f64, f64, f64) {
        let s = self.shape;
        let p = self.router;
        let t = step.tokens() as f64;
        let lm = if step.logits > 0 { s.lm_head_bytes() } else { 0.0 };
        let dense = p.stage_time(
            Stage::DenseProjections,
            s.dense_flops(t, step.logits as f64),
            s.dense_params as f64 * crate::shape::WEIGHT_BYTES + lm,
            t,
            share,
        );
        let d = step.decode as f64;
        let recurrent = if step.decode > 0 {
            p.stage_time(Stage::DeltanetRecurrent, s.delta_recurrent_flops(d), s.delta_recurrent_bytes(d), d, share)
        } else {
            0.0
        };
        let chunked = if step.prefill > 0 {
            let n = step.prefill as f64;
            p.stage_time(Stage::DeltanetChunked, s.delta_chunked_flops(n), 0.0, n, share)
        } else {
            0.0
        };
        let attention = p.stage_time(
            Stage::AttentionCore,
            s.attention_flops(step.decode_context + step.prefill_context),
            s.attention_bytes(step.decode_context),
            t,
            share,
        );
        // Serving (scheduling, sampling, streaming) costs a part per step and a part per sampled token.
        let rest = (p.rest.at(t) / share) + p.serving.at(step.logits as f64);
        (dense, recurrent + chunked, attention, rest)
    }

    /// The cost of one step; `others_busy` is the fraction of time the expert nodes spend on other routers' work,
    /// which this router's requests queue behind.
    pub fn step(&self, step: &Step, others_busy: f64) -> StepCost {
        let s = self.shape;
        let t = step.tokens() as f64;
        if step.tokens() == 0 {
            return StepCost::default();
        }
        let (router_share, node_share) = self.shares();
        let (dense, deltanet, attention, rest) = self.router_stages(step, router_share);
        if self.layout.expert_nodes == 0 {
            let (experts, _) = self.experts_on_nodes(t, self.router, router_share);
            let total = dense + deltanet + attention + rest + experts;
            return StepCost { dense, experts, deltanet, attention, rest, total, ..StepCost::default() };
        }
        let node = self.node_profile();
        let m = self.layout.micro_batches.max(1) as f64;
        let layers = s.moe_layers.max(1) as f64;
        // One micro-batch of one layer: the router's part, the busiest node's part, the wire between them.
        let part = |tokens: f64| -> (f64, f64, f64, f64, f64) {
            let scale = tokens / t;
            let sub = Step {
                decode: (step.decode as f64 * scale).round() as usize,
                prefill: (step.prefill as f64 * scale).round() as usize,
                logits: (step.logits as f64 * scale).round() as usize,
                decode_context: step.decode_context * scale,
                prefill_context: step.prefill_context * scale,
            };
            let (d, dn, a, _) = self.router_stages(&sub, router_share);
            let (e, traffic) = self.experts_on_nodes(tokens, node, node_share);
            let (mut out_all, mut back_all, mut busiest_link, mut busiest_both) = (0f64, 0f64, 0f64, 0f64);
            for &(rows, pairs) in &traffic {
                let (o, b) = s.wire_bytes_per_layer(rows, pairs, self.wire_value_bytes);
                out_all += o;
                back_all += b;
                busiest_link = busiest_link.max(o.max(b));
                busiest_both = busiest_both.max(o + b);
            }
            let net = &self.router.network;
            let node_link = &node.network;
            // The router encodes and decodes every link's messages; on one machine the nodes' codecs share its cores.
            let codec = net.codec_rate(self.router.memory_bandwidth_bytes_per_s);
            let serialise = (out_all + back_all) / codec;
            let wire = net.round_trip_s
                + (out_all.max(back_all) / net.bandwidth_bytes_per_s)
                    .max(busiest_link / node_link.bandwidth_bytes_per_s)
                + serialise;
            let e_layer = e / layers;
            let busy = others_busy.clamp(0.0, 0.95);
            let queued = e_layer * busy / (2.0 * (1.0 - busy));
            ((d + dn + a) / layers, e_layer + queued, wire, out_all + back_all, busiest_link)
        };
        let whole = part(t);
        let (router_layer, node_layer, wire_layer, bytes_layer, link_layer) = if m > 1.0 {
            let p = part(t / m);
            let side_r = p.0;
            let side_e = p.1 + p.2;
            let overlapped = m * side_r.max(side_e) + side_r.min(side_e);
            // Report the parts in the proportions of the whole, scaled to the overlapped time.
            let sum = (whole.0 + whole.1 + whole.2).max(1e-12);
            let f = overlapped / sum;
            (whole.0 * f, whole.1 * f, whole.2 * f, whole.3, whole.4)
        } else {
            whole
        };
        let router_total = router_layer * layers;
        let (d_all, dn_all, a_all) = (dense, deltanet, attention);
        let own_sum = (d_all + dn_all + a_all).max(1e-12);
        let f = router_total / own_sum;
        let experts = node_layer * layers;
        let wire = wire_layer * layers;
        StepCost {
            dense: d_all * f,
            experts,
            deltanet: dn_all * f,
            attention: a_all * f,
            wire,
            rest,
            total: router_total + experts + wire + rest,
            node_busy: self.experts_on_nodes(t, node, node_share).0,
            link_bytes: link_layer * layers,
            wire_bytes: bytes_layer * layers,
        }
    }
}
