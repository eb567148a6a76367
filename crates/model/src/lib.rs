//! moe-model: the Qwen3.5-MoE / Qwen3-Next model engine.
//!
//! It loads checkpoints exactly as published on the Hugging Face Hub ([`ModelConfig`], [`Checkpoint`],
//! [`Tokenizer`]), runs the hybrid decoder on the CPU in f32 with bf16 weights ([`Model`]), and keeps the routed experts
//! behind the [`Experts`] seam so that they can live in other processes. The numeric reference is Hugging Face
//! transformers 5.24 (see `spec/qwen35-architecture.md` in the shared docs).

pub mod config;
pub mod cpu;
pub mod error;
pub mod generate;
pub mod layers;
pub mod model;
pub mod sampling;
pub mod state;
pub mod synth;
pub mod tokenizer;
pub mod weights;

pub use config::{Family, LayerKind, ModelConfig};
pub use error::{ModelError, Result};
pub use generate::{generate, FinishReason, GenerateOutput, GenerateRequest};
pub use layers::moe::{
    combine_experts, ExpertSlots, Experts, LocalExperts, PendingExperts, Ready, Routing, ShardChange,
};
pub use model::{Decoder, LogitsFor, Model, Segment};
pub use sampling::{Sampler, SamplingParams};
pub use state::{new_decoder_id, DeviceState, SequenceState};
pub use tokenizer::{ChatTemplate, GenerationConfig, Message, RenderOptions, Tokenizer};
pub use weights::{Checkpoint, Residency};

use std::path::{Path, PathBuf};

/// Everything loaded from a model directory, with all routed experts in this process.
#[derive(Debug)]
pub struct LoadedModel {
    pub dir: PathBuf,
    pub model: Model,
    pub experts: LocalExperts,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub generation: GenerationConfig,
    /// [`Checkpoint::fingerprint`] of this model: processes that split a model must agree on it.
    pub fingerprint: u64,
}

impl LoadedModel {
    /// Loads config.json, the checkpoint, the tokenizer, the chat template and generation_config.json from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, Residency::Resident, &|_, _| {})
    }

    /// Same as [`LoadedModel::load`] with the weights kept as `residency` says, calling
    /// `progress(bytes_loaded, bytes_total)` about ten times a second while they load (large checkpoints take minutes).
    pub fn load_with(dir: &Path, residency: Residency, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Self> {
        Self::load_selected(dir, residency, progress, &|_, _| true)
    }

    /// Same as [`LoadedModel::load_with`] with only the routed experts `(layer, expert)` for which `select` is true
    /// (none, for a router whose experts live on expert nodes).
    pub fn load_selected(
        dir: &Path,
        residency: Residency,
        progress: &(dyn Fn(u64, u64) + Sync),
        select: &(dyn Fn(usize, usize) -> bool + Sync),
    ) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config_bytes =
            std::fs::read(&config_path).map_err(|e| ModelError::Io { path: config_path.clone(), source: e })?;
        let config = ModelConfig::from_json_str(&String::from_utf8_lossy(&config_bytes), &config_path)?;
        let ckpt = Checkpoint::open_with(dir, residency)?;
        let fingerprint = ckpt.fingerprint(&config_bytes);
        let (ne, i, h) = (config.num_experts, config.moe_intermediate_size, config.hidden_size);
        let skipped = (0..config.num_hidden_layers)
            .filter(|&l| config.is_moe_layer(l))
            .flat_map(|l| (0..ne).map(move |e| (l, e)))
            .filter(|&(l, e)| !select(l, e))
            .count() as u64;
        let total = ckpt.text_model_bytes().saturating_sub(skipped * 3 * (i * h) as u64 * 2);
        let done = std::sync::atomic::AtomicBool::new(false);
        let (model, experts) = std::thread::scope(|scope| {
            scope.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    progress(ckpt.bytes_loaded().min(total), total);
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            });
            let loaded = LocalExperts::load(&ckpt, &config, select)
                .and_then(|experts| Model::load(&ckpt, config).map(|model| (model, experts)));
            done.store(true, std::sync::atomic::Ordering::Release);
            loaded
        })?;
        progress(total, total);
        tracing::info!(bytes = total, "weights loaded");
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        // An id past the embedding table would index out of it on the first request that produces it.
        let vocab = model.config().vocab_size;
        if let Some(max) = tokenizer.max_id().filter(|&m| m as usize >= vocab) {
            return Err(ModelError::Tokenizer {
                path: dir.join("tokenizer.json"),
                message: format!("token id {max} is beyond the model's vocabulary of {vocab} (config.json vocab_size)"),
            });
        }
        tracing::info!("tokenizer loaded");
        Ok(LoadedModel {
            dir: dir.to_owned(),
            tokenizer,
            chat_template: ChatTemplate::load(dir)?,
            generation: GenerationConfig::load(dir)?,
            model,
            experts,
            fingerprint,
        })
    }

    /// End-of-sequence ids: config.json's and generation_config.json's together.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids = self.model.config().eos_token_ids.clone();
        for id in &self.generation.eos_token_ids {
            if !ids.contains(id) {
                ids.push(*id);
            }
        }
        ids
    }
}
