//! Per-sequence decode state: a KV cache for each full-attention layer and a fixed-size slot (conv window and fp32
//! recurrent state) for each Gated DeltaNet layer.
//!
//! Invariant: every layer's state describes exactly the first `position` tokens of the sequence. The forward pass
//! advances all layers and then `position` together; a failed forward leaves the state unusable (callers drop it).

use crate::config::{LayerKind, ModelConfig};

/// The state of one layer for one sequence.
#[derive(Debug, Clone)]
pub(crate) enum LayerState {
    Attention {
        /// Keys after k_norm and RoPE, `[position][nkv·hd]`.
        k: Vec<f32>,
        /// Values, `[position][nkv·hd]`.
        v: Vec<f32>,
    },
    Linear {
        /// The last K−1 pre-conv inputs, `[K−1][C]`, oldest first; zeros before the sequence starts.
        conv: Vec<f32>,
        /// Recurrent state `[Hv][dk][dv]`, fp32 as in the reference.
        s: Vec<f32>,
    },
}

/// Everything the model remembers about one sequence between forward calls.
#[derive(Debug, Clone)]
pub struct SequenceState {
    pub(crate) layers: Vec<LayerState>,
    pub(crate) position: usize,
    /// The [`crate::Model`] instance this state belongs to; a state is meaningless to any other model.
    pub(crate) model_id: u64,
}

impl SequenceState {
    pub(crate) fn new(cfg: &ModelConfig, model_id: u64) -> Self {
        let layers = cfg
            .layer_types
            .iter()
            .map(|kind| match kind {
                LayerKind::Full => LayerState::Attention { k: Vec::new(), v: Vec::new() },
                LayerKind::Linear => LayerState::Linear {
                    conv: vec![0.0; (cfg.linear_conv_kernel_dim - 1) * cfg.linear_conv_channels()],
                    s: vec![0.0; cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim],
                },
            })
            .collect();
        SequenceState { layers, position: 0, model_id }
    }

    /// Number of tokens the state has consumed (the position of the next token).
    pub fn position(&self) -> usize {
        self.position
    }

    /// Bytes of memory the state holds now.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Attention { k, v } => (k.len() + v.len()) * 4,
                LayerState::Linear { conv, s } => (conv.len() + s.len()) * 4,
            })
            .sum()
    }
}
