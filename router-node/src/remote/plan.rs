//! Planning one layer's work over the nodes: a pure function of the routing, the replicas of each expert and what
//! is known of each node, so that every rule of replica choice is tested here without a network.
//!
//! Each (token, expert) pair goes to the replica with the least work: pairs outstanding there plus those this plan
//! has given it so far; ties go to a node the token already visits (fewer messages carry the token), then to the
//! node that has been sent the fewest pairs overall (so that small decode batches do not always favour the same
//! replica). Nodes that are up but suspect, or to be avoided for this piece, are used only for experts that have no
//! other live replica.

use moe_proto::v1;

/// What the planner knows of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NodeView {
    /// The stream is up.
    pub live: bool,
    /// Live, not suspect, and not the node this piece is moving away from.
    pub preferred: bool,
    /// Pairs outstanding there; grows as the plan gives it pairs.
    pub load: usize,
    /// Pairs ever sent there; grows likewise.
    pub sent: u64,
}

/// One node's share: the rows (indices into the planned batch) it gets and their routing, CSR over those rows
/// with each token's pairs in the token's routing order.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Share {
    pub rows: Vec<u32>,
    pub routing: v1::Routing,
}

/// Why a batch cannot be planned now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unplaceable {
    /// No live node hosts `expert`: the work waits for a placement (or a node) that does.
    NoLiveReplica { expert: u32 },
    /// The routing names an expert the placement does not have (a bug on this side).
    NoSuchExpert { expert: u32 },
}

/// Plans `routing` (CSR over the batch's rows) over the nodes of `nodes`, given `replicas[e]` (indices into
/// `nodes` of the nodes hosting expert `e`). Returns one share per node (empty for nodes that get nothing) and
/// leaves the views' `load` and `sent` counting the pairs given.
pub(crate) fn plan(
    routing: &v1::Routing,
    replicas: &[Vec<usize>],
    nodes: &mut [NodeView],
) -> Result<Vec<Share>, Unplaceable> {
    let n = nodes.len();
    let mut shares: Vec<Share> = vec![Share::default(); n];
    let mut chosen: Vec<usize> = Vec::new();
    let mut pairs: Vec<(usize, u32, f32)> = Vec::new();
    let rows = routing.offsets.len().saturating_sub(1);
    for r in 0..rows {
        chosen.clear();
        pairs.clear();
        let (a, b) = (routing.offsets[r] as usize, routing.offsets[r + 1] as usize);
        for (&e, &w) in routing.experts[a..b].iter().zip(&routing.weights[a..b]) {
            let hosts = replicas.get(e as usize).ok_or(Unplaceable::NoSuchExpert { expert: e })?;
            let best = |ok: &dyn Fn(&NodeView) -> bool| {
                hosts
                    .iter()
                    .copied()
                    .filter(|&i| nodes.get(i).is_some_and(ok))
                    .min_by_key(|&i| (nodes[i].load, !chosen.contains(&i), nodes[i].sent))
            };
            let node =
                best(&|v| v.preferred).or_else(|| best(&|v| v.live)).ok_or(Unplaceable::NoLiveReplica { expert: e })?;
            if !chosen.contains(&node) {
                chosen.push(node);
            }
            nodes[node].load += 1;
            nodes[node].sent += 1;
            pairs.push((node, e, w));
        }
        for &node in &chosen {
            let s = &mut shares[node];
            if s.routing.offsets.is_empty() {
                s.routing.offsets.push(0);
            }
            for &(_, e, w) in pairs.iter().filter(|p| p.0 == node) {
                s.routing.experts.push(e);
                s.routing.weights.push(w);
            }
            s.routing.offsets.push(s.routing.experts.len() as u32);
            s.rows.push(r as u32);
        }
    }
    Ok(shares)
}

/// Splits a share into chunks of at most `max_rows` rows: (rows, routing with offsets from 0) per chunk.
pub(crate) fn chunks(share: &Share, max_rows: usize) -> impl Iterator<Item = (&[u32], v1::Routing)> + '_ {
    let max = max_rows.max(1);
    share.rows.chunks(max).enumerate().map(move |(c, rows)| {
        let first = c * max;
        let r = &share.routing;
        let (a, b) = (r.offsets[first] as usize, r.offsets[first + rows.len()] as usize);
        let local = v1::Routing {
            offsets: r.offsets[first..=first + rows.len()].iter().map(|&o| o - a as u32).collect(),
            experts: r.experts[a..b].to_vec(),
            weights: r.weights[a..b].to_vec(),
        };
        (rows, local)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(tokens: &[&[u32]]) -> v1::Routing {
        let mut r = v1::Routing { offsets: vec![0], ..Default::default() };
        for t in tokens {
            for &e in *t {
                r.experts.push(e);
                r.weights.push(e as f32 / 10.0);
            }
            r.offsets.push(r.experts.len() as u32);
        }
        r
    }

    fn up(n: usize) -> Vec<NodeView> {
        vec![NodeView { live: true, preferred: true, load: 0, sent: 0 }; n]
    }

    #[test]
    fn each_token_goes_once_to_each_node_with_its_pairs_in_routing_order() {
        // Experts 0, 1 on node 0; 2, 3 on node 1.
        let replicas = vec![vec![0], vec![0], vec![1], vec![1]];
        let shares = plan(&csr(&[&[3, 0, 2], &[1]]), &replicas, &mut up(2)).expect("plans");
        assert_eq!(shares[0].rows, vec![0, 1]);
        assert_eq!(shares[0].routing.experts, vec![0, 1]);
        assert_eq!(shares[0].routing.offsets, vec![0, 1, 2]);
        assert_eq!(shares[1].rows, vec![0]);
        assert_eq!(shares[1].routing.experts, vec![3, 2]);
        assert_eq!(shares[1].routing.weights, vec![0.3, 0.2]);
        assert_eq!(shares[1].routing.offsets, vec![0, 2]);
    }

    #[test]
    fn replicas_share_the_pairs_by_load() {
        let replicas = vec![vec![0, 1]];
        let mut nodes = up(2);
        nodes[0].load = 5;
        let shares = plan(&csr(&[&[0], &[0], &[0], &[0]]), &replicas, &mut nodes).expect("plans");
        // Node 1 starts 5 behind: it takes all four.
        assert_eq!(shares[1].rows, vec![0, 1, 2, 3]);
        assert!(shares[0].rows.is_empty());
        assert_eq!(nodes[1].load, 4);
        assert_eq!(nodes[1].sent, 4);
    }

    #[test]
    fn ties_go_to_a_node_the_token_visits_then_to_the_least_sent() {
        // Expert 0 only on node 1; expert 1 on both: the token already visits node 1.
        let replicas = vec![vec![1], vec![0, 1]];
        let mut nodes = up(2);
        nodes[1].load = 0;
        nodes[0].load = 1;
        let shares = plan(&csr(&[&[0, 1]]), &replicas, &mut nodes).expect("plans");
        assert_eq!(shares[1].routing.experts, vec![0, 1]);
        let mut nodes = up(2);
        nodes[0].sent = 10;
        let shares = plan(&csr(&[&[1]]), &replicas, &mut nodes).expect("plans");
        assert_eq!(shares[1].rows, vec![0], "the least-sent replica wins a tie");
    }

    #[test]
    fn suspect_or_avoided_nodes_serve_only_what_nobody_else_has() {
        let replicas = vec![vec![0, 1], vec![0]];
        let mut nodes = up(2);
        nodes[0].preferred = false;
        nodes[1].load = 100;
        let shares = plan(&csr(&[&[0, 1]]), &replicas, &mut nodes).expect("plans");
        assert_eq!(shares[1].routing.experts, vec![0], "expert 0 avoids node 0 despite the load");
        assert_eq!(shares[0].routing.experts, vec![1], "expert 1 has no other replica");
    }

    #[test]
    fn an_expert_without_live_replica_is_unplaceable() {
        let replicas = vec![vec![0], vec![1], vec![]];
        let mut nodes = up(2);
        nodes[1].live = false;
        nodes[1].preferred = false;
        assert_eq!(plan(&csr(&[&[0], &[1]]), &replicas, &mut nodes), Err(Unplaceable::NoLiveReplica { expert: 1 }));
        assert_eq!(plan(&csr(&[&[2]]), &replicas, &mut up(2)), Err(Unplaceable::NoLiveReplica { expert: 2 }));
        assert_eq!(plan(&csr(&[&[9]]), &replicas, &mut up(2)), Err(Unplaceable::NoSuchExpert { expert: 9 }));
    }

    #[test]
    fn chunks_rebase_the_offsets() {
        let replicas = vec![vec![0], vec![0]];
        let shares = plan(&csr(&[&[0, 1], &[1], &[0]]), &replicas, &mut up(1)).expect("plans");
        let got: Vec<_> = chunks(&shares[0], 2).map(|(rows, r)| (rows.to_vec(), r.offsets, r.experts)).collect();
        assert_eq!(got, vec![(vec![0, 1], vec![0, 2, 3], vec![0, 1, 1]), (vec![2], vec![0, 1], vec![0])]);
    }
}
