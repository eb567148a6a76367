//! The placement controller: one elected member (any router can be) that writes placement epochs.
//!
//! Each epoch is written in a transaction comparing the previous one, so a controller that lost its leadership
//! without knowing it (leases can outlive their TTL around a leader change) cannot overwrite its successor's work;
//! and because expert nodes refuse work for an epoch they do not serve, two placements never mix in one dispatch.
//!
//! What makes a new epoch, in order:
//! 1. no placement yet: place every expert, spread over the expert nodes, with the spare memory holding replicas
//!    (after membership settled);
//! 2. an operator's request: `rebalance` (by measured load) or `apply` (a given placement, validated);
//! 3. nodes joined: each new node fills its memory with replicas of the experts with the fewest replicas (the most
//!    load per replica once load is known); nothing already placed moves;
//! 4. nodes left (dead, or draining): their experts without another replica go to the nodes with most room.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::balance::{balance, Assignment, NodeCapacity};
use crate::cluster::{ClusterView, Member, ModelShape, Outcome, PlacedNode, Placement, RequestKind};
use crate::session::Session;
use crate::store::Result;

/// A decision: the next placement, and the request it answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Write(Placement),
    /// A request that cannot be carried out, with the reason.
    Refuse {
        request: u64,
        reason: String,
    },
    /// A placement is needed but none fits (too little memory, no nodes): why, for the log.
    Stuck(String),
}

/// The expert nodes that may host experts: registered, serving `shape`'s model, not draining, with room.
pub fn eligible<'a>(view: &'a ClusterView, shape: &ModelShape) -> Vec<&'a Member> {
    view.expert_nodes()
        .filter(|m| {
            m.fingerprint == shape.fingerprint && !view.drains.contains(&m.id) && shape.slots(m.memory_bytes) > 0
        })
        .collect()
}

fn capacities(nodes: &[&Member], shape: &ModelShape) -> Vec<NodeCapacity> {
    nodes.iter().map(|m| NodeCapacity { id: m.id.clone(), slots: shape.slots(m.memory_bytes) }).collect()
}

fn placed(nodes: &[&Member]) -> Vec<PlacedNode> {
    nodes.iter().map(|m| PlacedNode { id: m.id.clone(), addr: m.addr.clone() }).collect()
}

/// A placement of `shape` over `nodes` balanced for `load` (`None`: one replica each, evenly spread).
pub fn plan_balanced(
    shape: &ModelShape,
    nodes: &[&Member],
    load: Option<&[Vec<f64>]>,
    epoch: u64,
    reason: &str,
) -> std::result::Result<Placement, String> {
    let zero = vec![vec![0.0; shape.num_experts as usize]; shape.moe_layers.len()];
    let load = load.filter(|l| l.iter().flatten().any(|&v| v > 0.0)).unwrap_or(&zero);
    let a = balance(load, shape.num_experts as usize, &capacities(nodes, shape)).map_err(|e| e.to_string())?;
    Ok(Placement::from_assignment(epoch, placed(nodes), shape, a, reason))
}

/// `prev` over `nodes`, with the room of the nodes in `fill` (those that joined) filled, per layer, with experts
/// they do not host that have the fewest replicas, the most load per replica first (`load[layer][expert]`). What
/// `prev` placed stays where it is, so a join moves nothing and only adds replicas.
pub fn plan_join(
    shape: &ModelShape,
    prev: &Placement,
    nodes: &[&Member],
    fill: &BTreeSet<&str>,
    load: &[Vec<f64>],
    reason: &str,
) -> std::result::Result<Placement, String> {
    let caps = capacities(nodes, shape);
    let layers = shape.moe_layers.len();
    let experts = shape.num_experts;
    let mut rows: Vec<Vec<Vec<u32>>> = (0..layers)
        .map(|l| {
            nodes
                .iter()
                .map(|m| prev.node_index(&m.id).and_then(|i| prev.hosted.get(l)?.get(i).cloned()).unwrap_or_default())
                .collect()
        })
        .collect();
    for (n, m) in nodes.iter().enumerate() {
        if !fill.contains(m.id.as_str()) {
            continue;
        }
        let slots = caps[n].slots;
        for (l, row) in rows.iter_mut().enumerate() {
            let quota = (slots / layers + usize::from(l < slots % layers.max(1))).min(experts as usize);
            let replicas = |e: u32| row.iter().filter(|h| h.binary_search(&e).is_ok()).count();
            let weight = |e: u32| {
                let w = load.get(l).and_then(|r| r.get(e as usize)).copied().unwrap_or(0.0).max(0.0);
                w / replicas(e).max(1) as f64
            };
            let mut order: Vec<u32> = (0..experts).collect();
            order.sort_by(|&a, &b| replicas(a).cmp(&replicas(b)).then(weight(b).total_cmp(&weight(a))).then(a.cmp(&b)));
            let room = quota.saturating_sub(row[n].len());
            let mut taken: Vec<u32> =
                order.into_iter().filter(|e| row[n].binary_search(e).is_err()).take(room).collect();
            taken.extend(&row[n]);
            taken.sort_unstable();
            row[n] = taken;
        }
    }
    Ok(Placement::from_assignment(prev.epoch + 1, placed(nodes), shape, Assignment { layers: rows }, reason))
}

/// `prev` without the nodes not in `nodes`; experts left with no replica go, per layer, to the node with the most
/// free room that has the fewest experts of that layer. Nothing else moves.
pub fn plan_repair(
    shape: &ModelShape,
    prev: &Placement,
    nodes: &[&Member],
    reason: &str,
) -> std::result::Result<Placement, String> {
    let caps = capacities(nodes, shape);
    let mut layers = Vec::with_capacity(prev.hosted.len());
    let mut used = vec![0usize; nodes.len()];
    for hosted in &prev.hosted {
        let row: Vec<Vec<u32>> = nodes
            .iter()
            .map(|m| prev.node_index(&m.id).and_then(|i| hosted.get(i).cloned()).unwrap_or_default())
            .collect();
        for (n, experts) in row.iter().enumerate() {
            used[n] += experts.len();
        }
        layers.push(row);
    }
    for l in 0..layers.len() {
        for e in 0..shape.num_experts {
            if layers[l].iter().any(|experts| experts.binary_search(&e).is_ok()) {
                continue;
            }
            let row = &layers[l];
            let target = (0..nodes.len())
                .filter(|&n| used[n] < caps[n].slots)
                .min_by_key(|&n| (row[n].len(), std::cmp::Reverse(caps[n].slots - used[n]), n));
            let target = match target {
                Some(n) => n,
                // Full of replicas: a spare replica makes room (one of this layer first).
                None => {
                    let n = evict_spare_replica(&mut layers, l).ok_or_else(|| {
                        format!("no room for expert {e} of layer {}: the remaining nodes are full", shape.moe_layers[l])
                    })?;
                    used[n] -= 1;
                    n
                }
            };
            let row = &mut layers[l][target];
            if let Err(at) = row.binary_search(&e) {
                row.insert(at, e);
                used[target] += 1;
            }
        }
    }
    Ok(Placement::from_assignment(prev.epoch + 1, placed(nodes), shape, Assignment { layers }, reason))
}

/// Removes one replica of an expert that has another, preferring layer `l` and the node with the most experts of
/// it; returns the node whose slot it freed.
fn evict_spare_replica(layers: &mut [Vec<Vec<u32>>], l: usize) -> Option<usize> {
    let order = std::iter::once(l).chain((0..layers.len()).filter(move |&k| k != l));
    for k in order {
        let row = &layers[k];
        let mut nodes: Vec<usize> = (0..row.len()).collect();
        nodes.sort_by_key(|&n| std::cmp::Reverse(row[n].len()));
        for n in nodes {
            let spare = row[n].iter().rposition(|e| row.iter().filter(|h| h.binary_search(e).is_ok()).count() > 1);
            if let Some(i) = spare {
                layers[k][n].remove(i);
                return Some(n);
            }
        }
    }
    None
}

/// What the controller should do about `view` now. `settled`: membership has not changed for the settle time.
pub fn decide(view: &ClusterView, shape: &ModelShape, settled: bool) -> Option<Decision> {
    let nodes = eligible(view, shape);
    let load = view.total_load(shape);
    if settled && nodes.is_empty() && view.expert_nodes().next().is_some() {
        let ids: Vec<&str> = view.expert_nodes().map(|m| m.id.as_str()).collect();
        return Some(Decision::Stuck(format!(
            "no expert node can host experts (registered: {}; each is draining, serves another model or offers no \
             memory)",
            ids.join(", ")
        )));
    }
    let Some(prev) = &view.placement else {
        if !settled || nodes.is_empty() {
            return None;
        }
        return Some(match plan_balanced(shape, &nodes, None, 1, "initial placement") {
            Ok(p) => Decision::Write(p),
            Err(e) => Decision::Stuck(format!("cannot place the model yet: {e}")),
        });
    };
    let next = prev.epoch + 1;
    if let Some(req) = &view.request {
        let done = |r: std::result::Result<Placement, String>| match r {
            Ok(mut p) => {
                p.request = Some(req.id);
                Decision::Write(p)
            }
            Err(reason) => Decision::Refuse { request: req.id, reason },
        };
        return Some(match &req.kind {
            RequestKind::Rebalance => done(plan_balanced(shape, &nodes, Some(&load), next, "rebalance")),
            RequestKind::Apply { placement } => {
                let mut p = placement.clone();
                let known: BTreeSet<&str> = nodes.iter().map(|m| m.id.as_str()).collect();
                let check = p.validate(shape).and_then(|()| {
                    if let Some(n) = p.nodes.iter().find(|n| !known.contains(n.id.as_str())) {
                        return Err(format!("node {} is not a live, non-draining expert node", n.id));
                    }
                    for (n, count) in p.counts().into_iter().enumerate() {
                        let id = &p.nodes[n].id;
                        let slots = nodes.iter().find(|m| m.id == *id).map_or(0, |m| shape.slots(m.memory_bytes));
                        if count > slots {
                            return Err(format!("node {id} would hold {count} experts; it has room for {slots}"));
                        }
                    }
                    Ok(())
                });
                done(check.map(|()| {
                    p.epoch = next;
                    p.reason = "applied by an operator".into();
                    p.created_unix_ms = crate::cluster::unix_ms();
                    for n in &mut p.nodes {
                        if let Some(m) = nodes.iter().find(|m| m.id == n.id) {
                            n.addr = m.addr.clone();
                        }
                    }
                    p
                }))
            }
        });
    }
    if !settled {
        return None;
    }
    let in_prev: BTreeSet<&str> = prev.nodes.iter().map(|n| n.id.as_str()).collect();
    let now: BTreeSet<&str> = nodes.iter().map(|m| m.id.as_str()).collect();
    let joined: Vec<&str> = now.difference(&in_prev).copied().collect();
    let left: Vec<&str> = in_prev.difference(&now).copied().collect();
    // A node that came back at a new address is re-placed as if it had joined.
    let moved = prev.nodes.iter().any(|n| nodes.iter().any(|m| m.id == n.id && m.addr != n.addr));
    if nodes.is_empty() {
        return None;
    }
    let result = if moved {
        plan_balanced(shape, &nodes, Some(&load), next, "a node moved to a new address")
    } else if !joined.is_empty() {
        // Experts of nodes that left at the same time are re-placed first (the new nodes, empty, take them); then
        // the new nodes' remaining room holds replicas.
        let base = if left.is_empty() { Ok(prev.clone()) } else { plan_repair(shape, prev, &nodes, "") };
        let fill: BTreeSet<&str> = joined.iter().copied().collect();
        let reason = if left.is_empty() {
            format!("joined: {}", joined.join(", "))
        } else {
            format!("joined: {}; left: {}", joined.join(", "), left.join(", "))
        };
        base.and_then(|base| {
            plan_join(shape, &base, &nodes, &fill, &load, &reason).map(|mut p| {
                p.epoch = next;
                p
            })
        })
    } else if !left.is_empty() {
        plan_repair(shape, prev, &nodes, &format!("left: {}", left.join(", ")))
    } else {
        return None;
    };
    Some(match result {
        Ok(p) => Decision::Write(p),
        Err(e) => Decision::Stuck(format!("cannot re-place the experts: {e}")),
    })
}

/// Tunables of [`run`].
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// How long membership must stay unchanged before nodes joining or leaving re-place experts.
    pub settle: Duration,
    /// How often the state is read again without a change notification.
    pub tick: Duration,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions { settle: Duration::from_secs(1), tick: Duration::from_millis(500) }
    }
}

/// Campaigns for leadership with `session`'s lease and, while leading, writes placement epochs for `shape`. Runs
/// until the task is dropped; store errors are logged and retried.
pub async fn run(session: &Session, id: &str, shape: ModelShape, options: ControllerOptions) {
    let cluster = session.cluster().clone();
    let mut changes = match cluster.changes().await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("controller: watching the cluster: {e}; polling");
            None
        }
    };
    let mut state = State { leading: false, membership: Vec::new(), changed_at: Instant::now(), stuck: None };
    loop {
        if let Err(e) = step(session, id, &shape, &options, &mut state).await {
            tracing::warn!("controller: {e}");
        }
        let tick = tokio::time::sleep(options.tick);
        match changes.as_mut() {
            Some(c) => {
                tokio::select! {
                    r = c.changed() => if r.is_err() { changes = None },
                    _ = tick => {}
                }
            }
            None => tick.await,
        }
    }
}

/// What the controller remembers between steps.
struct State {
    leading: bool,
    /// The eligible nodes (id, address) and when that last changed.
    membership: Vec<(String, String)>,
    changed_at: Instant,
    /// The last reason no placement could be made, logged once.
    stuck: Option<String>,
}

async fn step(
    session: &Session,
    id: &str,
    shape: &ModelShape,
    options: &ControllerOptions,
    state: &mut State,
) -> Result<()> {
    let cluster = session.cluster();
    let is_leader = cluster.campaign(id, session.lease()).await?;
    if is_leader != state.leading {
        state.leading = is_leader;
        if is_leader {
            tracing::info!(%id, "controller: elected; this member now writes placement epochs");
        } else {
            tracing::info!(%id, "controller: no longer leading");
        }
    }
    if !is_leader {
        return Ok(());
    }
    let view = cluster.snapshot().await?;
    if view.model.as_ref() != Some(shape) {
        if let Some(other) = &view.model {
            if other.fingerprint != shape.fingerprint {
                tracing::warn!(
                    "controller: the cluster served model {:016x}; now {:016x}",
                    other.fingerprint,
                    shape.fingerprint
                );
            }
        }
        cluster.put_model(shape).await?;
    }
    let now: Vec<(String, String)> = eligible(&view, shape).iter().map(|m| (m.id.clone(), m.addr.clone())).collect();
    if now != state.membership {
        state.membership = now;
        state.changed_at = Instant::now();
    }
    let settled = state.changed_at.elapsed() >= options.settle;
    let decision = decide(&view, shape, settled);
    if !matches!(decision, Some(Decision::Stuck(_))) {
        state.stuck = None;
    }
    match decision {
        None => {}
        Some(Decision::Stuck(why)) if state.stuck.as_ref() != Some(&why) => {
            tracing::warn!("controller: {why}");
            state.stuck = Some(why);
        }
        Some(Decision::Stuck(_)) => {}
        Some(Decision::Write(p)) => {
            let request = p.request;
            if cluster.write_placement(view.placement_raw.as_deref(), &p).await? {
                tracing::info!(epoch = p.epoch, nodes = p.nodes.len(), reason = %p.reason, "controller: placement written");
                if let Some(request) = request {
                    answer(cluster, request, Ok(p.epoch)).await?;
                }
            } else {
                tracing::info!("controller: the placement changed under us; reading it again");
            }
        }
        Some(Decision::Refuse { request, reason }) => {
            tracing::warn!("controller: request refused: {reason}");
            answer(cluster, request, Err(reason)).await?;
        }
    }
    Ok(())
}

async fn answer(cluster: &crate::Cluster, request: u64, result: std::result::Result<u64, String>) -> Result<()> {
    if let Some(raw) = cluster.raw_request().await? {
        cluster.answer(&raw, &Outcome { request, result }).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{ControlRequest, Role};

    fn shape() -> ModelShape {
        ModelShape { name: "t".into(), fingerprint: 1, moe_layers: vec![0, 2], num_experts: 6, expert_bytes: 10 }
    }

    fn node(id: &str, slots: u64) -> Member {
        Member {
            id: id.into(),
            role: Role::Expert,
            addr: format!("{id}:1"),
            devices: vec![],
            memory_bytes: slots * 10,
            fingerprint: 1,
            version: String::new(),
            started_unix_ms: 0,
        }
    }

    fn view(nodes: &[Member], placement: Option<Placement>) -> ClusterView {
        ClusterView {
            members: nodes.iter().map(|m| (m.id.clone(), m.clone())).collect(),
            placement,
            ..ClusterView::default()
        }
    }

    fn written(d: Option<Decision>) -> Placement {
        match d {
            Some(Decision::Write(p)) => p,
            other => panic!("expected a placement, got {other:?}"),
        }
    }

    #[test]
    fn nothing_is_placed_before_membership_settles_or_without_room() {
        let nodes = [node("a", 12), node("b", 12)];
        assert_eq!(decide(&view(&nodes, None), &shape(), false), None);
        let p = written(decide(&view(&nodes, None), &shape(), true));
        assert_eq!(p.epoch, 1);
        p.validate(&shape()).expect("complete");
        // Room for the whole model on each: the spare memory holds a replica of every expert.
        assert_eq!(p.counts(), vec![12, 12]);
        let exact = [node("a", 6), node("b", 6)];
        assert_eq!(written(decide(&view(&exact, None), &shape(), true)).counts(), vec![6, 6]);
        let small = [node("a", 5), node("b", 5)];
        assert!(matches!(decide(&view(&small, None), &shape(), true), Some(Decision::Stuck(_))));
        // Nodes of another model are not used.
        let other = Member { fingerprint: 2, ..node("c", 100) };
        assert!(matches!(decide(&view(&[other], None), &shape(), true), Some(Decision::Stuck(_))));
    }

    #[test]
    fn a_lost_node_moves_only_its_experts_and_respects_memory() {
        // No spare memory at first, so that the lost node's experts have no other replica.
        let nodes = [node("a", 4), node("b", 4), node("c", 4)];
        let p1 = written(decide(&view(&nodes, None), &shape(), true));
        assert_eq!(p1.counts(), vec![4, 4, 4]);
        let survivors = [node("a", 8), node("b", 8)];
        let p2 = written(decide(&view(&survivors, Some(p1.clone())), &shape(), true));
        assert_eq!(p2.epoch, 2);
        p2.validate(&shape()).expect("complete");
        assert!(p2.node_index("c").is_none());
        for id in ["a", "b"] {
            let (before, after) = (p1.experts_of(id), p2.experts_of(id));
            for (l, experts) in &before {
                let kept = after.iter().find(|(m, _)| m == l).map(|(_, e)| e.clone()).unwrap_or_default();
                assert!(experts.iter().all(|e| kept.contains(e)), "{id} lost experts of layer {l}");
            }
        }
        assert!(p2.counts().iter().all(|&c| c <= 8), "{:?}", p2.counts());
        // With no room left for the lost experts, nothing is written.
        let tight = [node("a", 4), node("b", 4)];
        assert!(matches!(decide(&view(&tight, Some(p1)), &shape(), true), Some(Decision::Stuck(_))));
    }

    #[test]
    fn drained_nodes_are_emptied_and_joined_nodes_get_a_share() {
        let nodes = [node("a", 6), node("b", 6)];
        let p1 = written(decide(&view(&nodes, None), &shape(), true));
        let mut v = view(&[node("a", 6), node("b", 6), node("c", 8)], Some(p1.clone()));
        let p2 = written(decide(&v, &shape(), true));
        assert_eq!(p2.counts(), vec![6, 6, 8], "the new node fills its memory with replicas");
        for id in ["a", "b"] {
            assert_eq!(p1.experts_of(id), p2.experts_of(id), "a join moved {id}'s experts");
        }
        // Each layer: 4 of the 6 experts gain a second replica on c.
        for (l, row) in p2.hosted.iter().enumerate() {
            let c = &row[p2.node_index("c").expect("c placed")];
            assert_eq!(c.len(), 4, "layer {l}: {c:?}");
        }
        v.placement = Some(p2);
        v.drains.insert("a".into());
        let p3 = written(decide(&v, &shape(), true));
        assert!(p3.node_index("a").is_none());
        p3.validate(&shape()).expect("complete");
    }

    #[test]
    fn apply_requests_are_validated() {
        let nodes = [node("a", 12), node("b", 6)];
        let p1 = written(decide(&view(&nodes, None), &shape(), true));
        let mut v = view(&nodes, Some(p1.clone()));
        let ask =
            |placement: Placement| ControlRequest { id: 7, by: "t".into(), kind: RequestKind::Apply { placement } };
        // Everything on b: more than its memory.
        let mut on_b = p1.clone();
        on_b.nodes.retain(|n| n.id == "b");
        on_b.hosted = on_b.hosted.iter().map(|_| vec![(0..6).collect()]).collect();
        v.request = Some(ask(on_b));
        assert!(
            matches!(decide(&v, &shape(), true), Some(Decision::Refuse { request: 7, reason }) if reason.contains("room"))
        );
        // Everything on a: fits, and is written as the next epoch.
        let mut on_a = p1.clone();
        on_a.nodes.retain(|n| n.id == "a");
        on_a.hosted = on_a.hosted.iter().map(|_| vec![(0..6).collect()]).collect();
        v.request = Some(ask(on_a));
        let p2 = written(decide(&v, &shape(), false));
        assert_eq!((p2.epoch, p2.request, p2.counts()), (2, Some(7), vec![12]));
        // An unknown node is refused.
        let mut ghost = p1;
        ghost.nodes[0].id = "ghost".into();
        v.request = Some(ask(ghost));
        assert!(matches!(decide(&v, &shape(), true), Some(Decision::Refuse { .. })));
    }
}
