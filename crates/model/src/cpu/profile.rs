//! Where a forward pass spends its time: wall time, floating-point operations and weight bytes per stage, summed
//! over the process while enabled (off by default; `moectl bench-model` turns it on).
//!
//! Stages are timed on the thread that drives the pass, around regions that are themselves parallel, so each figure
//! is wall time and the stages do not overlap: their sum is at most the pass's time, and the remainder is
//! [`Stage`]-less work (embedding, norms, residual adds, gating's softmax and top-k, logits gathering). The cost when
//! disabled is one relaxed atomic load per region.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// A part of the forward pass with its own cost model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The routed experts (in this process: their matmuls and SwiGLU; remote: waiting for them).
    Experts,
    /// Dense matmuls: attention and Gated DeltaNet projections, router, shared expert, dense MLPs, LM head.
    Dense,
    /// The chunked gated delta rule with its conv and output norm (spans of more than one token).
    DeltaChunked,
    /// The recurrent gated delta rule with its conv and output norm (single-token steps).
    DeltaRecurrent,
    /// Attention core: q/k norms, RoPE, cache append, scores, softmax, weighted values, output gate.
    AttentionCore,
}

impl Stage {
    pub const ALL: [Stage; 5] =
        [Stage::Experts, Stage::Dense, Stage::DeltaChunked, Stage::DeltaRecurrent, Stage::AttentionCore];

    /// The name used in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Experts => "routed_experts",
            Stage::Dense => "dense_projections",
            Stage::DeltaChunked => "deltanet_chunked",
            Stage::DeltaRecurrent => "deltanet_recurrent",
            Stage::AttentionCore => "attention_core",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Totals of one stage.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTotals {
    pub nanos: u64,
    pub flops: u64,
    /// Bytes of weights read (0 for stages without weights).
    pub weight_bytes: u64,
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static COUNTERS: [[AtomicU64; 3]; 5] = [const { [const { AtomicU64::new(0) }; 3] }; 5];

/// Turns recording on or off for the whole process.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Returns whether recording is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The totals recorded so far, per stage in [`Stage::ALL`] order.
pub fn snapshot() -> [StageTotals; 5] {
    Stage::ALL.map(|s| {
        let c = &COUNTERS[s.index()];
        StageTotals {
            nanos: c[0].load(Ordering::Relaxed),
            flops: c[1].load(Ordering::Relaxed),
            weight_bytes: c[2].load(Ordering::Relaxed),
        }
    })
}

/// The totals recorded between two snapshots.
pub fn delta(before: &[StageTotals; 5], after: &[StageTotals; 5]) -> [StageTotals; 5] {
    std::array::from_fn(|i| StageTotals {
        nanos: after[i].nanos - before[i].nanos,
        flops: after[i].flops - before[i].flops,
        weight_bytes: after[i].weight_bytes - before[i].weight_bytes,
    })
}

/// Adds work to a stage.
pub fn record(stage: Stage, nanos: u64, flops: u64, weight_bytes: u64) {
    let c = &COUNTERS[stage.index()];
    c[0].fetch_add(nanos, Ordering::Relaxed);
    c[1].fetch_add(flops, Ordering::Relaxed);
    c[2].fetch_add(weight_bytes, Ordering::Relaxed);
}

/// Runs `f` and, when recording, adds its wall time and the given work to `stage`.
#[inline]
pub fn time<R>(stage: Stage, flops: u64, weight_bytes: u64, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    let t = Instant::now();
    let r = f();
    record(stage, t.elapsed().as_nanos() as u64, flops, weight_bytes);
    r
}

/// [`crate::cpu::matmul::matmul`] timed as [`Stage::Dense`], with its FLOPs and weight bytes.
pub(crate) fn dense_matmul(x: &[f32], ntok: usize, w: &crate::weights::Mat, y: &mut [f32]) {
    dense(&crate::cpu::matmul::Activations::new(x, ntok, w.cols), w, y);
}

/// `y = x · wᵀ` from activations converted once (several projections of the same input), timed as [`Stage::Dense`].
pub(crate) fn dense(x: &crate::cpu::matmul::Activations<'_>, w: &crate::weights::Mat, y: &mut [f32]) {
    let flops = 2 * (x.ntok() * w.rows * w.cols) as u64;
    time(Stage::Dense, flops, w.bytes() as u64, || x.matmul(w, y, true));
}
