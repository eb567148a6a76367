//! Placement records as read from etcd: members, the model's shape, the placement and its epoch, readiness, load
//! reports, operator requests and their outcomes. Anyone who can write to the store can write these bytes.

use std::sync::Arc;

use moe_placement::{Cluster, MemoryStore, PlacementStore};

/// The record kinds under a cluster's prefix, picked by each record's first byte.
const KINDS: &[&str] = &[
    "members/a",
    "members/b",
    "model",
    "placement",
    "ready/a",
    "using/r",
    "load/a",
    "served/a",
    "drain/a",
    "controller",
    "request",
    "outcome",
];

/// Records separated by zero bytes (never in JSON text), each a kind byte and the value. The snapshot reads them all;
/// whatever it accepts is used the way routers and the controller use it.
pub fn placement(data: &[u8]) {
    let store = Arc::new(MemoryStore::new());
    let Ok(cluster) = Cluster::new(store.clone() as Arc<dyn PlacementStore>, "fuzz") else { return };
    futures::executor::block_on(async {
        for record in data.split(|&b| b == 0) {
            let Some((&kind, value)) = record.split_first() else { continue };
            let key = cluster.key(KINDS[kind as usize % KINDS.len()]);
            let _ = store.put(&key, value.to_vec(), None).await;
        }
        let Ok(view) = cluster.snapshot().await else { return };
        if let Some(shape) = &view.model {
            let _ = shape.total_experts();
            let _ = view.total_load(shape);
        }
        let _ = view.oldest_in_use();
        let _ = view.expert_nodes().count();
        if let Some(p) = &view.placement {
            let _ = view.is_ready(p);
            let _ = p.counts();
            for node in &p.nodes {
                let _ = p.experts_of(&node.id);
                let _ = p.node_index(&node.id);
            }
            let _ = p.assignment();
            if let Some(shape) = &view.model {
                let _ = p.validate(shape);
            }
        }
    });
}
