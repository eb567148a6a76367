//! The cluster's state in the store, typed: members, the placement epoch, readiness, load, drains, the controller's
//! leadership and operators' requests. Values are JSON, so `etcdctl get --prefix /moe-mesh/NAME/` is readable.
//!
//! Keys under `/moe-mesh/<cluster>/`:
//! - `members/<id>`: a [`Member`] (expert node or router), under the member's lease.
//! - `model`: the [`ModelShape`] the cluster serves, written by the controller.
//! - `placement`: the current [`Placement`]; only the controller writes it, comparing the previous value.
//! - `ready/<node>`: the newest epoch whose experts the node has loaded, under its lease.
//! - `using/<router>`: the epoch the router dispatches with, under its lease.
//! - `load/<router>`: a [`LoadReport`] of the tokens the router routed per expert, under its lease.
//! - `served/<node>`: a [`LoadReport`] of what the node computed, under its lease.
//! - `drain/<node>`: present while the node is to be emptied.
//! - `controller`: the id of the elected controller, under its lease.
//! - `request`, `outcome`: an operator's [`ControlRequest`] and the controller's [`Outcome`] for it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::balance::Assignment;
use crate::store::{Expect, LeaseId, PlacementStore, Result, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Expert,
    Router,
}

/// A registered process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub role: Role,
    /// Where it serves: the gRPC address of an expert node, the HTTP address of a router.
    pub addr: String,
    pub devices: Vec<String>,
    /// Memory it offers for experts (expert nodes), in bytes.
    pub memory_bytes: u64,
    /// Fingerprint of the model it loaded; the controller places experts only on nodes of the cluster's model.
    pub fingerprint: u64,
    pub version: String,
    pub started_unix_ms: u64,
}

/// What the controller needs to know of the model to place its experts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelShape {
    pub name: String,
    pub fingerprint: u64,
    /// Model layer index of each MoE layer.
    pub moe_layers: Vec<u32>,
    pub num_experts: u32,
    /// Memory one routed expert (one layer's) takes on a node.
    pub expert_bytes: u64,
}

impl ModelShape {
    /// How many experts fit in `memory_bytes`.
    pub fn slots(&self, memory_bytes: u64) -> usize {
        (memory_bytes / self.expert_bytes.max(1)) as usize
    }

    pub fn total_experts(&self) -> usize {
        self.moe_layers.len() * self.num_experts as usize
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedNode {
    pub id: String,
    pub addr: String,
}

/// One placement epoch: which node hosts which (layer, expert), replicas included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub epoch: u64,
    pub nodes: Vec<PlacedNode>,
    /// Model layer index of each row of `hosted`.
    pub moe_layers: Vec<u32>,
    /// `hosted[l][n]`: the experts of `moe_layers[l]` on `nodes[n]`, sorted.
    pub hosted: Vec<Vec<Vec<u32>>>,
    /// Why this epoch was made (initial, node lost, node joined, rebalance, apply).
    pub reason: String,
    pub created_unix_ms: u64,
    /// The operator request this epoch answers, if any.
    #[serde(default)]
    pub request: Option<u64>,
}

impl Placement {
    /// Checks that the record is one a router can dispatch with: a row per MoE layer, a column per node, unique
    /// node ids, sorted experts without repeats, and (given the model's shape) only experts and layers it has.
    pub fn check_record(&self, shape: Option<&ModelShape>) -> std::result::Result<(), String> {
        if self.hosted.len() != self.moe_layers.len() {
            return Err(format!("{} rows of experts for {} MoE layers", self.hosted.len(), self.moe_layers.len()));
        }
        let mut ids: Vec<&str> = self.nodes.iter().map(|n| n.id.as_str()).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("node {} is listed twice", w[0]));
        }
        if let Some(shape) = shape {
            if self.moe_layers != shape.moe_layers {
                return Err(format!("MoE layers {:?}, the model has {:?}", self.moe_layers, shape.moe_layers));
            }
        }
        for (row, layer) in self.hosted.iter().zip(&self.moe_layers) {
            if row.len() != self.nodes.len() {
                return Err(format!("layer {layer}: {} columns for {} nodes", row.len(), self.nodes.len()));
            }
            for (experts, node) in row.iter().zip(&self.nodes) {
                if experts.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(format!("layer {layer}, node {}: experts not sorted and unique", node.id));
                }
                if let (Some(shape), Some(&last)) = (shape, experts.last()) {
                    if last >= shape.num_experts {
                        return Err(format!("layer {layer}, node {}: expert {last} of {}", node.id, shape.num_experts));
                    }
                }
            }
        }
        Ok(())
    }

    pub fn from_assignment(
        epoch: u64,
        nodes: Vec<PlacedNode>,
        shape: &ModelShape,
        a: Assignment,
        reason: impl Into<String>,
    ) -> Self {
        Placement {
            epoch,
            nodes,
            moe_layers: shape.moe_layers.clone(),
            hosted: a.layers,
            reason: reason.into(),
            created_unix_ms: unix_ms(),
            request: None,
        }
    }

    pub fn assignment(&self) -> Assignment {
        Assignment { layers: self.hosted.clone() }
    }

    pub fn node_index(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// The (model layer, experts) a node hosts; empty if it is not in this epoch.
    pub fn experts_of(&self, id: &str) -> Vec<(usize, Vec<u32>)> {
        let Some(n) = self.node_index(id) else { return Vec::new() };
        self.moe_layers
            .iter()
            .zip(&self.hosted)
            .filter(|(_, nodes)| nodes.get(n).is_some_and(|e| !e.is_empty()))
            .map(|(&l, nodes)| (l as usize, nodes[n].clone()))
            .collect()
    }

    /// How many experts each node hosts.
    pub fn counts(&self) -> Vec<usize> {
        (0..self.nodes.len()).map(|n| self.hosted.iter().map(|l| l.get(n).map_or(0, Vec::len)).sum()).collect()
    }

    /// Checks the structure and that every expert of `shape` has a replica (what an applied placement must do;
    /// [`Placement::check_record`] is what every read checks).
    pub fn validate(&self, shape: &ModelShape) -> std::result::Result<(), String> {
        if self.moe_layers != shape.moe_layers || self.hosted.len() != self.moe_layers.len() {
            return Err("its layers are not the model's MoE layers".into());
        }
        for (l, nodes) in self.hosted.iter().enumerate() {
            if nodes.len() != self.nodes.len() {
                return Err(format!(
                    "layer {} lists {} nodes, not {}",
                    self.moe_layers[l],
                    nodes.len(),
                    self.nodes.len()
                ));
            }
            let mut seen = vec![false; shape.num_experts as usize];
            for experts in nodes {
                for &e in experts {
                    *seen.get_mut(e as usize).ok_or_else(|| format!("expert {e} does not exist"))? = true;
                }
            }
            if let Some(e) = seen.iter().position(|s| !s) {
                return Err(format!("expert {e} of layer {} has no replica", self.moe_layers[l]));
            }
        }
        Ok(())
    }
}

/// Token counts a member saw over a window: `counts[l][e]` (tokens routed to expert `e` of MoE layer `l`, as in
/// [`ModelShape::moe_layers`]), and its running total since it started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub window_secs: f64,
    pub unix_ms: u64,
    pub counts: Vec<Vec<u64>>,
    /// (token, expert) pairs since the member started.
    #[serde(default)]
    pub total: u64,
    /// The same per MoE layer.
    #[serde(default)]
    pub layer_totals: Vec<u64>,
}

/// Builds [`LoadReport`]s over the last few periods, so that a quiet moment does not erase what was measured.
#[derive(Debug)]
pub struct LoadWindow {
    periods: std::collections::VecDeque<(Vec<Vec<u64>>, f64)>,
    kept: usize,
    layer_totals: Vec<u64>,
}

impl LoadWindow {
    /// A window of the last `kept` periods.
    pub fn new(kept: usize) -> Self {
        LoadWindow { periods: std::collections::VecDeque::new(), kept: kept.max(1), layer_totals: Vec::new() }
    }

    /// Adds one period's counts (`secs` long) and returns the report over the window.
    pub fn push(&mut self, counts: Vec<Vec<u64>>, secs: f64) -> LoadReport {
        if self.layer_totals.len() < counts.len() {
            self.layer_totals.resize(counts.len(), 0);
        }
        for (t, c) in self.layer_totals.iter_mut().zip(&counts) {
            *t += c.iter().sum::<u64>();
        }
        self.periods.push_back((counts, secs));
        if self.periods.len() > self.kept {
            self.periods.pop_front();
        }
        let mut sum: Vec<Vec<u64>> = Vec::new();
        for (counts, _) in &self.periods {
            if sum.len() < counts.len() {
                sum.resize(counts.len(), Vec::new());
            }
            for (s, c) in sum.iter_mut().zip(counts) {
                if s.len() < c.len() {
                    s.resize(c.len(), 0);
                }
                for (s, &c) in s.iter_mut().zip(c) {
                    *s += c;
                }
            }
        }
        LoadReport {
            window_secs: self.periods.iter().map(|(_, secs)| secs).sum(),
            unix_ms: unix_ms(),
            counts: sum,
            total: self.layer_totals.iter().sum(),
            layer_totals: self.layer_totals.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RequestKind {
    /// Re-place the experts by the measured load.
    Rebalance,
    /// Use this placement (its epoch is set by the controller).
    Apply { placement: Placement },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlRequest {
    pub id: u64,
    pub by: String,
    #[serde(flatten)]
    pub kind: RequestKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub request: u64,
    /// The epoch written for it, or why none was.
    pub result: std::result::Result<u64, String>,
}

/// Everything under the cluster's prefix, read at once.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub members: BTreeMap<String, Member>,
    pub model: Option<ModelShape>,
    pub placement: Option<Placement>,
    /// The stored bytes of `placement`, which the next write compares.
    pub placement_raw: Option<Vec<u8>>,
    pub ready: BTreeMap<String, u64>,
    pub using: BTreeMap<String, u64>,
    pub loads: BTreeMap<String, LoadReport>,
    /// What each expert node computed (its own count of the same tokens routers report in `loads`).
    pub served: BTreeMap<String, LoadReport>,
    pub drains: BTreeSet<String>,
    pub leader: Option<String>,
    pub request: Option<ControlRequest>,
    pub outcome: Option<Outcome>,
    /// Values that did not parse (skipped).
    pub problems: Vec<String>,
}

impl ClusterView {
    pub fn expert_nodes(&self) -> impl Iterator<Item = &Member> {
        self.members.values().filter(|m| m.role == Role::Expert)
    }

    /// True when every node of `p` has loaded its epoch: routers may switch to it.
    pub fn is_ready(&self, p: &Placement) -> bool {
        p.nodes.iter().all(|n| self.ready.get(&n.id).is_some_and(|&e| e >= p.epoch))
    }

    /// The oldest epoch a live router still dispatches with (the newest epoch when no router reports one). Nodes
    /// keep what that epoch assigns them until every router is past it.
    pub fn oldest_in_use(&self) -> Option<u64> {
        self.using.values().copied().min().or(self.placement.as_ref().map(|p| p.epoch))
    }

    /// Summed load reports of every member, per MoE layer and expert (empty when none matches `shape`).
    pub fn total_load(&self, shape: &ModelShape) -> Vec<Vec<f64>> {
        let mut total = vec![vec![0.0; shape.num_experts as usize]; shape.moe_layers.len()];
        for r in self.loads.values() {
            if r.counts.len() != total.len() || r.counts.iter().any(|c| c.len() != shape.num_experts as usize) {
                continue;
            }
            let rate = 1.0 / r.window_secs.max(1e-3);
            for (t, c) in total.iter_mut().zip(&r.counts) {
                for (t, &c) in t.iter_mut().zip(c) {
                    *t += c as f64 * rate;
                }
            }
        }
        total
    }
}

/// A member id unique per machine and port by default: `ROLE-HOSTNAME-PORT` (`ROLE-PORT` where the host name is
/// unknown). Machines that serve on the same port no longer share an id.
pub fn default_member_id(role: &str, port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| {
            h.trim()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' })
                .collect::<String>()
        })
        .filter(|h| !h.is_empty());
    match host {
        Some(h) => format!("{role}-{h}-{port}"),
        None => format!("{role}-{port}"),
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A named cluster in a store.
#[derive(Clone)]
pub struct Cluster {
    store: Arc<dyn PlacementStore>,
    name: String,
    prefix: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cluster({} in {})", self.name, self.store.describe())
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt { key: key.to_owned(), message: e.to_string() })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain data types cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

impl Cluster {
    /// `name`: letters, digits, `.`, `_` and `-`.
    pub fn new(store: Arc<dyn PlacementStore>, name: &str) -> Result<Self> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
            return Err(StoreError::Invalid(format!("cluster name {name:?}: use letters, digits, '.', '_' and '-'")));
        }
        Ok(Cluster { store, name: name.to_owned(), prefix: format!("/moe-mesh/{name}/") })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn store(&self) -> &Arc<dyn PlacementStore> {
        &self.store
    }

    pub fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    pub async fn snapshot(&self) -> Result<ClusterView> {
        let mut view = ClusterView::default();
        for (key, value) in self.store.get_prefix(&self.prefix).await? {
            let rest = &key[self.prefix.len()..];
            let (kind, id) = rest.split_once('/').unwrap_or((rest, ""));
            let parsed: Result<()> = (|| {
                match kind {
                    "members" => {
                        view.members.insert(id.to_owned(), decode(&key, &value)?);
                    }
                    "model" => view.model = Some(decode(&key, &value)?),
                    "placement" => {
                        view.placement = Some(decode(&key, &value)?);
                        view.placement_raw = Some(value.clone());
                    }
                    "ready" => {
                        view.ready.insert(id.to_owned(), decode(&key, &value)?);
                    }
                    "using" => {
                        view.using.insert(id.to_owned(), decode(&key, &value)?);
                    }
                    "load" => {
                        view.loads.insert(id.to_owned(), decode(&key, &value)?);
                    }
                    "served" => {
                        view.served.insert(id.to_owned(), decode(&key, &value)?);
                    }
                    "drain" => {
                        view.drains.insert(id.to_owned());
                    }
                    "controller" => view.leader = Some(String::from_utf8_lossy(&value).into_owned()),
                    "request" => view.request = Some(decode(&key, &value)?),
                    "outcome" => view.outcome = Some(decode(&key, &value)?),
                    _ => {}
                }
                Ok(())
            })();
            if let Err(e) = parsed {
                view.problems.push(e.to_string());
            }
        }
        // A placement that does not check out is not used (members keep the one they have); its bytes stay in
        // `placement_raw`, so the controller's next epoch replaces it.
        if let Some(p) = &view.placement {
            if let Err(e) = p.check_record(view.model.as_ref()) {
                view.problems.push(format!("{}: an invalid placement (epoch {}): {e}", self.key("placement"), p.epoch));
                view.placement = None;
            }
        }
        Ok(view)
    }

    pub async fn changes(&self) -> Result<watch::Receiver<u64>> {
        self.store.watch(&self.prefix).await
    }

    /// Writes `next` if the stored placement is still `prev` (the bytes read with it). `Ok(false)` if another
    /// write came first.
    pub async fn write_placement(&self, prev: Option<&[u8]>, next: &Placement) -> Result<bool> {
        let expected = prev.map_or(Expect::Absent, Expect::Value);
        self.store.compare_and_put(&self.key("placement"), expected, encode(next), None).await
    }

    pub async fn put_model(&self, shape: &ModelShape) -> Result<()> {
        self.store.put(&self.key("model"), encode(shape), None).await
    }

    pub async fn drain(&self, node: &str, lease: Option<LeaseId>) -> Result<()> {
        self.store.put(&self.key(&format!("drain/{node}")), b"{}".to_vec(), lease).await
    }

    pub async fn undrain(&self, node: &str) -> Result<()> {
        self.store.delete(&self.key(&format!("drain/{node}"))).await
    }

    /// Files an operator request (replacing one not yet answered) and returns its id.
    pub async fn request(&self, by: &str, kind: RequestKind) -> Result<u64> {
        let id = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
        let req = ControlRequest { id, by: by.to_owned(), kind };
        self.store.put(&self.key("request"), encode(&req), None).await?;
        Ok(id)
    }

    /// Takes back request `id` if no controller has answered it yet; true if it was still pending.
    pub async fn withdraw(&self, id: u64) -> Result<bool> {
        let Some(raw) = self.raw_request().await? else { return Ok(false) };
        let pending: ControlRequest = decode(&self.key("request"), &raw)?;
        if pending.id != id {
            return Ok(false);
        }
        self.store.compare_and_delete(&self.key("request"), &raw).await
    }

    /// Answers `request` and clears it (unless a newer one replaced it meanwhile).
    pub async fn answer(&self, raw_request: &[u8], outcome: &Outcome) -> Result<()> {
        self.store.put(&self.key("outcome"), encode(outcome), None).await?;
        self.store.compare_and_delete(&self.key("request"), raw_request).await?;
        Ok(())
    }

    /// The stored bytes of the pending request, for [`Cluster::answer`].
    pub async fn raw_request(&self) -> Result<Option<Vec<u8>>> {
        let key = self.key("request");
        Ok(self.store.get_prefix(&key).await?.into_iter().find(|(k, _)| *k == key).map(|(_, v)| v))
    }

    /// Tries to become the controller under `lease`; true if this member now is (or already was).
    pub async fn campaign(&self, id: &str, lease: LeaseId) -> Result<bool> {
        let key = self.key("controller");
        if self.store.compare_and_put(&key, Expect::Absent, id.as_bytes().to_vec(), Some(lease)).await? {
            return Ok(true);
        }
        Ok(self.store.get_prefix(&key).await?.iter().any(|(k, v)| *k == key && v == id.as_bytes()))
    }

    pub async fn resign(&self, id: &str) -> Result<bool> {
        self.store.compare_and_delete(&self.key("controller"), id.as_bytes()).await
    }

    pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
        encode(value)
    }
}

#[cfg(test)]
mod record_tests {
    use super::*;

    fn placement(hosted: Vec<Vec<Vec<u32>>>, ids: &[&str]) -> Placement {
        Placement {
            epoch: 3,
            nodes: ids.iter().map(|id| PlacedNode { id: (*id).into(), addr: format!("{id}:1") }).collect(),
            moe_layers: vec![0, 1],
            hosted,
            reason: "test".into(),
            created_unix_ms: 0,
            request: None,
        }
    }

    fn shape() -> ModelShape {
        ModelShape { name: "m".into(), fingerprint: 1, moe_layers: vec![0, 1], num_experts: 4, expert_bytes: 1 }
    }

    #[test]
    fn records_that_would_break_dispatch_are_refused() {
        let good = placement(vec![vec![vec![0, 1], vec![2, 3]], vec![vec![0, 1, 2, 3], vec![]]], &["a", "b"]);
        assert_eq!(good.check_record(Some(&shape())), Ok(()));
        let short = placement(vec![vec![vec![0, 1], vec![2, 3]]], &["a", "b"]);
        assert!(short.check_record(None).is_err(), "a row missing");
        let narrow = placement(vec![vec![vec![0, 1, 2, 3]], vec![vec![0, 1, 2, 3]]], &["a", "b"]);
        assert!(narrow.check_record(None).is_err(), "a node's column missing");
        let twice = placement(vec![vec![vec![0, 1], vec![2, 3]], vec![vec![0], vec![1, 2, 3]]], &["a", "a"]);
        assert!(twice.check_record(None).is_err(), "a node listed twice");
        let unsorted = placement(vec![vec![vec![1, 0], vec![2, 3]], vec![vec![0], vec![1, 2, 3]]], &["a", "b"]);
        assert!(unsorted.check_record(None).is_err());
        let beyond = placement(vec![vec![vec![0, 1], vec![2, 9]], vec![vec![0], vec![1, 2, 3]]], &["a", "b"]);
        assert!(beyond.check_record(None).is_ok(), "without the shape the range is unknown");
        assert!(beyond.check_record(Some(&shape())).is_err(), "expert 9 of 4");
    }
}
