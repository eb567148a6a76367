//! Placement epochs as the router uses them: the nodes, and which of them hosts each (layer, expert).

use std::sync::Arc;

use super::link::Link;
use crate::RouterError;

/// One placement as dispatches use it; replaced whole when the cluster switches epochs, a node reconnects, or a
/// static node's shard changes.
pub(crate) struct Topology {
    /// 0: a static placement (or none yet).
    pub epoch: u64,
    pub links: Vec<Arc<Link>>,
    /// `placement[layer][expert]`: indices into `links` of the nodes hosting it (empty rows for dense layers).
    pub placement: Vec<Vec<Vec<usize>>>,
}

impl Topology {
    pub fn empty() -> Self {
        Topology { epoch: 0, links: Vec::new(), placement: Vec::new() }
    }

    pub fn index_of(&self, link: &Arc<Link>) -> Option<usize> {
        self.links.iter().position(|l| Arc::ptr_eq(l, link))
    }

    /// An empty table for `config`: a row of experts for each MoE layer.
    pub fn table(config: &moe_model::ModelConfig) -> Vec<Vec<Vec<usize>>> {
        (0..config.num_hidden_layers)
            .map(|l| if config.is_moe_layer(l) { vec![Vec::new(); config.num_experts] } else { Vec::new() })
            .collect()
    }

    /// The static placement of `links`: each node hosts what it reported. Experts nobody hosts keep empty rows
    /// (work for them waits until a node hosts them again; `/readyz` says which).
    pub fn from_links(links: Vec<Arc<Link>>, config: &moe_model::ModelConfig) -> Result<Self, RouterError> {
        let mut placement = Self::table(config);
        for (index, link) in links.iter().enumerate() {
            let hosted = link.hosted.lock().unwrap_or_else(|p| p.into_inner()).clone();
            for (layer, experts) in &hosted {
                for &e in experts {
                    let slot = placement.get_mut(*layer).and_then(|l| l.get_mut(e as usize)).ok_or_else(|| {
                        RouterError::Mismatch {
                            addr: link.addr.clone(),
                            message: format!("it reports expert {e} of layer {layer}, which the model lacks"),
                        }
                    })?;
                    slot.push(index);
                }
            }
        }
        Ok(Topology { epoch: 0, links, placement })
    }

    /// `Err` naming the first (layer, expert) that no node hosts.
    pub fn check_complete(&self, what: impl Fn() -> String) -> Result<(), RouterError> {
        for (l, row) in self.placement.iter().enumerate() {
            if let Some(e) = row.iter().position(Vec::is_empty) {
                return Err(RouterError::Placement(format!("expert {e} of layer {l} is hosted by none of {}", what())));
            }
        }
        Ok(())
    }

    /// `Err` naming the first (layer, expert) whose every replica is down: what `/readyz` reports.
    pub fn coverage(&self) -> Result<(), String> {
        if self.links.is_empty() {
            return Err("no placement yet: waiting for the controller and the expert nodes".into());
        }
        for (l, row) in self.placement.iter().enumerate() {
            for (e, replicas) in row.iter().enumerate() {
                if replicas.iter().all(|&r| self.links[r].is_down()) {
                    let why: Vec<_> = replicas.iter().filter_map(|&r| self.links[r].down_reason()).collect();
                    let why = if why.is_empty() { "no node hosts it".to_owned() } else { why.join("; ") };
                    return Err(format!("expert {e} of layer {l} has no live replica: {why}"));
                }
            }
        }
        Ok(())
    }
}
