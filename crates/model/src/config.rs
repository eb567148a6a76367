//! `config.json` of the Qwen3-Next and Qwen3.5-MoE families, resolved to one [`ModelConfig`].
//!
//! Three published forms are accepted: flat `qwen3_next`, `qwen3_5_moe` with the text model under `text_config`, and
//! the text-only `qwen3_5_moe_text`. Absent keys take the defaults of the transformers 5.24 config classes, which
//! differ between the families (vocab, experts, top-k); legacy top-level `rope_theta` / `partial_rotary_factor` are
//! folded into `rope_parameters` as transformers does, and `layer_types` is derived from `full_attention_interval`
//! when absent.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// The model family, which decides the GDN projection layout, top-k renormalisation and which layers are MoE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `qwen3_next`: fused, grouped `in_proj_qkvz` / `in_proj_ba`; `norm_topk_prob`; optional dense layers.
    Qwen3Next,
    /// `qwen3_5_moe` / `qwen3_5_moe_text`: separate contiguous GDN projections; top-k always renormalised.
    Qwen35Moe,
}

/// The mixer of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Gated DeltaNet linear attention (`"linear_attention"`).
    Linear,
    /// Gated softmax attention with a KV cache (`"full_attention"`).
    Full,
}

/// The resolved text-model configuration. Field names follow config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub layer_types: Vec<LayerKind>,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// RoPE base, from `rope_parameters.rope_theta` or the legacy top-level key; 10000 when absent (transformers'
    /// default, which is wrong for the released models: they all set it).
    pub rope_theta: f64,
    pub partial_rotary_factor: f64,
    pub linear_num_key_heads: usize,
    pub linear_num_value_heads: usize,
    pub linear_key_head_dim: usize,
    pub linear_value_head_dim: usize,
    pub linear_conv_kernel_dim: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub shared_expert_intermediate_size: usize,
    /// Qwen3-Next only: the dense MLP width of non-MoE layers.
    pub intermediate_size: usize,
    /// Whether the top-k router weights are renormalised (always true for Qwen3.5).
    pub norm_topk_prob: bool,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub max_position_embeddings: usize,
    /// End-of-sequence ids named by config.json (generation_config.json may add more).
    pub eos_token_ids: Vec<u32>,
}

/// Every key is optional: absent keys take the family's default.
#[derive(Debug, Default, Deserialize)]
struct RawText {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    full_attention_interval: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rope_parameters: Option<RawRope>,
    rope_scaling: Option<RawRope>,
    linear_num_key_heads: Option<usize>,
    linear_num_value_heads: Option<usize>,
    linear_key_head_dim: Option<usize>,
    linear_value_head_dim: Option<usize>,
    linear_conv_kernel_dim: Option<usize>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    rms_norm_eps: Option<f64>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    max_position_embeddings: Option<usize>,
    eos_token_id: Option<Value>,
    hidden_act: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawRope {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
}

/// Class defaults of transformers 5.24 that differ between the two families.
struct FamilyDefaults {
    vocab_size: usize,
    num_hidden_layers: usize,
    num_experts: usize,
    num_experts_per_tok: usize,
}

impl Family {
    fn defaults(self) -> FamilyDefaults {
        match self {
            Family::Qwen3Next => {
                FamilyDefaults { vocab_size: 151_936, num_hidden_layers: 48, num_experts: 512, num_experts_per_tok: 10 }
            }
            Family::Qwen35Moe => {
                FamilyDefaults { vocab_size: 248_320, num_hidden_layers: 40, num_experts: 256, num_experts_per_tok: 8 }
            }
        }
    }
}

/// Parses an id or a list of ids (`eos_token_id` may be either).
pub(crate) fn token_ids(value: &Value) -> Option<Vec<u32>> {
    match value {
        Value::Number(n) => n.as_u64().and_then(|v| u32::try_from(v).ok()).map(|v| vec![v]),
        Value::Array(items) => items.iter().map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok())).collect(),
        _ => None,
    }
}

impl ModelConfig {
    /// Reads and resolves `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Resolves the text of a config.json; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let root: Value = serde_json::from_str(text).map_err(|e| ModelError::json(path, e))?;
        let model_type = root
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| ModelError::json(path, "missing string field `model_type`"))?
            .to_owned();
        let (family, text_value) = match model_type.as_str() {
            "qwen3_next" => (Family::Qwen3Next, root.clone()),
            "qwen3_5_moe_text" => (Family::Qwen35Moe, root.clone()),
            "qwen3_5_moe" => {
                // The multimodal wrapper: the text model lives under `text_config` (absent means all defaults).
                let mut text = root.get("text_config").cloned().unwrap_or(Value::Object(Default::default()));
                // eos / tie live at the top level in some exports; the text config wins when both exist.
                if let (Value::Object(t), Value::Object(r)) = (&mut text, &root) {
                    for key in ["eos_token_id", "tie_word_embeddings"] {
                        if !t.contains_key(key) {
                            if let Some(v) = r.get(key) {
                                t.insert(key.to_owned(), v.clone());
                            }
                        }
                    }
                }
                (Family::Qwen35Moe, text)
            }
            _ => return Err(ModelError::UnknownModelType { path: path.to_owned(), model_type }),
        };
        let raw: RawText = serde_json::from_value(text_value).map_err(|e| ModelError::json(path, e))?;
        if let Some(t) = &raw.model_type {
            if family == Family::Qwen35Moe && t != "qwen3_5_moe_text" && t != "qwen3_5_moe" {
                return Err(ModelError::UnknownModelType { path: path.to_owned(), model_type: t.clone() });
            }
        }
        resolve(family, raw, path)
    }

    pub fn linear_conv_channels(&self) -> usize {
        2 * self.linear_num_key_heads * self.linear_key_head_dim
            + self.linear_num_value_heads * self.linear_value_head_dim
    }

    /// The number of rotated dims per head, `int(head_dim * partial_rotary_factor)`.
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor) as usize
    }

    /// Bytes one routed expert (gate, up and down projections, held as bf16) takes on the node that hosts it.
    pub fn routed_expert_bytes(&self) -> usize {
        3 * self.hidden_size * self.moe_intermediate_size * 2
    }

    /// Returns whether layer `i` has the routed-experts MoE block (else a dense MLP, Qwen3-Next only).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        match self.family {
            Family::Qwen35Moe => true,
            Family::Qwen3Next => {
                !self.mlp_only_layers.contains(&i)
                    && self.num_experts > 0
                    && (i + 1).is_multiple_of(self.decoder_sparse_step.max(1))
            }
        }
    }
}

fn resolve(family: Family, raw: RawText, path: &Path) -> Result<ModelConfig> {
    let invalid = |message: String| ModelError::InvalidConfig { path: path.to_owned(), message };
    let d = family.defaults();
    let num_hidden_layers = raw.num_hidden_layers.unwrap_or(d.num_hidden_layers);
    // Checked before `layer_types` is derived from it: a layer count of 10^9 would otherwise build a 1 GB list.
    if num_hidden_layers > MAX_LAYERS {
        return Err(invalid(format!("num_hidden_layers ({num_hidden_layers}) is above {MAX_LAYERS}")));
    }
    let layer_types = match raw.layer_types {
        Some(types) => types
            .iter()
            .map(|t| match t.as_str() {
                "linear_attention" => Ok(LayerKind::Linear),
                "full_attention" => Ok(LayerKind::Full),
                other => Err(invalid(format!("layer_types: unknown layer type {other:?}"))),
            })
            .collect::<Result<Vec<_>>>()?,
        None => {
            let interval = raw.full_attention_interval.unwrap_or(4);
            if interval == 0 {
                return Err(invalid("full_attention_interval must be at least 1".into()));
            }
            (0..num_hidden_layers)
                .map(|i| if (i + 1).is_multiple_of(interval) { LayerKind::Full } else { LayerKind::Linear })
                .collect()
        }
    };
    // rope_parameters (5.x) or rope_scaling (4.x) carry theta and the partial factor; legacy top-level keys are
    // folded in when the dict lacks them, exactly as transformers' standardisation does.
    let rope = raw.rope_parameters.or(raw.rope_scaling).unwrap_or_default();
    if let Some(kind) = rope.rope_type.as_deref().or(rope.legacy_type.as_deref()) {
        if kind != "default" && kind != "mrope" {
            return Err(invalid(format!("rope_parameters.rope_type {kind:?} is not supported (only \"default\")")));
        }
    }
    let rope_theta = rope.rope_theta.or(raw.rope_theta).unwrap_or(10_000.0);
    let partial_rotary_factor = rope.partial_rotary_factor.or(raw.partial_rotary_factor).unwrap_or(0.25);
    if let Some(act) = &raw.hidden_act {
        if act != "silu" {
            return Err(invalid(format!("hidden_act {act:?} is not supported (only \"silu\")")));
        }
    }
    let eos_token_ids = match &raw.eos_token_id {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => {
            token_ids(v).ok_or_else(|| invalid(format!("eos_token_id: expected an id or a list of ids, got {v}")))?
        }
    };
    let cfg = ModelConfig {
        family,
        vocab_size: raw.vocab_size.unwrap_or(d.vocab_size),
        hidden_size: raw.hidden_size.unwrap_or(2048),
        num_hidden_layers,
        layer_types,
        num_attention_heads: raw.num_attention_heads.unwrap_or(16),
        num_key_value_heads: raw.num_key_value_heads.unwrap_or(2),
        head_dim: raw.head_dim.unwrap_or(256),
        rope_theta,
        partial_rotary_factor,
        linear_num_key_heads: raw.linear_num_key_heads.unwrap_or(16),
        linear_num_value_heads: raw.linear_num_value_heads.unwrap_or(32),
        linear_key_head_dim: raw.linear_key_head_dim.unwrap_or(128),
        linear_value_head_dim: raw.linear_value_head_dim.unwrap_or(128),
        linear_conv_kernel_dim: raw.linear_conv_kernel_dim.unwrap_or(4),
        num_experts: raw.num_experts.unwrap_or(d.num_experts),
        num_experts_per_tok: raw.num_experts_per_tok.unwrap_or(d.num_experts_per_tok),
        moe_intermediate_size: raw.moe_intermediate_size.unwrap_or(512),
        shared_expert_intermediate_size: raw.shared_expert_intermediate_size.unwrap_or(512),
        intermediate_size: raw.intermediate_size.unwrap_or(5632),
        norm_topk_prob: match family {
            Family::Qwen35Moe => true,
            Family::Qwen3Next => raw.norm_topk_prob.unwrap_or(true),
        },
        decoder_sparse_step: raw.decoder_sparse_step.unwrap_or(1),
        mlp_only_layers: raw.mlp_only_layers.unwrap_or_default(),
        rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        attention_bias: raw.attention_bias.unwrap_or(false),
        max_position_embeddings: raw.max_position_embeddings.unwrap_or(32_768),
        eos_token_ids,
    };
    cfg.validate(path)?;
    Ok(cfg)
}

/// The most decoder layers a config may name (released models have at most 94).
pub const MAX_LAYERS: usize = 1024;
/// The most routed experts a config may name (released models have at most 512).
pub const MAX_EXPERTS: usize = 1 << 16;
/// The largest width (vocabulary, hidden, intermediate sizes) a config may name. With every size bounded, the
/// products the loader and the state take (`heads × head_dim`, `experts × width × hidden`) fit in 64 bits.
pub const MAX_WIDTH: usize = 1 << 20;
/// The largest head count or per-head dimension.
pub const MAX_HEAD: usize = 1 << 12;

impl ModelConfig {
    /// Checks the relations between fields that the forward pass relies on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let fail = |message: String| Err(ModelError::InvalidConfig { path: PathBuf::from(path), message });
        let bounded = [
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_experts", self.num_experts, MAX_EXPERTS),
            ("vocab_size", self.vocab_size, MAX_WIDTH),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("moe_intermediate_size", self.moe_intermediate_size, MAX_WIDTH),
            ("shared_expert_intermediate_size", self.shared_expert_intermediate_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH),
            ("num_attention_heads", self.num_attention_heads, MAX_HEAD),
            ("num_key_value_heads", self.num_key_value_heads, MAX_HEAD),
            ("head_dim", self.head_dim, MAX_HEAD),
            ("linear_num_key_heads", self.linear_num_key_heads, MAX_HEAD),
            ("linear_num_value_heads", self.linear_num_value_heads, MAX_HEAD),
            ("linear_key_head_dim", self.linear_key_head_dim, MAX_HEAD),
            ("linear_value_head_dim", self.linear_value_head_dim, MAX_HEAD),
            ("linear_conv_kernel_dim", self.linear_conv_kernel_dim, MAX_HEAD),
            ("decoder_sparse_step", self.decoder_sparse_step, MAX_LAYERS),
        ];
        for (name, v, max) in bounded {
            if v > max {
                return fail(format!("{name} ({v}) is above {max}"));
            }
        }
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("linear_num_key_heads", self.linear_num_key_heads),
            ("linear_num_value_heads", self.linear_num_value_heads),
            ("linear_key_head_dim", self.linear_key_head_dim),
            ("linear_value_head_dim", self.linear_value_head_dim),
            ("linear_conv_kernel_dim", self.linear_conv_kernel_dim),
        ];
        for (name, v) in positive {
            if v == 0 {
                return fail(format!("{name} must be positive"));
            }
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return fail(format!(
                "layer_types has {} entries but num_hidden_layers is {}",
                self.layer_types.len(),
                self.num_hidden_layers
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return fail(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.linear_num_value_heads.is_multiple_of(self.linear_num_key_heads) {
            return fail(format!(
                "linear_num_value_heads ({}) is not a multiple of linear_num_key_heads ({})",
                self.linear_num_value_heads, self.linear_num_key_heads
            ));
        }
        let r = self.rotary_dim();
        if !r.is_multiple_of(2) || r > self.head_dim {
            return fail(format!(
                "rotary dim int(head_dim * partial_rotary_factor) = {r} must be even and at most head_dim"
            ));
        }
        if self.family == Family::Qwen35Moe && self.num_experts == 0 {
            return fail("num_experts must be positive (every Qwen3.5-MoE layer is a MoE layer)".into());
        }
        if self.num_experts > 0 && (self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts) {
            return fail(format!(
                "num_experts_per_tok ({}) must be in 1..=num_experts ({})",
                self.num_experts_per_tok, self.num_experts
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return fail(format!("rope_theta must be a positive number, got {}", self.rope_theta));
        }
        if self.attention_bias {
            return fail("attention_bias = true is not supported (no released model uses it)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(text, Path::new("config.json"))
    }

    #[test]
    fn qwen35_defaults_and_text_config() {
        let c = parse(r#"{"model_type":"qwen3_5_moe","text_config":{"num_hidden_layers":8,"rope_parameters":{"rope_type":"default","rope_theta":1e7,"partial_rotary_factor":0.25,"mrope_section":[11,11,10],"mrope_interleaved":true}},"eos_token_id":7}"#).expect("valid config");
        assert_eq!(c.family, Family::Qwen35Moe);
        assert_eq!(c.vocab_size, 248_320);
        assert_eq!(c.num_experts, 256);
        assert_eq!(c.num_experts_per_tok, 8);
        assert_eq!(c.rope_theta, 1e7);
        assert_eq!(c.rotary_dim(), 64);
        assert_eq!(c.eos_token_ids, vec![7]);
        let full: Vec<usize> = (0..8).filter(|&i| c.layer_types[i] == LayerKind::Full).collect();
        assert_eq!(full, vec![3, 7]);
    }

    #[test]
    fn qwen3_next_legacy_keys_and_defaults() {
        let c = parse(r#"{"model_type":"qwen3_next","num_hidden_layers":4,"rope_theta":5e6,"partial_rotary_factor":0.5,"norm_topk_prob":false}"#).expect("valid config");
        assert_eq!(c.family, Family::Qwen3Next);
        assert_eq!(c.vocab_size, 151_936);
        assert_eq!(c.num_experts, 512);
        assert_eq!(c.num_experts_per_tok, 10);
        assert_eq!(c.rope_theta, 5e6);
        assert_eq!(c.rotary_dim(), 128);
        assert!(!c.norm_topk_prob);
    }

    #[test]
    fn rope_theta_defaults_to_ten_thousand() {
        let c = parse(r#"{"model_type":"qwen3_5_moe_text","num_hidden_layers":4}"#).expect("valid config");
        assert_eq!(c.rope_theta, 10_000.0);
        assert!(c.norm_topk_prob);
    }

    #[test]
    fn explicit_layer_types_win() {
        let c = parse(r#"{"model_type":"qwen3_5_moe_text","num_hidden_layers":2,"layer_types":["full_attention","linear_attention"]}"#).expect("valid config");
        assert_eq!(c.layer_types, vec![LayerKind::Full, LayerKind::Linear]);
    }

    #[test]
    fn rejects_unknown_and_inconsistent() {
        let e = parse(r#"{"model_type":"llama"}"#).expect_err("unknown type");
        assert!(e.to_string().contains("llama"), "{e}");
        let e = parse(r#"{"model_type":"qwen3_next","num_hidden_layers":3,"layer_types":["full_attention"]}"#)
            .expect_err("bad layer_types");
        assert!(e.to_string().contains("layer_types"), "{e}");
        let e = parse(r#"{"model_type":"qwen3_next","num_attention_heads":3}"#).expect_err("bad heads");
        assert!(e.to_string().contains("num_key_value_heads"), "{e}");
        let e = parse(r#"{"model_type":"qwen3_5_moe_text","num_experts":0}"#).expect_err("no experts");
        assert!(e.to_string().contains("num_experts"), "{e}");
        let e = parse(r#"{"model_type":"qwen3_next","num_experts":4,"num_experts_per_tok":5}"#).expect_err("top-k > E");
        assert!(e.to_string().contains("num_experts_per_tok"), "{e}");
        let e = parse("{not json").expect_err("bad json");
        assert!(e.to_string().contains("config.json"), "{e}");
    }

    /// Sizes past any model's are refused before anything is built from them (a fuzzed config once named
    /// 10^9 layers and spent 13 s and 2 GB deriving their types).
    #[test]
    fn rejects_sizes_past_any_model() {
        let t = std::time::Instant::now();
        let e = parse(r#"{"model_type":"qwen3_5_moe_text","num_hidden_layers":1000000000}"#).expect_err("layers");
        assert!(e.to_string().contains("num_hidden_layers (1000000000) is above 1024"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(1), "refused only after {:?}", t.elapsed());
        for (key, value) in [("hidden_size", 1u64 << 21), ("num_experts", 1 << 17), ("head_dim", 1 << 13)] {
            let e = parse(&format!(r#"{{"model_type":"qwen3_5_moe_text","{key}":{value}}}"#)).expect_err(key);
            assert!(e.to_string().contains(&format!("{key} ({value}) is above")), "{e}");
        }
        parse(r#"{"model_type":"qwen3_5_moe_text","num_hidden_layers":1024}"#).expect("1024 layers is allowed");
    }
}
