//! The balancer: which node hosts which replicas of which (layer, expert), given measured per-expert load.
//!
//! It follows the EPLB idea (DeepSeek's expert-parallel load balancer), per layer, because every layer is its own
//! step of the forward pass and its slowest node sets the pace:
//! 1. **Replication.** Each expert gets one replica; spare slots go, one at a time, to the expert with the highest load
//!    per replica (its tokens are then spread over its replicas by the routers).
//! 2. **Packing.** Replicas, heaviest first, go to the node with the least load so far that has a free slot and does
//!    not hold that expert yet (two replicas on one node would not spread anything).
//!
//! Node memory is counted in expert slots and split evenly over the MoE layers, so that no layer is starved by
//! another's replicas.

/// A node the balancer may place experts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCapacity {
    pub id: String,
    /// How many experts (of any layer) fit in its memory.
    pub slots: usize,
}

/// `nodes[i]` of the input hosts, per layer, the listed experts: `layers[l][i]` is sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub layers: Vec<Vec<Vec<u32>>>,
}

impl Assignment {
    /// The nodes hosting `expert` of `layer`.
    pub fn replicas(&self, layer: usize, expert: u32) -> Vec<usize> {
        self.layers[layer]
            .iter()
            .enumerate()
            .filter(|(_, e)| e.binary_search(&expert).is_ok())
            .map(|(n, _)| n)
            .collect()
    }

    /// Per layer, the max / mean of the nodes' loads, where an expert's `load` is split evenly over its replicas.
    pub fn imbalance(&self, load: &[Vec<f64>]) -> Vec<f64> {
        self.layers
            .iter()
            .zip(load)
            .map(|(nodes, load)| {
                let mut replicas = vec![0usize; load.len()];
                for experts in nodes {
                    for &e in experts {
                        replicas[e as usize] += 1;
                    }
                }
                let per_node: Vec<f64> = nodes
                    .iter()
                    .map(|experts| experts.iter().map(|&e| load[e as usize] / replicas[e as usize] as f64).sum())
                    .collect();
                let mean = per_node.iter().sum::<f64>() / per_node.len().max(1) as f64;
                let max = per_node.iter().copied().fold(0.0, f64::max);
                if mean > 0.0 {
                    max / mean
                } else {
                    1.0
                }
            })
            .collect()
    }
}

/// Why no assignment exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BalanceError {
    #[error("no node to place experts on")]
    NoNodes,
    #[error("layer {layer} needs {needed} expert slots, the nodes have {available} for it")]
    NotEnoughSlots { layer: usize, needed: usize, available: usize },
    #[error("load has {got} layers of {experts} experts, expected {layers} of {expected}")]
    BadLoad { got: usize, experts: usize, layers: usize, expected: usize },
}

/// Places `num_experts` experts of each layer of `load` (`load[layer][expert]`, e.g. tokens routed in a window) on
/// `nodes`, filling their spare slots with replicas: of the experts with the most load per replica once load is
/// known, evenly (every expert once more before any twice more) in layers with no load yet. Replicas are what let a
/// node's loss cost no wait.
pub fn balance(load: &[Vec<f64>], num_experts: usize, nodes: &[NodeCapacity]) -> Result<Assignment, BalanceError> {
    if nodes.is_empty() {
        return Err(BalanceError::NoNodes);
    }
    if let Some(bad) = load.iter().find(|l| l.len() != num_experts) {
        return Err(BalanceError::BadLoad {
            got: load.len(),
            experts: bad.len(),
            layers: load.len(),
            expected: num_experts,
        });
    }
    let layers = load.len();
    let mut out = Vec::with_capacity(layers);
    for (l, load) in load.iter().enumerate() {
        // This layer's share of each node's slots; the remainders go to the first layers.
        let quota: Vec<usize> = nodes.iter().map(|n| n.slots / layers + usize::from(l < n.slots % layers)).collect();
        // A node can hold each expert once, so replicas beyond the node count are useless.
        let usable: usize = quota.iter().map(|&q| q.min(num_experts)).sum();
        if usable < num_experts {
            return Err(BalanceError::NotEnoughSlots { layer: l, needed: num_experts, available: usable });
        }
        // 1. Replication: the expert with the highest load per replica gets the next spare slot.
        let mut replicas = vec![1usize; num_experts];
        let total_load: f64 = load.iter().map(|v| v.max(0.0)).sum();
        // No load measured yet: every expert counts the same.
        let uniform = total_load <= 0.0;
        let weight = |e: usize, r: &[usize]| if uniform { 1.0 } else { load[e].max(0.0) } / r[e] as f64;
        {
            for _ in num_experts..usable {
                let Some(e) = (0..num_experts)
                    .filter(|&e| replicas[e] < nodes.len())
                    .max_by(|&a, &b| weight(a, &replicas).total_cmp(&weight(b, &replicas)).then(b.cmp(&a)))
                else {
                    break;
                };
                if weight(e, &replicas) == 0.0 {
                    break;
                }
                replicas[e] += 1;
            }
        }
        // 2. Packing: heaviest replica first, onto the least-loaded node with room that lacks that expert.
        let mut items: Vec<(f64, u32)> =
            (0..num_experts).flat_map(|e| std::iter::repeat_n((weight(e, &replicas), e as u32), replicas[e])).collect();
        items.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut node_load = vec![0f64; nodes.len()];
        let mut free = quota.clone();
        let mut hosted: Vec<Vec<u32>> = vec![Vec::new(); nodes.len()];
        for (w, e) in items {
            let target = (0..nodes.len())
                .filter(|&n| free[n] > 0 && !hosted[n].contains(&e))
                // Ties go to the node with more free slots, so that light experts do not crowd one node.
                .min_by(|&a, &b| node_load[a].total_cmp(&node_load[b]).then(free[b].cmp(&free[a])).then(a.cmp(&b)));
            let Some(n) = target else {
                // Only extra replicas can miss a place (the first one of each expert always fits, checked above).
                continue;
            };
            node_load[n] += w;
            free[n] -= 1;
            hosted[n].push(e);
        }
        for h in &mut hosted {
            h.sort_unstable();
        }
        out.push(hosted);
    }
    Ok(Assignment { layers: out })
}

/// The naive placement operators start from: each node takes a contiguous range of experts in every layer.
pub fn contiguous(layers: usize, num_experts: usize, nodes: usize) -> Assignment {
    let split = |i: usize| (num_experts * i / nodes) as u32..(num_experts * (i + 1) / nodes) as u32;
    Assignment { layers: (0..layers).map(|_| (0..nodes).map(|i| split(i).collect()).collect()).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize, slots: usize) -> Vec<NodeCapacity> {
        (0..n).map(|i| NodeCapacity { id: format!("n{i}"), slots }).collect()
    }

    /// 10 % of the experts receive half of the tokens.
    fn skewed(layers: usize, experts: usize) -> Vec<Vec<f64>> {
        let hot = (experts / 10).max(1);
        (0..layers)
            .map(|l| {
                (0..experts)
                    .map(|e| {
                        // The hot experts sit together, as they often do, at a layer-dependent offset.
                        let rel = (e + experts - (l * 7) % experts) % experts;
                        if rel < hot {
                            0.5 / hot as f64
                        } else {
                            0.5 / (experts - hot) as f64
                        }
                    })
                    .collect()
            })
            .collect()
    }

    fn check_valid(a: &Assignment, layers: usize, experts: usize, nodes: &[NodeCapacity]) {
        let mut used = vec![0usize; nodes.len()];
        for l in 0..layers {
            for e in 0..experts as u32 {
                assert!(!a.replicas(l, e).is_empty(), "expert {e} of layer {l} has no replica");
            }
            for (n, hosted) in a.layers[l].iter().enumerate() {
                let mut d = hosted.clone();
                d.dedup();
                assert_eq!(&d, hosted, "node {n} hosts an expert twice in layer {l}");
                used[n] += hosted.len();
            }
        }
        for (n, node) in nodes.iter().enumerate() {
            assert!(used[n] <= node.slots, "node {n} holds {} experts in {} slots", used[n], node.slots);
        }
    }

    #[test]
    fn skewed_load_is_balanced_with_replicas() {
        let (layers, experts) = (4, 64);
        let load = skewed(layers, experts);
        let nodes = nodes(3, layers * experts * 3 / 2 / 3 + 4);
        let naive = contiguous(layers, experts, 3).imbalance(&load);
        let a = balance(&load, experts, &nodes).expect("fits");
        check_valid(&a, layers, experts, &nodes);
        let balanced = a.imbalance(&load);
        eprintln!("max/mean node load per layer: contiguous {naive:.3?}, balanced {balanced:.3?}");
        for (n, b) in naive.iter().zip(&balanced) {
            assert!(*n > 1.3, "the skew makes the contiguous split uneven: {n}");
            assert!(*b < 1.05, "balanced max/mean {b} (contiguous {n})");
        }
    }

    #[test]
    fn without_spare_slots_packing_alone_evens_out() {
        let (layers, experts) = (2, 16);
        let load = skewed(layers, experts);
        let nodes = nodes(4, layers * experts / 4);
        let a = balance(&load, experts, &nodes).expect("fits exactly");
        check_valid(&a, layers, experts, &nodes);
        assert!(a.layers.iter().flatten().all(|h| h.len() == experts / 4));
        let b = a.imbalance(&load);
        let naive = contiguous(layers, experts, 4).imbalance(&load);
        assert!(b.iter().zip(&naive).all(|(b, n)| b <= n), "{b:?} vs {naive:?}");
    }

    #[test]
    fn too_little_memory_is_an_error() {
        let e = balance(&skewed(2, 16), 16, &nodes(2, 15)).expect_err("32 experts in 30 slots");
        assert!(matches!(e, BalanceError::NotEnoughSlots { .. }), "{e}");
        assert_eq!(balance(&skewed(1, 4), 4, &[]).expect_err("no nodes"), BalanceError::NoNodes);
    }

    #[test]
    fn unloaded_layers_fill_spare_slots_with_even_replicas() {
        let load = vec![vec![0.0; 8]; 2];
        // Room for everything twice: every expert on both nodes.
        let a = balance(&load, 8, &nodes(2, 100)).expect("fits");
        for l in 0..2 {
            assert!(a.layers[l].iter().all(|h| h.len() == 8), "{:?}", a.layers[l]);
        }
        // 12 slots per layer for 8 experts: 4 experts get a second replica, none a third, each node 6.
        let a = balance(&load, 8, &nodes(2, 12)).expect("fits");
        check_valid(&a, 2, 8, &nodes(2, 12));
        for l in 0..2 {
            let counts: Vec<usize> = (0..8).map(|e| a.replicas(l, e).len()).collect();
            assert_eq!(counts.iter().sum::<usize>(), 12, "{counts:?}");
            assert!(counts.iter().all(|&c| (1..=2).contains(&c)), "{counts:?}");
            assert_eq!(a.layers[l][0].len(), 6);
        }
    }
}
