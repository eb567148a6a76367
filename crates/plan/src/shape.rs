//! What one token costs in a model, from its config alone: parameters and bytes of each kind of weight, the work of
//! each stage of a step, what a sequence holds, and what crosses the wire. Weights are held as bf16 (2 bytes), the
//! KV cache and the Gated DeltaNet state as f32, as the engine holds them.

use moe_model::{Family, LayerKind, ModelConfig};

/// Bytes of one weight.
pub const WEIGHT_BYTES: f64 = 2.0;
/// Bytes of one cached or state value.
pub const STATE_BYTES: f64 = 4.0;
/// The chunk length of the chunked delta rule (its intra-chunk work grows with it).
pub const DELTA_CHUNK: f64 = 32.0;

/// The shapes of a model that its costs depend on.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub hidden: usize,
    pub vocab: usize,
    pub tied_embeddings: bool,
    pub full_layers: usize,
    pub linear_layers: usize,
    pub moe_layers: usize,
    pub experts: usize,
    pub top_k: usize,
    pub expert_width: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub value_heads: usize,
    pub key_head_dim: usize,
    pub value_head_dim: usize,
    pub conv_kernel: usize,
    pub conv_channels: usize,
    /// Dense weights a step reads whatever the batch (attention and DeltaNet projections, shared experts, router
    /// gates, dense MLPs), without the embedding table and the LM head.
    pub dense_params: usize,
}

impl Shape {
    pub fn of(c: &ModelConfig) -> Shape {
        let h = c.hidden_size;
        let mut dense = 0usize;
        let mut moe_layers = 0;
        for (i, kind) in c.layer_types.iter().enumerate() {
            dense += match kind {
                // q_proj carries the output gate: 2·heads·head_dim rows.
                LayerKind::Full => {
                    let q = 2 * c.num_attention_heads * c.head_dim * h;
                    let kv = 2 * c.num_key_value_heads * c.head_dim * h;
                    let o = c.num_attention_heads * c.head_dim * h;
                    q + kv + o
                }
                LayerKind::Linear => {
                    let vd = c.linear_num_value_heads * c.linear_value_head_dim;
                    // qkv, z, b and a in; out back to hidden.
                    c.linear_conv_channels() * h + vd * h + 2 * c.linear_num_value_heads * h + h * vd
                }
            };
            if c.is_moe_layer(i) {
                moe_layers += 1;
                // Router gate, shared expert (gate, up, down) and its scalar gate.
                dense += c.num_experts * h + 3 * h * c.shared_expert_intermediate_size + h;
            } else if c.family == Family::Qwen3Next {
                dense += 3 * h * c.intermediate_size;
            }
        }
        let count = |k: LayerKind| c.layer_types.iter().filter(|&&t| t == k).count();
        Shape {
            hidden: h,
            vocab: c.vocab_size,
            tied_embeddings: c.tie_word_embeddings,
            full_layers: count(LayerKind::Full),
            linear_layers: count(LayerKind::Linear),
            moe_layers,
            experts: c.num_experts,
            top_k: c.num_experts_per_tok,
            expert_width: c.moe_intermediate_size,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            value_heads: c.linear_num_value_heads,
            key_head_dim: c.linear_key_head_dim,
            value_head_dim: c.linear_value_head_dim,
            conv_kernel: c.linear_conv_kernel_dim,
            conv_channels: c.linear_conv_channels(),
            dense_params: dense,
        }
    }

    /// Bytes of one routed expert (gate, up and down).
    pub fn expert_bytes(&self) -> f64 {
        3.0 * (self.hidden * self.expert_width) as f64 * WEIGHT_BYTES
    }

    /// Bytes of all routed experts of all MoE layers.
    pub fn all_expert_bytes(&self) -> f64 {
        self.expert_bytes() * (self.experts * self.moe_layers) as f64
    }

    /// Bytes of the LM head (read by any step that asks for logits).
    pub fn lm_head_bytes(&self) -> f64 {
        (self.vocab * self.hidden) as f64 * WEIGHT_BYTES
    }

    /// Bytes a router holds for the weights it computes with: dense layers, embeddings and the LM head (one table
    /// when tied).
    pub fn router_weight_bytes(&self) -> f64 {
        let tables = if self.tied_embeddings { 1.0 } else { 2.0 };
        self.dense_params as f64 * WEIGHT_BYTES + tables * self.lm_head_bytes()
    }

    /// Cache bytes per token of context (keys and values of every full-attention layer).
    pub fn kv_bytes_per_token(&self) -> f64 {
        (2 * self.kv_heads * self.head_dim * self.full_layers) as f64 * STATE_BYTES
    }

    /// Bytes of one sequence's fixed Gated DeltaNet slot: the delta-rule state and the conv window of every linear
    /// layer.
    pub fn deltanet_slot_bytes(&self) -> f64 {
        let state = self.value_heads * self.key_head_dim * self.value_head_dim;
        let conv = self.conv_kernel.saturating_sub(1) * self.conv_channels;
        ((state + conv) * self.linear_layers) as f64 * STATE_BYTES
    }

    /// FLOPs of the dense matmuls for `tokens` tokens of which `logits` ask for the LM head.
    pub fn dense_flops(&self, tokens: f64, logits: f64) -> f64 {
        2.0 * self.dense_params as f64 * tokens + 2.0 * (self.vocab * self.hidden) as f64 * logits
    }

    /// FLOPs of the routed experts for `pairs` (token, expert) pairs, over all MoE layers.
    pub fn expert_flops(&self, pairs: f64) -> f64 {
        6.0 * (self.hidden * self.expert_width) as f64 * pairs * self.moe_layers as f64
    }

    /// FLOPs of the recurrent delta rule for `tokens` single-token steps (decay, predict, correct, read: four
    /// products with the state per token and head).
    pub fn delta_recurrent_flops(&self, tokens: f64) -> f64 {
        8.0 * (self.value_heads * self.key_head_dim * self.value_head_dim * self.linear_layers) as f64 * tokens
    }

    /// Bytes of state the recurrent delta rule reads and writes for `tokens` single-token steps.
    pub fn delta_recurrent_bytes(&self, tokens: f64) -> f64 {
        2.0 * (self.value_heads * self.key_head_dim * self.value_head_dim * self.linear_layers) as f64
            * STATE_BYTES
            * tokens
    }

    /// FLOPs of the chunked delta rule for `tokens` prompt tokens: the inter-chunk products with the state and the
    /// intra-chunk triangles.
    pub fn delta_chunked_flops(&self, tokens: f64) -> f64 {
        let (dk, dv) = (self.key_head_dim as f64, self.value_head_dim as f64);
        let per_head = 8.0 * dk * dv + 2.0 * DELTA_CHUNK * (2.0 * dk + dv);
        per_head * (self.value_heads * self.linear_layers) as f64 * tokens
    }

    /// FLOPs of the attention core over `context` (the sum, over the step's tokens, of the positions each attends
    /// to).
    pub fn attention_flops(&self, context: f64) -> f64 {
        4.0 * (self.heads * self.head_dim * self.full_layers) as f64 * context
    }

    /// Cache bytes the attention core reads for decode tokens attending to `context` positions in all.
    pub fn attention_bytes(&self, decode_context: f64) -> f64 {
        self.kv_bytes_per_token() * decode_context
    }

    /// Bytes on the wire per MoE layer for `tokens` tokens sent to nodes holding `pairs` of their expert choices,
    /// each token to `sends` nodes on average: activations out (one row per token and node), routing (an id and a
    /// weight per pair), one answer row per pair back. `value_bytes` is the wire dtype's size (4 for f32).
    pub fn wire_bytes_per_layer(&self, sends: f64, pairs: f64, value_bytes: f64) -> (f64, f64) {
        let out = sends * self.hidden as f64 * value_bytes + pairs * 8.0;
        let back = pairs * self.hidden as f64 * value_bytes;
        (out, back)
    }
}
