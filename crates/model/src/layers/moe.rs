//! The MoE block (spec §3.5) and the **experts seam**.
//!
//! The router side ([`MoeBlock`]) computes router logits, the softmax over all experts, the top-k and its
//! renormalisation, and the shared expert with its sigmoid gate. The routed experts sit behind the [`Experts`] trait,
//! which receives the normed hidden states and the routing in CSR form and returns, per token, the weighted sum of its
//! experts' outputs. [`LocalExperts`] runs them in this process; a remote implementation (expert nodes over gRPC)
//! plugs into the same trait without touching the model. Expert computation is per token and stateless, so any
//! implementation that returns the same sums gives the same tokens.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::cpu::matmul::Activations;
use crate::cpu::ops::{sigmoid, softmax};
use crate::cpu::profile::{self, dense_matmul, Stage};
use crate::cpu::simd::swiglu;
use crate::error::{ModelError, Result};
use crate::weights::{Checkpoint, Mat};

/// The router's decisions for a batch, in CSR form: token `t` goes to `experts[offsets[t]..offsets[t+1]]` with the
/// matching `weights`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Routing {
    pub offsets: Vec<u32>,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Routing {
    pub fn num_tokens(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Returns the (expert, weight) pairs of token `t`.
    pub fn token(&self, t: usize) -> impl Iterator<Item = (u32, f32)> + '_ {
        let (a, b) = (self.offsets[t] as usize, self.offsets[t + 1] as usize);
        self.experts[a..b].iter().copied().zip(self.weights[a..b].iter().copied())
    }
}

/// Computes routed experts for a batch of tokens of one layer.
///
/// The work is split in two so that a caller can overlap it with its own: [`Experts::dispatch`] starts it (a remote
/// implementation sends the activations and returns at once) and [`PendingExperts::wait`] collects the result.
pub trait Experts: Send + Sync {
    /// Starts computing, for each token of `hidden` (`ntok × H`, the post-attention-normed hidden states), the sum over
    /// its routed experts of `weight · expert(x)`; `routing` has `ntok` tokens.
    fn dispatch(&self, layer: usize, hidden: &[f32], routing: &Routing) -> Result<Box<dyn PendingExperts + '_>>;

    /// Computes the sums into `out` (`ntok × H`, overwritten): [`Experts::dispatch`] then [`PendingExperts::wait`].
    fn forward(&self, layer: usize, hidden: &[f32], routing: &Routing, out: &mut [f32]) -> Result<()> {
        self.dispatch(layer, hidden, routing)?.wait(out)
    }
}

/// Routed-expert work in progress, started by [`Experts::dispatch`].
pub trait PendingExperts: Send {
    /// Blocks until the sums are known and writes them into `out` (`ntok × H`, overwritten).
    fn wait(self: Box<Self>, out: &mut [f32]) -> Result<()>;
}

/// Work that was done when it was dispatched.
#[derive(Debug)]
pub struct Ready(pub Vec<f32>);

impl PendingExperts for Ready {
    fn wait(self: Box<Self>, out: &mut [f32]) -> Result<()> {
        if out.len() != self.0.len() {
            return Err(ModelError::InvalidInput(format!(
                "output buffer has {} values, the result {}",
                out.len(),
                self.0.len()
            )));
        }
        out.copy_from_slice(&self.0);
        Ok(())
    }
}

/// Tokens per parallel task of the expert combine.
const COMBINE_TOKENS: usize = 16;

/// `o += w · y` lane by lane, a product then a sum (not fused), the same bits on every vector level.
#[inline(always)]
fn add_scaled_body(o: &mut [f32], w: f32, y: &[f32]) {
    for (o, v) in o.iter_mut().zip(y) {
        *o += w * v;
    }
}

crate::multiversion!(fn add_scaled(o: &mut [f32], w: f32, y: &[f32]) => add_scaled_body);

/// The combine of a token's routed experts: `out = Σ w · y` over `(expert, w, y)` in ascending expert order, from
/// +0, each term a product then a sum. [`LocalExperts`] combines so; a combiner elsewhere (the router adding expert
/// outputs from other processes) that calls this with the same outputs gets the same bits.
pub fn combine_experts<'y>(out: &mut [f32], terms: impl IntoIterator<Item = (u32, f32, &'y [f32])>) {
    let mut terms: Vec<_> = terms.into_iter().collect();
    terms.sort_by_key(|&(e, _, _)| e);
    out.fill(0.0);
    for (_, w, y) in terms {
        add_scaled(out, w, y);
    }
}

/// A SwiGLU MLP, `down · (silu(gate · x) ⊙ (up · x))`: a routed expert, the shared expert, or a dense MLP.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    pub gate: Mat,
    pub up: Mat,
    pub down: Mat,
}

impl SwiGlu {
    /// Runs the MLP on `ntok` rows of `x`; `parallel` spreads each matmul over the thread pool. The activations are
    /// converted for the kernel once for gate and up, and SwiGLU's product is one vectorised pass.
    pub fn forward(&self, x: &[f32], ntok: usize, parallel: bool) -> Vec<f32> {
        let inter = self.gate.rows;
        let xa = Activations::new(x, ntok, self.gate.cols);
        let mut g = xa.product(&self.gate, parallel);
        let u = xa.product(&self.up, parallel);
        swiglu(&mut g, &u);
        let y = Activations::new(&g, ntok, inter).product(&self.down, parallel);
        y
    }

    /// [`SwiGlu::forward`] in parallel, timed as [`Stage::Dense`] (the shared expert, dense MLPs).
    pub(crate) fn forward_dense(&self, x: &[f32], ntok: usize) -> Vec<f32> {
        let bytes = self.bytes() as u64;
        profile::time(Stage::Dense, bytes * ntok as u64, bytes, || self.forward(x, ntok, true))
    }

    pub fn bytes(&self) -> usize {
        self.gate.bytes() + self.up.bytes() + self.down.bytes()
    }

    fn load(ckpt: &Checkpoint, prefix: &str, hidden: usize, inter: usize) -> Result<Self> {
        Ok(SwiGlu {
            gate: ckpt.matrix(&format!("{prefix}gate_proj.weight"), &[inter, hidden])?,
            up: ckpt.matrix(&format!("{prefix}up_proj.weight"), &[inter, hidden])?,
            down: ckpt.matrix(&format!("{prefix}down_proj.weight"), &[hidden, inter])?,
        })
    }
}

/// The router-side half of a MoE layer: gating and the shared expert.
#[derive(Debug)]
pub(crate) struct MoeBlock {
    router: Mat,
    shared: SwiGlu,
    shared_gate: Mat,
    top_k: usize,
    renormalize: bool,
}

impl MoeBlock {
    pub(crate) fn load(ckpt: &Checkpoint, cfg: &ModelConfig, layer: usize) -> Result<Self> {
        let p = format!("layers.{layer}.mlp.");
        let h = cfg.hidden_size;
        Ok(MoeBlock {
            router: ckpt.matrix(&format!("{p}gate.weight"), &[cfg.num_experts, h])?,
            shared: SwiGlu::load(ckpt, &format!("{p}shared_expert."), h, cfg.shared_expert_intermediate_size)?,
            shared_gate: ckpt.matrix(&format!("{p}shared_expert_gate.weight"), &[1, h])?,
            top_k: cfg.num_experts_per_tok,
            renormalize: cfg.norm_topk_prob,
        })
    }

    /// Bytes of router-side weights read per step (router and shared expert).
    pub(crate) fn weight_bytes(&self) -> usize {
        self.router.bytes() + self.shared.bytes() + self.shared_gate.bytes()
    }

    /// Softmax over all experts, top-k, optional renormalisation.
    pub(crate) fn route(&self, x: &[f32], ntok: usize) -> Routing {
        let e = self.router.rows;
        let mut logits = vec![0f32; ntok * e];
        dense_matmul(x, ntok, &self.router, &mut logits);
        let mut routing = Routing {
            offsets: Vec::with_capacity(ntok + 1),
            experts: Vec::with_capacity(ntok * self.top_k),
            weights: Vec::with_capacity(ntok * self.top_k),
        };
        routing.offsets.push(0);
        let mut order: Vec<u32> = Vec::with_capacity(e);
        for row in logits.chunks_exact_mut(e) {
            softmax(row);
            order.clear();
            order.extend(0..e as u32);
            // Highest probability first; ties go to the lower expert id, as torch.topk does on CPU.
            order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            let top = &order[..self.top_k];
            let sum: f32 = top.iter().map(|&i| row[i as usize]).sum();
            for &i in top {
                routing.experts.push(i);
                let p = row[i as usize];
                routing.weights.push(if self.renormalize { p / sum } else { p });
            }
            routing.offsets.push(routing.experts.len() as u32);
        }
        routing
    }

    /// Starts `routed + sigmoid(x·w_sg) · shared(x)`: dispatches the routed experts, then computes the shared expert
    /// and its gate while they work. [`MoeStep::finish`] adds the two.
    pub(crate) fn start<'e>(
        &self,
        layer: usize,
        x: &[f32],
        ntok: usize,
        experts: &'e dyn Experts,
    ) -> Result<MoeStep<'e>> {
        let routing = self.route(x, ntok);
        let routed = experts.dispatch(layer, x, &routing)?;
        let shared = self.shared.forward_dense(x, ntok);
        let mut gate = vec![0f32; ntok];
        dense_matmul(x, ntok, &self.shared_gate, &mut gate);
        Ok(MoeStep { routed, shared, gate })
    }

    /// Loads the dense MLP of a non-MoE Qwen3-Next layer.
    pub(crate) fn load_dense(ckpt: &Checkpoint, cfg: &ModelConfig, layer: usize) -> Result<SwiGlu> {
        SwiGlu::load(ckpt, &format!("layers.{layer}.mlp."), cfg.hidden_size, cfg.intermediate_size)
    }
}

/// A MoE layer in flight for one micro-batch: the routed experts at work, the shared expert done.
pub(crate) struct MoeStep<'e> {
    routed: Box<dyn PendingExperts + 'e>,
    shared: Vec<f32>,
    gate: Vec<f32>,
}

impl MoeStep<'_> {
    /// Waits for the routed experts and writes the layer's MLP output into `out` (`ntok × H`).
    pub(crate) fn finish(self, out: &mut [f32]) -> Result<()> {
        self.routed.wait(out)?;
        let h = self.shared.len() / self.gate.len().max(1);
        for (t, &g) in self.gate.iter().enumerate() {
            let g = sigmoid(g);
            for (o, s) in out[t * h..(t + 1) * h].iter_mut().zip(&self.shared[t * h..(t + 1) * h]) {
                *o += g * s;
            }
        }
        Ok(())
    }
}

/// Counters of the work [`LocalExperts`] has done, for benchmarks.
#[derive(Debug, Default)]
pub struct ExpertStats {
    /// Wall time spent inside `forward`, in nanoseconds.
    pub nanos: AtomicU64,
    /// Floating-point operations (2 per multiply-add) of the expert matmuls.
    pub flops: AtomicU64,
    /// Bytes of expert weights read (each expert touched by a call counts once).
    pub weight_bytes: AtomicU64,
}

/// One expert's share of a batch: its id, its weights, and its (token, router weight) pairs.
type ExpertWork<'a> = (usize, Arc<SwiGlu>, &'a [(usize, f32)]);

/// `table[layer][expert]`: `None` for dense layers and experts not held here.
/// The experts a shard holds, one slot per (MoE layer, expert), changed slot by slot while serving. Shared by the
/// shards of every backend (`T` is the backend's expert: its weights, wherever they live). Work takes `Arc`s of the
/// slots it uses, so an expert unloaded meanwhile is freed when that work is done.
pub struct ExpertSlots<T> {
    table: RwLock<Vec<Vec<Option<Arc<T>>>>>,
}

impl<T> ExpertSlots<T> {
    /// Empty slots for every expert of every MoE layer of `cfg` (other layers have none).
    pub fn new(cfg: &ModelConfig) -> Self {
        let table = (0..cfg.num_hidden_layers)
            .map(|l| if cfg.is_moe_layer(l) { (0..cfg.num_experts).map(|_| None).collect() } else { Vec::new() })
            .collect();
        ExpertSlots { table: RwLock::new(table) }
    }

    pub fn is_loaded(&self, layer: usize, expert: usize) -> bool {
        self.read().get(layer).and_then(|row| row.get(expert)).is_some_and(Option::is_some)
    }

    /// The experts held, per layer (layers without any are left out), ascending.
    pub fn hosted(&self) -> Vec<(usize, Vec<u32>)> {
        self.read()
            .iter()
            .enumerate()
            .map(|(l, row)| (l, row.iter().enumerate().filter(|(_, m)| m.is_some()).map(|(e, _)| e as u32).collect()))
            .filter(|(_, experts): &(usize, Vec<u32>)| !experts.is_empty())
            .collect()
    }

    /// The slots of `layer` as they are now; `None` if it is not a MoE layer.
    pub fn layer(&self, layer: usize) -> Option<Vec<Option<Arc<T>>>> {
        self.read().get(layer).filter(|row| !row.is_empty()).cloned()
    }

    /// Fills the empty slots among `items`; returns those that were filled.
    pub fn insert(&self, items: impl IntoIterator<Item = (usize, usize, T)>) -> Vec<Arc<T>> {
        let mut table = self.write();
        let mut added = Vec::new();
        for (l, e, item) in items {
            if let Some(slot) = table.get_mut(l).and_then(|row| row.get_mut(e)) {
                if slot.is_none() {
                    let item = Arc::new(item);
                    added.push(Arc::clone(&item));
                    *slot = Some(item);
                }
            }
        }
        added
    }

    /// Empties the held slots `(layer, expert)` for which `select` is true; returns what they held.
    pub fn remove(&self, select: impl Fn(usize, usize) -> bool) -> Vec<Arc<T>> {
        let mut table = self.write();
        let mut removed = Vec::new();
        for (l, row) in table.iter_mut().enumerate() {
            for (e, slot) in row.iter_mut().enumerate() {
                if slot.is_some() && select(l, e) {
                    removed.extend(slot.take());
                }
            }
        }
        removed
    }

    /// Every expert held.
    pub fn all(&self) -> Vec<Arc<T>> {
        self.read().iter().flatten().flatten().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Vec<Option<Arc<T>>>>> {
        // Slots are only ever replaced one by one, so a panic elsewhere cannot leave the table half-written.
        self.table.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Vec<Option<Arc<T>>>>> {
        self.table.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<T> std::fmt::Debug for ExpertSlots<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.read();
        let loaded: usize = table.iter().map(|l| l.iter().flatten().count()).sum();
        f.debug_struct("ExpertSlots").field("layers", &table.len()).field("loaded", &loaded).finish()
    }
}

/// What a call to [`LocalExperts::load_more`] or [`LocalExperts::unload`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardChange {
    /// (layer, expert) pairs added or removed.
    pub experts: usize,
    /// Bytes of weights of those experts.
    pub bytes: usize,
}

impl ShardChange {
    /// The change made by adding or removing `experts`, of `bytes` each.
    pub fn of<T>(experts: &[Arc<T>], bytes: impl Fn(&T) -> usize) -> Self {
        ShardChange { experts: experts.len(), bytes: experts.iter().map(|x| bytes(x)).sum() }
    }
}

/// Routed experts held in this process: the experts selected at load time, changeable while serving with
/// [`LocalExperts::load_more`] and [`LocalExperts::unload`].
pub struct LocalExperts {
    slots: ExpertSlots<SwiGlu>,
    hidden: usize,
    num_experts: usize,
    pub stats: ExpertStats,
}

impl LocalExperts {
    /// Holds no expert yet (a router, or an expert node that is told what to load later).
    pub fn empty(cfg: &ModelConfig) -> Self {
        LocalExperts {
            slots: ExpertSlots::new(cfg),
            hidden: cfg.hidden_size,
            num_experts: cfg.num_experts,
            stats: ExpertStats::default(),
        }
    }

    /// Loads the experts `(layer, expert)` for which `select` returns true, from either checkpoint layout: fused
    /// (`experts.gate_up_proj` `[E, 2I, H]` with gate rows first, `experts.down_proj` `[E, H, I]`) or per expert
    /// (`experts.{e}.{gate,up,down}_proj.weight`). Fused tensors are mapped once and viewed per expert.
    pub fn load(ckpt: &Checkpoint, cfg: &ModelConfig, select: impl Fn(usize, usize) -> bool + Sync) -> Result<Self> {
        let experts = Self::empty(cfg);
        experts.load_more(ckpt, cfg, select)?;
        Ok(experts)
    }

    /// Adds the selected experts that are not held yet, while serving: they are read without holding the table, then
    /// published at once. Selections outside the model's MoE layers and experts are ignored.
    pub fn load_more(
        &self,
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        select: impl Fn(usize, usize) -> bool + Sync,
    ) -> Result<ShardChange> {
        let (h, i, ne) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
        let wanted = |l: usize, e: usize| select(l, e) && !self.is_loaded(l, e);
        let loaded = (0..cfg.num_hidden_layers)
            .into_par_iter()
            .map(|l| -> Result<Vec<(usize, usize, SwiGlu)>> {
                if !cfg.is_moe_layer(l) || !(0..ne).any(|e| wanted(l, e)) {
                    return Ok(Vec::new());
                }
                let p = format!("layers.{l}.mlp.experts.");
                let fused = if ckpt.contains(&format!("{p}gate_up_proj")) {
                    Some((
                        ckpt.matrix_view(&format!("{p}gate_up_proj"), &[ne, 2 * i, h])?,
                        ckpt.matrix_view(&format!("{p}down_proj"), &[ne, h, i])?,
                    ))
                } else {
                    None
                };
                // Experts are copied (when resident) in parallel: loading is bound by page faults and copies.
                (0..ne)
                    .into_par_iter()
                    .filter(|&e| wanted(l, e))
                    .map(|e| -> Result<(usize, usize, SwiGlu)> {
                        let mlp = match &fused {
                            Some((gate_up, down)) => SwiGlu {
                                gate: ckpt.settle(&gate_up.rows(e * 2 * i, e * 2 * i + i))?,
                                up: ckpt.settle(&gate_up.rows(e * 2 * i + i, (e + 1) * 2 * i))?,
                                down: ckpt.settle(&down.rows(e * h, (e + 1) * h))?,
                            },
                            None => SwiGlu::load(ckpt, &format!("{p}{e}."), h, i)?,
                        };
                        Ok((l, e, mlp))
                    })
                    .collect()
            })
            .collect::<Result<Vec<_>>>()?;
        // Later loads start a fresh arena region, so that unloading them can give their memory back.
        ckpt.seal_arena();
        Ok(ShardChange::of(&self.slots.insert(loaded.into_iter().flatten()), SwiGlu::bytes))
    }

    /// Drops the selected experts. Work already dispatched to them finishes; their memory goes back once it has.
    pub fn unload(&self, select: impl Fn(usize, usize) -> bool) -> ShardChange {
        ShardChange::of(&self.slots.remove(select), SwiGlu::bytes)
    }

    /// Returns whether expert `expert` of layer `layer` is held here.
    pub fn is_loaded(&self, layer: usize, expert: usize) -> bool {
        self.slots.is_loaded(layer, expert)
    }

    /// The experts held here, per layer (layers without any are left out), ascending.
    pub fn hosted(&self) -> Vec<(usize, Vec<u32>)> {
        self.slots.hosted()
    }

    /// Bytes of the weights of every expert held here.
    pub fn resident_bytes(&self) -> usize {
        self.slots.all().iter().map(|m| m.bytes()).sum()
    }

    /// Routed experts per MoE layer, as in config.json.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Bytes of one expert of `layer` (0 if none is loaded there).
    pub fn expert_bytes(&self, layer: usize) -> usize {
        self.slots.layer(layer).and_then(|l| l.iter().flatten().next().map(|m| m.bytes())).unwrap_or(0)
    }
}

impl std::fmt::Debug for LocalExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalExperts").field("slots", &self.slots).finish_non_exhaustive()
    }
}

impl Experts for LocalExperts {
    fn dispatch(&self, layer: usize, hidden: &[f32], routing: &Routing) -> Result<Box<dyn PendingExperts + '_>> {
        let mut out = vec![0f32; hidden.len()];
        self.compute(layer, hidden, routing, &mut out)?;
        Ok(Box::new(Ready(out)))
    }

    fn forward(&self, layer: usize, hidden: &[f32], routing: &Routing, out: &mut [f32]) -> Result<()> {
        self.compute(layer, hidden, routing, out)
    }
}

impl LocalExperts {
    /// Computes the weighted sums into `out`; the whole of [`Experts::forward`].
    fn compute(&self, layer: usize, hidden: &[f32], routing: &Routing, out: &mut [f32]) -> Result<()> {
        let started = Instant::now();
        let h = self.hidden;
        let ntok = routing.num_tokens();
        if hidden.len() != ntok * h || out.len() != ntok * h {
            return Err(ModelError::Experts {
                layer,
                message: format!("hidden has {} values for {ntok} tokens of width {h}", hidden.len()),
            });
        }
        // Group the tokens by expert, keeping token order inside each group.
        let mut groups: Vec<Vec<(usize, f32)>> = vec![Vec::new(); self.num_experts];
        for t in 0..ntok {
            for (e, w) in routing.token(t) {
                let group = groups.get_mut(e as usize).ok_or_else(|| ModelError::Experts {
                    layer,
                    message: format!("expert {e} out of range (the model has {})", self.num_experts),
                })?;
                group.push((t, w));
            }
        }
        let work: Vec<ExpertWork<'_>> = {
            let row = self
                .slots
                .layer(layer)
                .ok_or_else(|| ModelError::Experts { layer, message: "not a MoE layer".into() })?;
            groups
                .iter()
                .enumerate()
                .filter(|(_, g)| !g.is_empty())
                .map(|(e, g)| {
                    row[e]
                        .clone()
                        .map(|w| (e, w, g.as_slice()))
                        .ok_or_else(|| ModelError::Experts { layer, message: format!("expert {e} is not loaded here") })
                })
                .collect::<Result<_>>()?
        };
        let results: Vec<Vec<f32>> = work
            .par_iter()
            .map(|(_, mlp, tokens)| {
                let mut x = Vec::with_capacity(tokens.len() * h);
                for &(t, _) in *tokens {
                    x.extend_from_slice(&hidden[t * h..(t + 1) * h]);
                }
                mlp.forward(&x, tokens.len(), false)
            })
            .collect();
        // Combine in expert order, so the sum for a token never depends on how the batch was formed: each token
        // lists its (result, row, weight) in expert order, and tokens are summed in parallel.
        let mut rows: Vec<Vec<(usize, usize, f32)>> = vec![Vec::new(); ntok];
        let mut flops = 0u64;
        let mut bytes = 0u64;
        for (e, (_, mlp, tokens)) in work.iter().enumerate() {
            for (i, &(t, w)) in tokens.iter().enumerate() {
                rows[t].push((e, i, w));
            }
            flops += 2 * (mlp.bytes() as u64 / 2) * tokens.len() as u64;
            bytes += mlp.bytes() as u64;
        }
        out.par_chunks_mut(h).zip(&rows).with_min_len(COMBINE_TOKENS).for_each(|(o, list)| {
            o.fill(0.0);
            for &(e, i, w) in list {
                add_scaled(o, w, &results[e][i * h..(i + 1) * h]);
            }
        });
        self.stats.flops.fetch_add(flops, Ordering::Relaxed);
        self.stats.weight_bytes.fetch_add(bytes, Ordering::Relaxed);
        let nanos = started.elapsed().as_nanos() as u64;
        self.stats.nanos.fetch_add(nanos, Ordering::Relaxed);
        if profile::enabled() {
            profile::record(Stage::Experts, nanos, flops, bytes);
        }
        Ok(())
    }
}
