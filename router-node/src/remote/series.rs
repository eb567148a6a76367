//! The expert-parallel series of the data plane, for `/metrics`: per node (round trip, bytes, pairs and share),
//! per MoE layer (how unevenly a dispatch loads the nodes: a layer's wait is its busiest node's), and the hottest
//! (layer, expert) pairs as a fixed-size set. Cardinality is linear in the nodes and the layers, never in
//! layers × experts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use moe_model::ModelConfig;
use moe_telemetry::metrics::{histogram, Scrape, DISPATCH_BUCKETS};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How many of the hottest (layer, expert) pairs `/metrics` lists.
pub const HOT_EXPERTS: usize = 10;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

type HistogramFamily = Family<NodeLabels, Histogram, fn() -> Histogram>;

fn dispatch_histogram() -> Histogram {
    histogram(DISPATCH_BUCKETS)
}

/// One MoE layer's dispatches: the (token, expert) pairs its busiest node got, and the mean over the nodes, summed
/// over dispatches (the mean in thousandths of a pair, to stay an integer).
#[derive(Debug, Default)]
struct LayerBalance {
    busiest: AtomicU64,
    mean_milli: AtomicU64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct DataPlaneSeries {
    round_trip: HistogramFamily,
    bytes_sent: Family<NodeLabels, Counter>,
    bytes_received: Family<NodeLabels, Counter>,
    /// (token, expert) pairs planned onto each node since start, in all and per layer (for the dashboard; not
    /// exported, which would be layers × nodes series).
    pairs: Mutex<BTreeMap<String, u64>>,
    layer_pairs: Mutex<Vec<BTreeMap<String, u64>>>,
    /// Per layer (empty for dense layers).
    layers: Vec<Option<LayerBalance>>,
    /// Tokens routed to each (layer, expert) since the router started.
    routed: Vec<Vec<AtomicU64>>,
}

impl DataPlaneSeries {
    pub fn new(config: &ModelConfig) -> Self {
        let moe = |l: usize| config.is_moe_layer(l);
        DataPlaneSeries {
            round_trip: Family::new_with_constructor(dispatch_histogram),
            bytes_sent: Family::default(),
            bytes_received: Family::default(),
            pairs: Mutex::default(),
            layer_pairs: Mutex::new(vec![BTreeMap::new(); config.num_hidden_layers]),
            layers: (0..config.num_hidden_layers).map(|l| moe(l).then(LayerBalance::default)).collect(),
            routed: (0..config.num_hidden_layers)
                .map(|l| if moe(l) { (0..config.num_experts).map(|_| AtomicU64::new(0)).collect() } else { Vec::new() })
                .collect(),
        }
    }

    fn labels(node: &str) -> NodeLabels {
        NodeLabels { node: node.to_owned() }
    }

    /// A message sent to `node`: its activation bytes.
    pub(crate) fn sent(&self, node: &str, bytes: u64) {
        self.bytes_sent.get_or_create(&Self::labels(node)).inc_by(bytes);
    }

    /// An answer from `node`: its round trip and partial-sum bytes.
    pub(crate) fn answered(&self, node: &str, round_trip: std::time::Duration, bytes: u64) {
        let labels = Self::labels(node);
        self.round_trip.get_or_create(&labels).observe(round_trip.as_secs_f64());
        self.bytes_received.get_or_create(&labels).inc_by(bytes);
    }

    /// One dispatch of `layer` planned over the nodes: the (token, expert) pairs each got.
    pub(crate) fn planned(&self, layer: usize, per_node: impl IntoIterator<Item = (String, u64)>) {
        let (mut busiest, mut total, mut nodes) = (0u64, 0u64, 0u64);
        let mut counts = self.pairs.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_layer = self.layer_pairs.lock().unwrap_or_else(|p| p.into_inner());
        for (node, pairs) in per_node {
            busiest = busiest.max(pairs);
            total += pairs;
            nodes += 1;
            if pairs > 0 {
                if let Some(row) = by_layer.get_mut(layer) {
                    *row.entry(node.clone()).or_default() += pairs;
                }
                *counts.entry(node).or_default() += pairs;
            }
        }
        drop((counts, by_layer));
        if let (Some(Some(balance)), true) = (self.layers.get(layer), nodes > 0 && total > 0) {
            balance.busiest.fetch_add(busiest, Ordering::Relaxed);
            balance.mean_milli.fetch_add(total * 1000 / nodes, Ordering::Relaxed);
        }
    }

    /// Tokens of a dispatch routed to `experts` of `layer`.
    pub(crate) fn routed(&self, layer: usize, experts: &[u32]) {
        if let Some(row) = self.routed.get(layer) {
            for &e in experts {
                if let Some(c) = row.get(e as usize) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The hottest (layer, expert) pairs, most tokens first (ties: lower layer, then lower expert).
    pub fn hottest(&self, k: usize) -> Vec<(usize, usize, u64)> {
        let mut all: Vec<(usize, usize, u64)> = self
            .routed
            .iter()
            .enumerate()
            .flat_map(|(l, row)| row.iter().enumerate().map(move |(e, c)| (l, e, c.load(Ordering::Relaxed))))
            .filter(|&(_, _, n)| n > 0)
            .collect();
        all.sort_unstable_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
        all.truncate(k);
        all
    }

    /// (token, expert) pairs planned onto each node, per layer, since start.
    pub fn layer_node_pairs(&self) -> Vec<BTreeMap<String, u64>> {
        self.layer_pairs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Tokens routed to each (layer, expert) since start: `[layer][expert]`, dense layers empty.
    pub fn routed_counts(&self) -> Vec<Vec<u64>> {
        self.routed.iter().map(|row| row.iter().map(|c| c.load(Ordering::Relaxed)).collect()).collect()
    }

    /// The series kept in families: per node.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "moe_dispatch_round_trip_seconds",
            "Round trip of one message to an expert node, from send to its answer",
            self.round_trip.clone(),
        );
        registry.register("moe_node_bytes_sent", "Activation bytes sent to each expert node", self.bytes_sent.clone());
        registry.register(
            "moe_node_bytes_received",
            "Partial-sum bytes received from each expert node",
            self.bytes_received.clone(),
        );
    }

    /// The series computed at scrape time: per layer and the hot set.
    pub fn scrape(&self, s: &mut Scrape<'_>) -> Result<(), std::fmt::Error> {
        let layer = |l: usize| vec![("layer", l.to_string())];
        let balances: Vec<(usize, u64, f64)> = self
            .layers
            .iter()
            .enumerate()
            .filter_map(|(l, b)| b.as_ref().map(|b| (l, b)))
            .map(|(l, b)| (l, b.busiest.load(Ordering::Relaxed), b.mean_milli.load(Ordering::Relaxed) as f64 / 1000.0))
            .collect();
        s.counters(
            "moe_layer_busiest_node_pairs",
            "Per MoE layer: the (token, expert) pairs of each dispatch's busiest node, summed over dispatches",
            balances.iter().map(|&(l, b, _)| (layer(l), b)),
        )?;
        s.counters(
            "moe_layer_mean_node_pairs",
            "Per MoE layer: the mean (token, expert) pairs per node of each dispatch, summed over dispatches \
             (rate(busiest) / rate(mean) is the imbalance over a window)",
            balances.iter().map(|&(l, _, m)| (layer(l), m)),
        )?;
        s.gauges(
            "moe_layer_load_imbalance",
            "Per MoE layer: busiest node over mean node, in (token, expert) pairs, since start (1 is even)",
            balances.iter().filter(|&&(_, _, m)| m > 0.0).map(|&(l, b, m)| (layer(l), b as f64 / m)),
        )?;
        let by_node: Vec<(String, u64)> =
            self.pairs.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(n, v)| (n.clone(), *v)).collect();
        let total: u64 = by_node.iter().map(|(_, n)| n).sum();
        s.counters(
            "moe_node_pairs",
            "(token, expert) pairs planned onto each expert node",
            by_node.iter().map(|(node, n)| (vec![("node", node.clone())], *n)),
        )?;
        s.gauges(
            "moe_node_token_share",
            "Each expert node's share of the (token, expert) pairs planned since start",
            by_node.iter().map(|(node, n)| (vec![("node", node.clone())], *n as f64 / total.max(1) as f64)),
        )?;
        s.gauges(
            "moe_hot_expert_tokens",
            "The hottest (layer, expert) pairs since start, by tokens routed (a fixed-size set; rank 1 is hottest)",
            self.hottest(HOT_EXPERTS).into_iter().enumerate().map(|(rank, (l, e, n))| {
                (vec![("rank", (rank + 1).to_string()), ("layer", l.to_string()), ("expert", e.to_string())], n as f64)
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_telemetry::metrics::{parse_series, registry_for_model, ScrapeWith};
    use std::sync::Arc;

    /// A Qwen3.5-sized expert layout: `layers` MoE layers of `experts` experts.
    fn config(layers: usize, experts: usize) -> ModelConfig {
        let types: Vec<String> =
            (0..layers).map(|l| if l % 4 == 3 { "full_attention" } else { "linear_attention" }.into()).collect();
        let json = serde_json::json!({
            "model_type": "qwen3_5_moe_text", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "linear_num_key_heads": 2,
            "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 24,
            "linear_conv_kernel_dim": 4, "num_experts": experts, "num_experts_per_tok": 8,
            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 4096, "layer_types": types, "full_attention_interval": 4,
        });
        ModelConfig::from_json_str(&json.to_string(), std::path::Path::new("config.json")).expect("config")
    }

    fn series_count(layers: usize, experts: usize, nodes: usize) -> usize {
        let s = Arc::new(DataPlaneSeries::new(&config(layers, experts)));
        // Every expert of every layer gets traffic, spread over every node.
        for layer in 0..layers {
            let all: Vec<u32> = (0..experts as u32).collect();
            s.routed(layer, &all);
            s.planned(layer, (0..nodes).map(|n| (format!("node-{n}"), (experts / nodes + n) as u64)));
        }
        for n in 0..nodes {
            s.sent(&format!("node-{n}"), 100);
            s.answered(&format!("node-{n}"), std::time::Duration::from_millis(1), 100);
        }
        let mut registry = registry_for_model("m");
        s.register(&mut registry);
        let scraped = Arc::clone(&s);
        registry.register_collector(Box::new(ScrapeWith(move |sc: &mut Scrape<'_>| scraped.scrape(sc))));
        parse_series(&moe_telemetry::metrics::encode(&registry)).len()
    }

    #[test]
    fn cardinality_is_linear_in_nodes_and_layers_not_in_experts() {
        let per_node_histogram = DISPATCH_BUCKETS.len() + 1 + 2;
        // 48 layers × 512 experts (24,576 pairs) over 8 nodes.
        let big = series_count(48, 512, 8);
        let bound = 8 * (per_node_histogram + 4) + 3 * 48 + HOT_EXPERTS;
        assert_eq!(big, bound, "series for 8 nodes, 48 layers");
        // The experts do not count; each node and layer does, by a fixed amount.
        assert_eq!(series_count(48, 64, 8), big);
        assert_eq!(series_count(48, 512, 9) - big, per_node_histogram + 4);
        assert_eq!(series_count(49, 512, 8) - big, 3);
    }

    #[test]
    fn the_hot_set_is_the_top_k_by_tokens() {
        let s = DataPlaneSeries::new(&config(4, 16));
        for (layer, expert, times) in [(0, 3, 5), (1, 7, 9), (3, 0, 2), (2, 15, 9)] {
            for _ in 0..times {
                s.routed(layer, &[expert]);
            }
        }
        assert_eq!(s.hottest(3), vec![(1, 7, 9), (2, 15, 9), (0, 3, 5)]);
        assert_eq!(s.hottest(10).len(), 4);
    }

    #[test]
    fn imbalance_is_the_busiest_node_over_the_mean() {
        let s = DataPlaneSeries::new(&config(4, 16));
        // 30 pairs over 3 nodes, 20 on one: mean 10, busiest 20.
        s.planned(1, [("a".to_owned(), 20), ("b".to_owned(), 10), ("c".to_owned(), 0)]);
        let mut registry = registry_for_model("m");
        let scraped = Arc::new(s);
        let c = Arc::clone(&scraped);
        registry.register_collector(Box::new(ScrapeWith(move |sc: &mut Scrape<'_>| c.scrape(sc))));
        let series = parse_series(&moe_telemetry::metrics::encode(&registry));
        let imbalance: Vec<f64> =
            series.iter().filter(|(n, _, _)| n == "moe_layer_load_imbalance").map(|(_, _, v)| *v).collect();
        assert_eq!(imbalance, vec![2.0]);
        let share: f64 = series
            .iter()
            .find(|(n, l, _)| n == "moe_node_token_share" && l.iter().any(|(k, v)| k == "node" && v == "a"))
            .map(|(_, _, v)| *v)
            .expect("share of a");
        assert!((share - 20.0 / 30.0).abs() < 1e-12);
    }
}
