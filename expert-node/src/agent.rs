//! An expert node in a cluster: it follows the placement epochs the controller writes.
//!
//! For each new epoch the node loads what the epoch adds for it and reports the epoch ready; routers switch once
//! every node of the epoch is ready. The node keeps serving the experts of every epoch a live router may still
//! dispatch with, and unloads what left only when all routers are past those epochs (plus a grace period for
//! messages already on the wire). It serves exactly the epochs it has loaded for and refuses the others.
//!
//! Draining (on SIGTERM, or `moectl placement drain`) marks the node; the controller writes an epoch without it; the
//! node exits once every router has switched to such an epoch, so no request loses its experts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_placement::{ClusterView, Session};
use moe_proto::v1::ExpertSet;

use crate::node::ExpertNode;
use crate::service::expert_set;
use crate::NodeError;

/// Tunables of [`follow`].
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// How long experts no longer assigned stay loaded after every router moved past them.
    pub grace: Duration,
    /// How often the cluster is read again without a change notification.
    pub tick: Duration,
    /// The longest a drain waits for the experts to move before the node exits anyway.
    pub drain_timeout: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            grace: Duration::from_secs(2),
            tick: Duration::from_millis(500),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// How following the cluster ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departure {
    /// Every router switched to a placement without this node.
    Drained,
    /// The drain did not complete within its timeout.
    TimedOut,
    /// The node could not load experts it was assigned (a damaged checkpoint), drained itself so that the
    /// controller placed them elsewhere, and left: it must not serve.
    Unfit,
}

/// Why a step of following the placement failed.
#[derive(Debug, thiserror::Error)]
enum StepError {
    /// Loading assigned experts failed for a reason that retrying cannot fix (see [`is_unfit`]).
    #[error("loading the experts assigned: {0}")]
    Load(NodeError),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Whether a load failure means this node's checkpoint cannot serve (bad files), rather than something passing.
fn is_unfit(e: &NodeError) -> bool {
    matches!(e, NodeError::Model(m) if !m.is_retryable())
}

struct Follower {
    node: Arc<ExpertNode>,
    session: Arc<Session>,
    /// The experts each epoch still in use assigns to this node.
    assigned: BTreeMap<u64, Vec<(usize, Vec<u32>)>>,
    ready: u64,
    grace: Duration,
    /// When experts no longer needed may go.
    retire_at: Option<Instant>,
    /// When the last router moved to an epoch without this node (draining).
    gone_since: Option<Instant>,
    /// Set once loading failed for good: nothing more is loaded, and the node drains.
    unfit: bool,
}

/// The longest one call to the placement store may take here; a store that does not answer is treated as down.
const STORE_TIMEOUT: Duration = Duration::from_secs(3);

/// Follows the cluster's placement until the node is drained: by `moectl placement drain`, or after `drain`
/// resolves (SIGTERM). Store errors are logged and retried; the node serves on with what it has meanwhile.
pub async fn follow(
    node: Arc<ExpertNode>,
    session: Arc<Session>,
    options: AgentOptions,
    drain: impl std::future::Future<Output = ()>,
) -> Departure {
    let cluster = session.cluster().clone();
    let id = node.node_id.clone();
    // Without a watch (the store refused it), the tick alone drives the loop.
    let (_idle, idle) = tokio::sync::watch::channel(0u64);
    let mut changes = match tokio::time::timeout(STORE_TIMEOUT, cluster.changes()).await {
        Ok(Ok(rx)) => rx,
        _ => idle.clone(),
    };
    let mut f = Follower {
        node,
        session,
        assigned: BTreeMap::new(),
        ready: 0,
        grace: options.grace,
        retire_at: None,
        gone_since: None,
        unfit: false,
    };
    let mut draining_since: Option<Instant> = None;
    tokio::pin!(drain);
    let mut drain_asked = false;
    let mut drain_marked = false;
    loop {
        // A drain asked while the store was unreachable is marked as soon as it answers again.
        if drain_asked && !drain_marked {
            match tokio::time::timeout(STORE_TIMEOUT, cluster.drain(&id, Some(f.session.lease()))).await {
                Ok(Ok(())) => drain_marked = true,
                Ok(Err(e)) => tracing::warn!("marking this node draining: {e}; retrying"),
                Err(_) => tracing::warn!("marking this node draining: no answer within {STORE_TIMEOUT:?}; retrying"),
            }
        }
        let snapshot = match tokio::time::timeout(STORE_TIMEOUT, cluster.snapshot()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {STORE_TIMEOUT:?}")),
        };
        match snapshot {
            Ok(view) => {
                if draining_since.is_none() && (drain_asked || view.drains.contains(&id)) {
                    tracing::info!("draining: waiting for the controller to move this node's experts");
                    draining_since = Some(Instant::now());
                }
                match f.step(&view).await {
                    Ok(()) => {}
                    Err(StepError::Load(e)) if is_unfit(&e) => {
                        if !f.unfit {
                            tracing::error!(
                                "this node cannot load the experts it is assigned: {e}; draining it so that the \
                                 controller places them elsewhere, then leaving"
                            );
                            f.unfit = true;
                            drain_asked = true;
                            draining_since.get_or_insert_with(Instant::now);
                        }
                    }
                    Err(e) => tracing::warn!("following the placement: {e}"),
                }
                if draining_since.is_some() {
                    // With no router left, nothing can need this node's experts.
                    let drained = !view.members.values().any(|m| m.role == moe_placement::Role::Router)
                        || f.gone_since.is_some_and(|since| since.elapsed() >= options.grace);
                    if drained {
                        return if f.unfit { Departure::Unfit } else { Departure::Drained };
                    }
                }
            }
            Err(e) => tracing::warn!("reading the cluster: {e}; serving on"),
        }
        if draining_since.is_some_and(|d| d.elapsed() >= options.drain_timeout) {
            tracing::warn!("drain: experts still needed after {:?}; leaving anyway", options.drain_timeout);
            return if f.unfit { Departure::Unfit } else { Departure::TimedOut };
        }
        let tick = tokio::time::sleep(options.tick);
        tokio::select! {
            _ = &mut drain, if !drain_asked => {
                drain_asked = true;
                draining_since.get_or_insert_with(Instant::now);
                tracing::info!(timeout = ?options.drain_timeout, "draining: waiting for the controller to move this node's experts");
            }
            r = changes.changed() => if r.is_err() { changes = idle.clone() },
            _ = tick => {}
        }
    }
}

impl Follower {
    async fn step(&mut self, view: &ClusterView) -> Result<(), StepError> {
        let Some(p) = &view.placement else { return Ok(()) };
        let id = self.node.node_id.clone();
        let oldest = view.oldest_in_use().unwrap_or(p.epoch).min(p.epoch);
        self.assigned.insert(p.epoch, p.experts_of(&id));
        self.assigned.retain(|&e, _| e >= oldest);

        // Load what the epochs in use need and this node lacks.
        let hosted = self.node.hosted();
        let mut wanted: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for rows in self.assigned.values() {
            for (l, experts) in rows {
                wanted.entry(*l).or_default().extend(experts);
            }
        }
        for experts in wanted.values_mut() {
            experts.sort_unstable();
            experts.dedup();
        }
        let missing = difference(&wanted, &hosted);
        if !missing.layers.is_empty() && !self.unfit {
            let node = self.node.clone();
            let count: usize = missing.layers.iter().map(|r| r.experts.len()).sum();
            let started = Instant::now();
            let _guard = node.shard_lock.lock().await;
            let loading = node.clone();
            tokio::task::spawn_blocking(move || loading.load_set(&missing))
                .await
                .map_err(anyhow::Error::from)?
                .map_err(StepError::Load)?;
            tracing::info!(epoch = p.epoch, experts = count, elapsed = ?started.elapsed(), "experts loaded");
        }
        // Serve every epoch kept, from the oldest loaded for.
        let lo = self.assigned.keys().next().copied().unwrap_or(p.epoch);
        // Older epochs stay served until their experts are unloaded below.
        let (cur_lo, _) = self.node.epochs();
        self.node.set_epochs(if cur_lo == 0 { lo } else { cur_lo.min(lo) }, p.epoch);
        // A node that failed to load is never ready: routers do not switch to an epoch that counts on it.
        if self.ready < p.epoch && !self.unfit {
            self.session.put(&format!("ready/{id}"), &p.epoch).await.map_err(anyhow::Error::from)?;
            self.ready = p.epoch;
            tracing::info!(epoch = p.epoch, reason = %p.reason, "placement epoch ready");
        }

        // Unload what no epoch in use assigns, once routers have had time to finish with it.
        let extra = difference(&hosted_map(&self.node.hosted()), &expert_set(wanted.clone()));
        if extra.layers.is_empty() {
            self.retire_at = None;
            self.node.set_epochs(lo, p.epoch);
        } else {
            let at = *self.retire_at.get_or_insert_with(|| Instant::now() + self.grace);
            if Instant::now() >= at {
                let count: usize = extra.layers.iter().map(|r| r.experts.len()).sum();
                let _guard = self.node.shard_lock.lock().await;
                self.node.set_epochs(lo, p.epoch);
                self.node.unload_set(&extra);
                self.retire_at = None;
                tracing::info!(epoch = p.epoch, experts = count, "experts unloaded");
            }
        }

        // Out of every epoch a router uses: a draining node may go.
        let needed = view.using.values().any(|&e| self.assigned.get(&e).is_some_and(|rows| !rows.is_empty()))
            || p.node_index(&id).is_some();
        if needed {
            self.gone_since = None;
        } else {
            self.gone_since.get_or_insert_with(Instant::now);
        }
        Ok(())
    }
}

fn hosted_map(set: &ExpertSet) -> BTreeMap<usize, Vec<u32>> {
    set.layers.iter().map(|r| (r.layer as usize, r.experts.clone())).collect()
}

/// The experts of `a` not in `b`.
fn difference(a: &BTreeMap<usize, Vec<u32>>, b: &ExpertSet) -> ExpertSet {
    let have = hosted_map(b);
    expert_set(a.iter().map(|(&l, experts)| {
        let other = have.get(&l);
        (l, experts.iter().copied().filter(|e| !other.is_some_and(|o| o.contains(e))).collect::<Vec<u32>>())
    }))
}

/// Publishes what this node computed per (layer, expert) every `period`, as `served/<node>`, over the last
/// [`LOAD_PERIODS`] periods (what `moectl placement show` reports as the nodes' measured load).
pub async fn publish_served(node: Arc<ExpertNode>, session: Arc<Session>, period: Duration) {
    let config = node.config();
    let moe_layers: Vec<u32> =
        (0..config.num_hidden_layers).filter(|&l| config.is_moe_layer(l)).map(|l| l as u32).collect();
    let mut window = moe_placement::LoadWindow::new(LOAD_PERIODS);
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    let mut last = Instant::now();
    loop {
        tick.tick().await;
        let report = window.push(node.take_load(&moe_layers), last.elapsed().as_secs_f64());
        last = Instant::now();
        if let Err(e) = session.put(&format!("served/{}", node.node_id), &report).await {
            tracing::warn!("publishing the load served: {e}");
        }
    }
}

/// Load reports cover this many publishing periods.
pub const LOAD_PERIODS: usize = 6;
