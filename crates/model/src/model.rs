//! The decoder (spec §3.2): embeddings, the stack of hybrid layers, the final norm and the LM head, run over a
//! batch of sequence segments of any lengths and positions.

use rayon::prelude::*;

use crate::config::{LayerKind, ModelConfig};
use crate::cpu::matmul::widen;
use crate::cpu::ops::{rms_norm_offset, rms_norm_offset_into, Rope};
use crate::error::{ModelError, Result};
use crate::layers::attention::Attention;
use crate::layers::gdn::GatedDeltaNet;
use crate::layers::moe::{Experts, MoeBlock, MoeStep, SwiGlu};
use crate::layers::Span;
use crate::state::SequenceState;

/// What serves the router side of a model for a batch: the CPU [`Model`], or a decoder on another device. The
/// serving engine drives either through this.
pub trait Decoder: Send + Sync + std::fmt::Debug {
    fn config(&self) -> &ModelConfig;

    /// A fresh state for a new sequence.
    fn new_state(&self) -> SequenceState;

    /// Runs every segment's new tokens, appending to their states; returns the logits each segment asked for
    /// (see [`Model::forward_pipelined`]).
    fn forward_pipelined(
        &self,
        batch: &mut [Segment<'_>],
        experts: &dyn Experts,
        micro_batches: usize,
    ) -> Result<Vec<Vec<f32>>>;
}

impl Decoder for Model {
    fn config(&self) -> &ModelConfig {
        Model::config(self)
    }

    fn new_state(&self) -> SequenceState {
        Model::new_state(self)
    }

    fn forward_pipelined(
        &self,
        batch: &mut [Segment<'_>],
        experts: &dyn Experts,
        micro_batches: usize,
    ) -> Result<Vec<Vec<f32>>> {
        Model::forward_pipelined(self, batch, experts, micro_batches)
    }
}
use crate::weights::{Checkpoint, Mat};

#[derive(Debug)]
enum Mixer {
    Attention(Attention),
    Linear(GatedDeltaNet),
}

#[derive(Debug)]
enum Mlp {
    Moe(MoeBlock),
    /// Qwen3-Next layers outside `decoder_sparse_step` / in `mlp_only_layers`.
    Dense(SwiGlu),
}

#[derive(Debug)]
struct Layer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    mixer: Mixer,
    mlp: Mlp,
}

/// Which logits a segment wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only after the segment's last token (generation).
    Last,
    /// After every token of the segment (scoring, echo).
    All,
    /// None (a prefill chunk that is not the last).
    None,
}

impl LogitsFor {
    /// The rows, of a segment whose tokens are batch rows `start..start + len`, whose logits are wanted.
    pub fn rows(self, start: usize, len: usize) -> std::ops::Range<usize> {
        match self {
            LogitsFor::Last => start + len.max(1) - 1..start + len,
            LogitsFor::All => start..start + len,
            LogitsFor::None => start..start,
        }
    }
}

/// One sequence's part of a batch: new tokens appended to its state.
#[derive(Debug)]
pub struct Segment<'a> {
    pub state: &'a mut SequenceState,
    pub tokens: &'a [u32],
    pub logits: LogitsFor,
}

/// The router-side model: everything but the routed experts, which come through [`Experts`].
pub struct Model {
    config: ModelConfig,
    embed: Mat,
    lm_head: Mat,
    final_norm: Vec<f32>,
    layers: Vec<Layer>,
    rope: Rope,
    /// Unique per loaded model, so that a sequence state cannot be fed to a model it was not made by.
    id: u64,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("family", &self.config.family)
            .field("layers", &self.layers.len())
            .field("hidden_size", &self.config.hidden_size)
            .field("dense_weight_bytes", &self.dense_weight_bytes())
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Loads the non-expert weights of the model described by `config` from `ckpt`.
    pub fn load(ckpt: &Checkpoint, config: ModelConfig) -> Result<Self> {
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed = ckpt.matrix_row_major("embed_tokens.weight", &[v, h])?;
        let lm_head = if config.tie_word_embeddings && !ckpt.contains("lm_head.weight") {
            embed.clone()
        } else {
            ckpt.matrix("lm_head.weight", &[v, h])?
        };
        let layers = (0..config.num_hidden_layers)
            .into_par_iter()
            .map(|i| -> Result<Layer> {
                let mixer = match config.layer_types[i] {
                    LayerKind::Full => Mixer::Attention(Attention::load(ckpt, &config, i)?),
                    LayerKind::Linear => Mixer::Linear(GatedDeltaNet::load(ckpt, &config, i)?),
                };
                let mlp = if config.is_moe_layer(i) {
                    Mlp::Moe(MoeBlock::load(ckpt, &config, i)?)
                } else {
                    Mlp::Dense(MoeBlock::load_dense(ckpt, &config, i)?)
                };
                Ok(Layer {
                    input_norm: ckpt.vector(&format!("layers.{i}.input_layernorm.weight"), &[h])?,
                    post_norm: ckpt.vector(&format!("layers.{i}.post_attention_layernorm.weight"), &[h])?,
                    mixer,
                    mlp,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Model {
            id: crate::state::new_decoder_id(),
            rope: Rope::new(config.rotary_dim(), config.rope_theta),
            final_norm: ckpt.vector("norm.weight", &[h])?,
            config,
            embed,
            lm_head,
            layers,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Returns a fresh state for a new sequence.
    pub fn new_state(&self) -> SequenceState {
        SequenceState::new(&self.config, self.id)
    }

    /// Bytes of non-expert weights one decode step reads (mixers, router, shared expert, dense MLPs, LM head; the
    /// embedding row is negligible). Add `top_k × expert bytes` per MoE layer for the routed experts.
    pub fn dense_weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let mixer = match &l.mixer {
                    Mixer::Attention(a) => a.weight_bytes(),
                    Mixer::Linear(g) => g.weight_bytes(),
                };
                let mlp = match &l.mlp {
                    Mlp::Moe(m) => m.weight_bytes(),
                    Mlp::Dense(d) => d.bytes(),
                };
                mixer + mlp
            })
            .sum();
        layers + self.lm_head.bytes()
    }

    /// Runs every segment's new tokens through the model, appending to their states, and returns for each segment
    /// the logits it asked for (`rows × vocab`, row-major; empty for [`LogitsFor::None`]).
    ///
    /// Segments are independent: a segment's outputs do not depend on which other segments share the batch.
    pub fn forward(&self, batch: &mut [Segment<'_>], experts: &dyn Experts) -> Result<Vec<Vec<f32>>> {
        self.forward_pipelined(batch, experts, 1)
    }

    /// [`Model::forward`] with the batch split into up to `micro_batches` groups of whole segments, balanced by
    /// tokens, that take turns: while the routed experts of one group work (on other processes), the next group runs
    /// its attention. Outputs are the same for every `micro_batches`, bit for bit.
    pub fn forward_pipelined(
        &self,
        batch: &mut [Segment<'_>],
        experts: &dyn Experts,
        micro_batches: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let vocab = self.config.vocab_size;
        let mut total = 0;
        for seg in batch.iter() {
            if seg.tokens.is_empty() {
                return Err(ModelError::InvalidInput("a batch segment has no tokens".into()));
            }
            if let Some(&bad) = seg.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(ModelError::InvalidInput(format!("token id {bad} is out of range (vocab_size {vocab})")));
            }
            if seg.state.model_id != self.id {
                return Err(ModelError::InvalidInput("the sequence state was made by another model".into()));
            }
            total += seg.tokens.len();
        }

        // Cut the batch into contiguous groups of segments of about total/m tokens each.
        let m = micro_batches.clamp(1, batch.len().max(1));
        let mut groups = Vec::with_capacity(m);
        let mut rest = batch;
        let mut done = 0;
        for g in 0..m {
            let target = total * (g + 1) / m;
            let mut take = 0;
            while take < rest.len() && (done < target || take == 0) && rest.len() - take > m - g - 1 {
                done += rest[take].tokens.len();
                take += 1;
            }
            if g == m - 1 {
                take = rest.len();
            }
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(take);
            rest = tail;
            if !head.is_empty() {
                groups.push(MicroBatch::new(self, head));
            }
        }

        for (i, layer) in self.layers.iter().enumerate() {
            for mb in groups.iter_mut() {
                mb.finish_mlp()?;
                mb.mixer_and_start_mlp(self, i, layer, experts)?;
            }
        }
        let mut out = Vec::new();
        for mb in groups.iter_mut() {
            mb.finish_mlp()?;
            out.extend(mb.logits(self));
        }
        Ok(out)
    }
}

/// A group of whole segments that goes through the layers together, with its activations.
struct MicroBatch<'s, 'b, 'e> {
    segments: &'s mut [Segment<'b>],
    spans: Vec<Span>,
    ntok: usize,
    /// The residual stream, `ntok × H`.
    x: Vec<f32>,
    /// Normed activations, reused per layer.
    xn: Vec<f32>,
    /// The MoE layer still at work, whose output the residual stream waits for.
    pending: Option<MoeStep<'e>>,
}

impl<'s, 'b, 'e> MicroBatch<'s, 'b, 'e> {
    fn new(model: &Model, segments: &'s mut [Segment<'b>]) -> Self {
        let h = model.config.hidden_size;
        let mut spans = Vec::with_capacity(segments.len());
        let mut ntok = 0;
        for seg in segments.iter() {
            spans.push(Span { start: ntok, len: seg.tokens.len(), pos: seg.state.position });
            ntok += seg.tokens.len();
        }
        let mut x = vec![0f32; ntok * h];
        let ed = model.embed.data();
        for (row, &tok) in x.chunks_exact_mut(h).zip(segments.iter().flat_map(|s| s.tokens.iter())) {
            widen(&ed[tok as usize * h..(tok as usize + 1) * h], row);
        }
        MicroBatch { segments, spans, ntok, xn: vec![0f32; ntok * h], x, pending: None }
    }

    /// Adds the output of the MoE layer in flight, if any, to the residual stream.
    fn finish_mlp(&mut self) -> Result<()> {
        if let Some(step) = self.pending.take() {
            step.finish(&mut self.xn)?;
            for (a, b) in self.x.iter_mut().zip(&self.xn) {
                *a += b;
            }
        }
        Ok(())
    }

    /// Runs layer `i`'s mixer and starts its MLP (a dense MLP finishes here; a MoE one is left in flight).
    fn mixer_and_start_mlp(&mut self, model: &Model, i: usize, layer: &Layer, experts: &'e dyn Experts) -> Result<()> {
        let eps = model.config.rms_norm_eps as f32;
        rms_norm_offset_into(&self.x, &layer.input_norm, eps, &mut self.xn);
        let mut states: Vec<_> = self.segments.iter_mut().map(|s| &mut s.state.layers[i]).collect();
        let mixed = match &layer.mixer {
            Mixer::Attention(a) => a.forward(&self.xn, &self.spans, &mut states, &model.rope),
            Mixer::Linear(g) => g.forward(&self.xn, &self.spans, &mut states),
        };
        for (a, b) in self.x.iter_mut().zip(&mixed) {
            *a += b;
        }
        rms_norm_offset_into(&self.x, &layer.post_norm, eps, &mut self.xn);
        match &layer.mlp {
            Mlp::Moe(m) => self.pending = Some(m.start(i, &self.xn, self.ntok, experts)?),
            Mlp::Dense(d) => {
                let out = d.forward_dense(&self.xn, self.ntok);
                for (a, b) in self.x.iter_mut().zip(&out) {
                    *a += b;
                }
            }
        }
        Ok(())
    }

    /// Advances the segments' positions and returns the logits each asked for.
    fn logits(&mut self, model: &Model) -> Vec<Vec<f32>> {
        let (h, vocab) = (model.config.hidden_size, model.config.vocab_size);
        for (seg, span) in self.segments.iter_mut().zip(&self.spans) {
            seg.state.position += span.len;
        }
        // Gather the rows whose logits were asked for, then one LM-head matmul over all of them.
        let mut rows = Vec::new();
        for (seg, span) in self.segments.iter().zip(&self.spans) {
            rows.extend(seg.logits.rows(span.start, span.len));
        }
        let mut hs = Vec::with_capacity(rows.len() * h);
        for &r in &rows {
            hs.extend_from_slice(&self.x[r * h..(r + 1) * h]);
        }
        rms_norm_offset(&mut hs, &model.final_norm, model.config.rms_norm_eps as f32);
        let mut logits = vec![0f32; rows.len() * vocab];
        crate::cpu::profile::dense_matmul(&hs, rows.len(), &model.lm_head, &mut logits);
        let mut out = Vec::with_capacity(self.segments.len());
        let mut offset = 0;
        for (seg, span) in self.segments.iter().zip(&self.spans) {
            let n = seg.logits.rows(span.start, span.len).len();
            out.push(logits[offset * vocab..(offset + n) * vocab].to_vec());
            offset += n;
        }
        out
    }
}
