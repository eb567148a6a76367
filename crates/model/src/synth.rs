//! Random-weight models in the official Qwen3.5 layout, for tests, demos, benchmarks and capacity planning.
//!
//! [`write_model`] writes what a published Qwen3.5-MoE checkpoint holds: `config.json` with the text model under
//! `text_config`, bf16 tensors under `model.language_model.` with fused experts (`gate_up_proj` `[E, 2I, H]`,
//! `down_proj` `[E, H, I]`), shards with `model.safetensors.index.json` above the shard size, a byte-level BPE
//! `tokenizer.json`, a ChatML `chat_template.jinja`, `tokenizer_config.json` and `generation_config.json`.
//! Tensors are streamed to disk in chunks generated in parallel, so memory stays flat for models of any size, and the
//! same seed gives the same bytes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::error::{ModelError, Result};

/// The models `init-model` can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// A few hundred kB: unit and end-to-end tests.
    Tiny,
    /// About 230 MB: the default model of the local cluster; loads in about a second.
    Demo,
    /// About 4.3 GB: hidden 2048, 8 layers (3 linear : 1 full), 64 experts top-8 of width 512; the benchmark model.
    Bench,
    /// The shapes of Qwen3.5-35B-A3B (40 layers, 256 experts top-8).
    Qwen35_35bA3b,
    /// The shapes of Qwen3.5-397B-A17B (60 layers, 512 experts top-10).
    Qwen35_397bA17b,
}

impl Preset {
    pub const ALL: [Preset; 5] =
        [Preset::Tiny, Preset::Demo, Preset::Bench, Preset::Qwen35_35bA3b, Preset::Qwen35_397bA17b];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Demo => "demo",
            Preset::Bench => "bench",
            Preset::Qwen35_35bA3b => "qwen3.5-35b-a3b",
            Preset::Qwen35_397bA17b => "qwen3.5-397b-a17b",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The text config of the preset (all shape fields explicit).
    fn shape(self) -> Shape {
        match self {
            Preset::Tiny => Shape {
                vocab: 512,
                hidden: 64,
                layers: 4,
                heads: 4,
                kv_heads: 2,
                head_dim: 32,
                lin_k_heads: 2,
                lin_v_heads: 4,
                lin_k_dim: 16,
                lin_v_dim: 24,
                experts: 8,
                top_k: 2,
                expert_inter: 32,
                shared_inter: 32,
            },
            Preset::Demo => Shape {
                vocab: 8192,
                hidden: 512,
                layers: 8,
                heads: 8,
                kv_heads: 2,
                head_dim: 64,
                lin_k_heads: 4,
                lin_v_heads: 8,
                lin_k_dim: 64,
                lin_v_dim: 64,
                experts: 32,
                top_k: 4,
                expert_inter: 256,
                shared_inter: 256,
            },
            Preset::Bench => Shape {
                vocab: 32000,
                hidden: 2048,
                layers: 8,
                heads: 16,
                kv_heads: 2,
                head_dim: 256,
                lin_k_heads: 16,
                lin_v_heads: 32,
                lin_k_dim: 128,
                lin_v_dim: 128,
                experts: 64,
                top_k: 8,
                expert_inter: 512,
                shared_inter: 512,
            },
            Preset::Qwen35_35bA3b => Shape {
                vocab: 248_320,
                hidden: 2048,
                layers: 40,
                heads: 16,
                kv_heads: 2,
                head_dim: 256,
                lin_k_heads: 16,
                lin_v_heads: 32,
                lin_k_dim: 128,
                lin_v_dim: 128,
                experts: 256,
                top_k: 8,
                expert_inter: 512,
                shared_inter: 512,
            },
            Preset::Qwen35_397bA17b => Shape {
                vocab: 248_320,
                hidden: 4096,
                layers: 60,
                heads: 32,
                kv_heads: 2,
                head_dim: 256,
                lin_k_heads: 16,
                lin_v_heads: 64,
                lin_k_dim: 128,
                lin_v_dim: 128,
                experts: 512,
                top_k: 10,
                expert_inter: 1024,
                shared_inter: 1024,
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Shape {
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    lin_k_heads: usize,
    lin_v_heads: usize,
    lin_k_dim: usize,
    lin_v_dim: usize,
    experts: usize,
    top_k: usize,
    expert_inter: usize,
    shared_inter: usize,
}

const CONV_KERNEL: usize = 4;
const FULL_ATTENTION_INTERVAL: usize = 4;
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// Values generated per parallel task.
const CHUNK_ELEMS: usize = 1 << 20;

/// What to write.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub preset: Preset,
    /// Overrides the preset's layer count (keeps the 3 linear : 1 full pattern).
    pub layers: Option<usize>,
    pub seed: u64,
    /// Largest shard; a model above it is split into `model-0000i-of-0000n.safetensors` with an index.
    pub max_shard_bytes: u64,
    /// Biases the gating towards a tenth of each layer's experts (a contiguous block at a layer-dependent offset):
    /// the embeddings get a common direction and those experts' gate rows a shift of `router_skew / hidden` along
    /// it. 0 leaves the gating unbiased; about 2 sends half the tokens to the hot tenth. For load-balancing
    /// benchmarks: real models' routing is skewed too.
    pub router_skew: f32,
}

impl SynthOptions {
    pub fn new(preset: Preset) -> Self {
        SynthOptions { preset, layers: None, seed: 0, max_shard_bytes: 4 << 30, router_skew: 0.0 }
    }
}

/// How a tensor's values are drawn: uniform with this mean and standard deviation.
#[derive(Debug, Clone, Copy)]
struct Init {
    mean: f32,
    std: f32,
    /// `A_log`: ln(U(1, 16)), as transformers initialises it.
    log_uniform_a: bool,
    /// Rows `hot.0 .. hot.0 + hot.1` (wrapping at `hot.2` rows of `hot.3` columns) get `hot.4` added.
    hot: Option<(usize, usize, usize, usize, f32)>,
}

impl Init {
    const fn plain(mean: f32, std: f32) -> Self {
        Init { mean, std, log_uniform_a: false, hot: None }
    }
}

/// The hot experts of `layer` under `router_skew`: a tenth of them, from a layer-dependent offset.
pub fn hot_experts(layer: usize, num_experts: usize) -> (usize, usize) {
    ((layer * 7) % num_experts.max(1), num_experts.div_ceil(10))
}

#[derive(Debug, Clone)]
struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

impl TensorSpec {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SynthSummary {
    pub files: Vec<PathBuf>,
    pub tensor_bytes: u64,
    pub parameters: u64,
}

fn layer_is_full(i: usize) -> bool {
    (i + 1).is_multiple_of(FULL_ATTENTION_INTERVAL)
}

fn tensors(s: &Shape, router_skew: f32) -> Vec<TensorSpec> {
    let mat = |name: String, shape: Vec<usize>| {
        let fan_in = *shape.last().unwrap_or(&1) as f32;
        TensorSpec { name, shape, init: Init::plain(0.0, 1.0 / fan_in.sqrt()) }
    };
    let vec_init = |name: String, len: usize, mean: f32, std: f32| TensorSpec {
        name,
        shape: vec![len],
        init: Init::plain(mean, std),
    };
    let p = "model.language_model.";
    let h = s.hidden;
    let mut out = vec![
        TensorSpec {
            name: format!("{p}embed_tokens.weight"),
            shape: vec![s.vocab, h],
            init: Init::plain(if router_skew != 0.0 { 1.0 } else { 0.0 }, 1.0),
        },
        vec_init(format!("{p}norm.weight"), h, 0.0, 0.1),
    ];
    let conv_ch = 2 * s.lin_k_heads * s.lin_k_dim + s.lin_v_heads * s.lin_v_dim;
    for i in 0..s.layers {
        let l = format!("{p}layers.{i}.");
        out.push(vec_init(format!("{l}input_layernorm.weight"), h, 0.0, 0.1));
        out.push(vec_init(format!("{l}post_attention_layernorm.weight"), h, 0.0, 0.1));
        if layer_is_full(i) {
            let a = format!("{l}self_attn.");
            out.push(mat(format!("{a}q_proj.weight"), vec![2 * s.heads * s.head_dim, h]));
            out.push(mat(format!("{a}k_proj.weight"), vec![s.kv_heads * s.head_dim, h]));
            out.push(mat(format!("{a}v_proj.weight"), vec![s.kv_heads * s.head_dim, h]));
            out.push(mat(format!("{a}o_proj.weight"), vec![h, s.heads * s.head_dim]));
            out.push(vec_init(format!("{a}q_norm.weight"), s.head_dim, 0.0, 0.1));
            out.push(vec_init(format!("{a}k_norm.weight"), s.head_dim, 0.0, 0.1));
        } else {
            let a = format!("{l}linear_attn.");
            out.push(mat(format!("{a}in_proj_qkv.weight"), vec![conv_ch, h]));
            out.push(mat(format!("{a}in_proj_z.weight"), vec![s.lin_v_heads * s.lin_v_dim, h]));
            out.push(mat(format!("{a}in_proj_b.weight"), vec![s.lin_v_heads, h]));
            out.push(mat(format!("{a}in_proj_a.weight"), vec![s.lin_v_heads, h]));
            out.push(mat(format!("{a}conv1d.weight"), vec![conv_ch, 1, CONV_KERNEL]));
            out.push(vec_init(format!("{a}dt_bias"), s.lin_v_heads, 1.0, 0.1));
            out.push(TensorSpec {
                name: format!("{a}A_log"),
                shape: vec![s.lin_v_heads],
                init: Init { mean: 0.0, std: 0.0, log_uniform_a: true, hot: None },
            });
            out.push(vec_init(format!("{a}norm.weight"), s.lin_v_dim, 1.0, 0.1));
            out.push(mat(format!("{a}out_proj.weight"), vec![h, s.lin_v_heads * s.lin_v_dim]));
        }
        let m = format!("{l}mlp.");
        let mut gate = mat(format!("{m}gate.weight"), vec![s.experts, h]);
        if router_skew != 0.0 {
            let (first, count) = hot_experts(i, s.experts);
            gate.init.hot = Some((first, count, s.experts, h, router_skew / h as f32));
        }
        out.push(gate);
        out.push(mat(format!("{m}experts.gate_up_proj"), vec![s.experts, 2 * s.expert_inter, h]));
        out.push(mat(format!("{m}experts.down_proj"), vec![s.experts, h, s.expert_inter]));
        out.push(mat(format!("{m}shared_expert.gate_proj.weight"), vec![s.shared_inter, h]));
        out.push(mat(format!("{m}shared_expert.up_proj.weight"), vec![s.shared_inter, h]));
        out.push(mat(format!("{m}shared_expert.down_proj.weight"), vec![h, s.shared_inter]));
        out.push(mat(format!("{m}shared_expert_gate.weight"), vec![1, h]));
    }
    out.push(mat("lm_head.weight".into(), vec![s.vocab, h]));
    out
}

fn config_json(s: &Shape, eos: u32, pad: u32) -> Value {
    let layer_types: Vec<&str> =
        (0..s.layers).map(|i| if layer_is_full(i) { "full_attention" } else { "linear_attention" }).collect();
    json!({
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "tie_word_embeddings": false,
        "text_config": {
            "model_type": "qwen3_5_moe_text",
            "vocab_size": s.vocab,
            "hidden_size": s.hidden,
            "num_hidden_layers": s.layers,
            "layer_types": layer_types,
            "full_attention_interval": FULL_ATTENTION_INTERVAL,
            "num_attention_heads": s.heads,
            "num_key_value_heads": s.kv_heads,
            "head_dim": s.head_dim,
            "linear_num_key_heads": s.lin_k_heads,
            "linear_num_value_heads": s.lin_v_heads,
            "linear_key_head_dim": s.lin_k_dim,
            "linear_value_head_dim": s.lin_v_dim,
            "linear_conv_kernel_dim": CONV_KERNEL,
            "num_experts": s.experts,
            "num_experts_per_tok": s.top_k,
            "moe_intermediate_size": s.expert_inter,
            "shared_expert_intermediate_size": s.shared_inter,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "max_position_embeddings": 262_144,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10_000_000.0,
                "partial_rotary_factor": 0.25,
                "mrope_section": [11, 11, 10],
                "mrope_interleaved": true
            },
            "attn_output_gate": true,
            "mamba_ssm_dtype": "float32",
            "tie_word_embeddings": false,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "dtype": "bfloat16"
        }
    })
}

/// GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to code points from 256 on.
fn byte_alphabet() -> Vec<char> {
    let mut table = vec!['\0'; 256];
    let mut extra = 0u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        *slot = if printable {
            char::from(b as u8)
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('?')
        };
    }
    table
}

/// A byte-level BPE tokenizer.json with `vocab` ids: 256 byte tokens, merges that build `Ġ`-prefixed and lowercase
/// strings until the vocabulary is full, then the three ChatML special tokens.
fn tokenizer_json(vocab: usize) -> (Value, u32, u32) {
    let bytes = byte_alphabet();
    let mut vocab_map = serde_json::Map::new();
    let mut merges: Vec<Value> = Vec::new();
    for (i, c) in bytes.iter().enumerate() {
        vocab_map.insert(c.to_string(), json!(i));
    }
    let target = vocab.saturating_sub(SPECIALS.len());
    let letters: Vec<char> = ('a'..='z').collect();
    let mut frontier: Vec<String> = std::iter::once('Ġ').chain(letters.iter().copied()).map(String::from).collect();
    let mut next_id = bytes.len();
    'grow: while next_id < target {
        let mut next = Vec::new();
        for prefix in &frontier {
            for &c in &letters {
                if next_id >= target {
                    break 'grow;
                }
                let word = format!("{prefix}{c}");
                merges.push(json!([prefix, c.to_string()]));
                vocab_map.insert(word.clone(), json!(next_id));
                next_id += 1;
                next.push(word);
            }
        }
        frontier = next;
    }
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": next_id + i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab_map, "merges": merges
        }
    });
    (tok, (next_id + 2) as u32, next_id as u32)
}

const CHAT_TEMPLATE: &str = "{%- for message in messages %}\n{{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n{{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

/// Returns the bytes the preset's tensors take (for planning disk space before writing).
pub fn tensor_bytes(opts: &SynthOptions) -> u64 {
    let mut s = opts.preset.shape();
    if let Some(l) = opts.layers {
        s.layers = l;
    }
    tensors(&s, 0.0).iter().map(|t| t.numel() as u64 * 2).sum()
}

/// Writes the model into `out` (created if needed); `progress(done, total)` is called as tensor bytes are written.
pub fn write_model(out: &Path, opts: &SynthOptions, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<SynthSummary> {
    let mut shape = opts.preset.shape();
    if let Some(layers) = opts.layers {
        if layers == 0 {
            return Err(ModelError::InvalidInput("--layers must be at least 1".into()));
        }
        shape.layers = layers;
    }
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let write_json = |name: &str, v: &Value| -> Result<()> {
        let path = out.join(name);
        let text = serde_json::to_string_pretty(v).map_err(|e| ModelError::json(&path, e))?;
        std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))
    };
    let (tok, eos, pad) = tokenizer_json(shape.vocab);
    write_json("tokenizer.json", &tok)?;
    write_json("config.json", &config_json(&shape, eos, pad))?;
    write_json(
        "tokenizer_config.json",
        &json!({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 262_144,
                "tokenizer_class": "Qwen2Tokenizer"}),
    )?;
    write_json(
        "generation_config.json",
        &json!({"eos_token_id": [eos, pad], "pad_token_id": pad, "do_sample": true, "temperature": 0.7,
                "top_p": 0.8, "top_k": 20}),
    )?;
    let chat_path = out.join("chat_template.jinja");
    std::fs::write(&chat_path, CHAT_TEMPLATE).map_err(|e| ModelError::io(&chat_path, e))?;

    let specs = tensors(&shape, opts.router_skew);
    let total: u64 = specs.iter().map(|t| t.numel() as u64 * 2).sum();
    // Greedy sharding in tensor order.
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut shard_bytes = 0u64;
    for (i, t) in specs.iter().enumerate() {
        let b = t.numel() as u64 * 2;
        if shard_bytes > 0 && shard_bytes + b > opts.max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        if let Some(shard) = shards.last_mut() {
            shard.push(i);
        }
        shard_bytes += b;
    }
    let n = shards.len();
    let mut files = Vec::with_capacity(n);
    let mut weight_map = serde_json::Map::new();
    let mut done = 0u64;
    for (si, members) in shards.iter().enumerate() {
        let fname = if n == 1 {
            crate::weights::SINGLE_FILE.to_owned()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", si + 1, n)
        };
        let path = out.join(&fname);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut offset = 0usize;
        for &i in members {
            let t = &specs[i];
            let len = t.numel() * 2;
            header.insert(
                t.name.clone(),
                json!({"dtype": "BF16", "shape": t.shape, "data_offsets": [offset, offset + len]}),
            );
            offset += len;
            weight_map.insert(t.name.clone(), json!(fname));
        }
        let mut header = serde_json::to_vec(&Value::Object(header)).map_err(|e| ModelError::json(&path, e))?;
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        let file = File::create(&path).map_err(|e| ModelError::io(&path, e))?;
        let mut w = BufWriter::with_capacity(8 << 20, file);
        let io = |e| ModelError::io(&path, e);
        w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for &i in members {
            let t = &specs[i];
            let numel = t.numel();
            let chunks = numel.div_ceil(CHUNK_ELEMS);
            // Generate 64 chunks at a time in parallel, then write them in order.
            for group in (0..chunks).collect::<Vec<_>>().chunks(64) {
                let bufs: Vec<Vec<u8>> = group
                    .par_iter()
                    .map(|&c| {
                        let len = CHUNK_ELEMS.min(numel - c * CHUNK_ELEMS);
                        fill_chunk(opts.seed, i as u64, c as u64, len, t.init)
                    })
                    .collect();
                for b in &bufs {
                    w.write_all(b).map_err(io)?;
                    done += b.len() as u64;
                }
                progress(done, total);
            }
        }
        w.flush().map_err(io)?;
        files.push(path);
    }
    if n > 1 {
        write_json(crate::weights::INDEX_FILE, &json!({"metadata": {"total_size": total}, "weight_map": weight_map}))?;
    }
    Ok(SynthSummary { files, tensor_bytes: total, parameters: total / 2 })
}

/// Draws one chunk of a tensor as little-endian bf16 bytes, from a generator seeded by (seed, tensor, chunk).
fn fill_chunk(seed: u64, tensor: u64, chunk: u64, len: usize, init: Init) -> Vec<u8> {
    let mix = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(tensor.wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
        .wrapping_add(chunk.wrapping_mul(0x1656_67B1_9E37_79F9));
    let mut rng = StdRng::seed_from_u64(mix);
    let half_width = init.std * 3f32.sqrt();
    let mut out = Vec::with_capacity(len * 2);
    for j in 0..len {
        let mut v = if init.log_uniform_a {
            rng.random_range(1.0f32..16.0).ln()
        } else {
            init.mean + half_width * (rng.random::<f32>() * 2.0 - 1.0)
        };
        if let Some((first, count, rows, cols, shift)) = init.hot {
            let row = (chunk as usize * CHUNK_ELEMS + j) / cols.max(1);
            if (row + rows - first) % rows.max(1) < count {
                v += shift;
            }
        }
        out.extend_from_slice(&bf16::from_f32(v).to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_fills_vocab_and_round_trips() {
        for vocab in [512, 8192] {
            let (tok, eos, pad) = tokenizer_json(vocab);
            let t =
                tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&tok).expect("json")).expect("valid tokenizer");
            assert_eq!(t.get_vocab_size(true), vocab);
            assert_eq!(t.token_to_id("<|im_end|>"), Some(eos));
            assert_eq!(t.token_to_id("<|endoftext|>"), Some(pad));
            let text = "hello world, ünïcode ✓";
            let ids = t.encode(text, false).expect("encode").get_ids().to_vec();
            assert_eq!(t.decode(&ids, false).expect("decode"), text);
        }
    }

    /// Every preset's config.json resolves and validates, and the real shapes have the published parameter counts
    /// (text model without MTP: 34.66B for 35B-A3B, 396.35B for 397B-A17B, per the architecture spec).
    #[test]
    fn presets_are_valid_and_real_shapes_match_published_sizes() {
        for preset in Preset::ALL {
            let s = preset.shape();
            let cfg = crate::ModelConfig::from_json_str(
                &config_json(&s, 1, 0).to_string(),
                std::path::Path::new("config.json"),
            )
            .expect("preset config is valid");
            assert_eq!(cfg.num_hidden_layers, s.layers);
            assert_eq!(cfg.layer_types.iter().filter(|k| **k == crate::LayerKind::Full).count(), s.layers / 4);
        }
        let params = |p: Preset| tensor_bytes(&SynthOptions::new(p)) as f64 / 2.0 / 1e9;
        assert!((params(Preset::Qwen35_35bA3b) - 34.66).abs() < 0.01, "{}", params(Preset::Qwen35_35bA3b));
        assert!((params(Preset::Qwen35_397bA17b) - 396.35).abs() < 0.01, "{}", params(Preset::Qwen35_397bA17b));
        assert!((params(Preset::Bench) - 2.02).abs() < 0.01, "{}", params(Preset::Bench));
    }
}
