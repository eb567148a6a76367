//! The MoE block (spec §3.5) and the **experts seam**.
//!
//! The router side ([`MoeBlock`]) computes router logits, the softmax over all experts, the top-k and its
//! renormalisation, and the shared expert with its sigmoid gate. The routed experts sit behind the [`Experts`] trait,
//! which receives the normed hidden states and the routing in CSR form and returns, per token, the weighted sum of its
//! experts' outputs. [`LocalExperts`] runs them in this process; a remote implementation (expert nodes over gRPC)
//! plugs into the same trait without touching the model. Expert computation is per token and stateless, so any
//! implementation that returns the same sums gives the same tokens.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::cpu::matmul::{matmul, matmul_serial};
use crate::cpu::ops::{sigmoid, silu, softmax};
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
pub trait Experts: Send + Sync {
    /// Writes into `out` (`ntok × H`, overwritten) the sum over each token's routed experts of `weight · expert(x)`,
    /// where `hidden` is `ntok × H` (the post-attention-normed hidden states) and `routing` has `ntok` tokens.
    fn forward(&self, layer: usize, hidden: &[f32], routing: &Routing, out: &mut [f32]) -> Result<()>;
}

/// A SwiGLU MLP, `down · (silu(gate · x) ⊙ (up · x))`: a routed expert, the shared expert, or a dense MLP.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    pub gate: Mat,
    pub up: Mat,
    pub down: Mat,
}

impl SwiGlu {
    /// Runs the MLP on `ntok` rows of `x`; `parallel` spreads each matmul over the thread pool.
    pub fn forward(&self, x: &[f32], ntok: usize, parallel: bool) -> Vec<f32> {
        let mm = if parallel { matmul } else { matmul_serial };
        let inter = self.gate.rows;
        let mut g = vec![0f32; ntok * inter];
        let mut u = vec![0f32; ntok * inter];
        mm(x, ntok, &self.gate, &mut g);
        mm(x, ntok, &self.up, &mut u);
        for (a, b) in g.iter_mut().zip(&u) {
            *a = silu(*a) * b;
        }
        let mut y = vec![0f32; ntok * self.down.rows];
        mm(&g, ntok, &self.down, &mut y);
        y
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
        matmul(x, ntok, &self.router, &mut logits);
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

    /// `routed + sigmoid(x·w_sg) · shared(x)`.
    pub(crate) fn forward(&self, layer: usize, x: &[f32], ntok: usize, experts: &dyn Experts) -> Result<Vec<f32>> {
        let routing = self.route(x, ntok);
        let mut out = vec![0f32; x.len()];
        experts.forward(layer, x, &routing, &mut out)?;
        let shared = self.shared.forward(x, ntok, true);
        let mut gate = vec![0f32; ntok];
        matmul(x, ntok, &self.shared_gate, &mut gate);
        let h = self.router.cols;
        for t in 0..ntok {
            let g = sigmoid(gate[t]);
            for (o, s) in out[t * h..(t + 1) * h].iter_mut().zip(&shared[t * h..(t + 1) * h]) {
                *o += g * s;
            }
        }
        Ok(out)
    }

    /// Loads the dense MLP of a non-MoE Qwen3-Next layer.
    pub(crate) fn load_dense(ckpt: &Checkpoint, cfg: &ModelConfig, layer: usize) -> Result<SwiGlu> {
        SwiGlu::load(ckpt, &format!("layers.{layer}.mlp."), cfg.hidden_size, cfg.intermediate_size)
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
type ExpertWork<'a> = (usize, &'a SwiGlu, &'a [(usize, f32)]);

/// Routed experts held in this process, for the layers and experts selected at load time.
pub struct LocalExperts {
    /// `layers[l][e]` is `None` for dense layers and unselected experts.
    layers: Vec<Vec<Option<SwiGlu>>>,
    hidden: usize,
    pub stats: ExpertStats,
}

impl LocalExperts {
    /// Loads the experts `(layer, expert)` for which `select` returns true, from either checkpoint layout: fused
    /// (`experts.gate_up_proj` `[E, 2I, H]` with gate rows first, `experts.down_proj` `[E, H, I]`) or per expert
    /// (`experts.{e}.{gate,up,down}_proj.weight`). Fused tensors are mapped once and viewed per expert.
    pub fn load(ckpt: &Checkpoint, cfg: &ModelConfig, select: impl Fn(usize, usize) -> bool + Sync) -> Result<Self> {
        let (h, i, ne) = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts);
        let layers = (0..cfg.num_hidden_layers)
            .into_par_iter()
            .map(|l| -> Result<Vec<Option<SwiGlu>>> {
                if !cfg.is_moe_layer(l) {
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
                    .map(|e| -> Result<Option<SwiGlu>> {
                        if !select(l, e) {
                            return Ok(None);
                        }
                        Ok(Some(match &fused {
                            Some((gate_up, down)) => SwiGlu {
                                gate: ckpt.settle(&gate_up.rows(e * 2 * i, e * 2 * i + i))?,
                                up: ckpt.settle(&gate_up.rows(e * 2 * i + i, (e + 1) * 2 * i))?,
                                down: ckpt.settle(&down.rows(e * h, (e + 1) * h))?,
                            },
                            None => SwiGlu::load(ckpt, &format!("{p}{e}."), h, i)?,
                        }))
                    })
                    .collect()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LocalExperts { layers, hidden: h, stats: ExpertStats::default() })
    }

    /// Bytes of one expert of `layer` (0 if none is loaded there).
    pub fn expert_bytes(&self, layer: usize) -> usize {
        self.layers.get(layer).and_then(|l| l.iter().flatten().next()).map_or(0, SwiGlu::bytes)
    }
}

impl std::fmt::Debug for LocalExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let loaded: usize = self.layers.iter().map(|l| l.iter().flatten().count()).sum();
        f.debug_struct("LocalExperts")
            .field("layers", &self.layers.len())
            .field("loaded", &loaded)
            .finish_non_exhaustive()
    }
}

impl Experts for LocalExperts {
    fn forward(&self, layer: usize, hidden: &[f32], routing: &Routing, out: &mut [f32]) -> Result<()> {
        let started = Instant::now();
        let h = self.hidden;
        let ntok = routing.num_tokens();
        let table =
            self.layers.get(layer).ok_or_else(|| ModelError::Experts { layer, message: "no such layer".into() })?;
        if hidden.len() != ntok * h || out.len() != ntok * h {
            return Err(ModelError::Experts {
                layer,
                message: format!("hidden has {} values for {ntok} tokens of width {h}", hidden.len()),
            });
        }
        // Group the tokens by expert, keeping token order inside each group.
        let mut groups: Vec<Vec<(usize, f32)>> = vec![Vec::new(); table.len()];
        for t in 0..ntok {
            for (e, w) in routing.token(t) {
                let group = groups.get_mut(e as usize).ok_or_else(|| ModelError::Experts {
                    layer,
                    message: format!("expert {e} out of range (layer has {})", table.len()),
                })?;
                group.push((t, w));
            }
        }
        let work: Vec<ExpertWork<'_>> = groups
            .iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .map(|(e, g)| {
                table[e]
                    .as_ref()
                    .map(|w| (e, w, g.as_slice()))
                    .ok_or_else(|| ModelError::Experts { layer, message: format!("expert {e} is not loaded here") })
            })
            .collect::<Result<_>>()?;
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
        // Combine in expert order, so the sum for a token never depends on how the batch was formed.
        out.fill(0.0);
        let mut flops = 0u64;
        let mut bytes = 0u64;
        for ((_, mlp, tokens), y) in work.iter().zip(&results) {
            for (i, &(t, w)) in tokens.iter().enumerate() {
                for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(&y[i * h..(i + 1) * h]) {
                    *o += w * v;
                }
            }
            flops += 2 * (mlp.bytes() as u64 / 2) * tokens.len() as u64;
            bytes += mlp.bytes() as u64;
        }
        self.stats.flops.fetch_add(flops, Ordering::Relaxed);
        self.stats.weight_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.stats.nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(())
    }
}
