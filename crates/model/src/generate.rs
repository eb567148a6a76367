//! Single-sequence generation: chunked prefill, then one token per step until `max_tokens` or an end-of-sequence
//! token, with optional top-N log-probabilities (of the model's distribution, before temperature).

use crate::error::{ModelError, Result};
use crate::layers::moe::Experts;
use crate::model::{Decoder, LogitsFor, Segment};
use crate::sampling::{top_logprobs, Sampler, SamplingParams};

/// Prompt tokens per prefill forward; bounds activation memory on long prompts.
pub const PREFILL_CHUNK: usize = 512;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Top-N log-probs per position (0 = none).
    pub logprobs: usize,
    /// Report log-probs for every prompt and output position, not only those that produced output tokens.
    pub echo: bool,
    /// Tokens that end the generation (they are kept in the output).
    pub stop_ids: Vec<u32>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token was produced.
    Stop,
    /// `max_tokens` was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    pub output_ids: Vec<u32>,
    /// `logprobs[i]`: the top-N `(id, logprob)` after position i, most likely first. Without echo, one entry per
    /// output token (the position that produced it); with echo, one per prompt and output position.
    pub logprobs: Vec<Vec<(u32, f32)>>,
    pub finish_reason: FinishReason,
}

/// Runs one generation; `on_token` sees each new token as it is chosen.
pub fn generate(
    model: &dyn Decoder,
    experts: &dyn Experts,
    req: &GenerateRequest,
    mut on_token: impl FnMut(u32),
) -> Result<GenerateOutput> {
    if req.prompt.is_empty() {
        return Err(ModelError::InvalidInput("the prompt is empty".into()));
    }
    let mut sampler = Sampler::new(req.sampling)?;
    let vocab = model.config().vocab_size;
    let mut state = model.new_state();
    let mut logprobs = Vec::new();
    let mut last = Vec::new();
    let chunks: Vec<&[u32]> = req.prompt.chunks(PREFILL_CHUNK).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let is_last = i + 1 == chunks.len();
        let want = if req.echo && req.logprobs > 0 {
            LogitsFor::All
        } else if is_last {
            LogitsFor::Last
        } else {
            LogitsFor::None
        };
        let mut batch = [Segment { state: &mut state, tokens: chunk, logits: want }];
        let out = model.forward_pipelined(&mut batch, experts, 1)?;
        let rows = &out[0];
        if want == LogitsFor::All {
            for row in rows.chunks_exact(vocab) {
                logprobs.push(top_logprobs(row, req.logprobs));
            }
        }
        if is_last {
            last = rows[rows.len() - vocab..].to_vec();
        }
    }

    let mut output_ids = Vec::new();
    let mut finish_reason = FinishReason::Length;
    while output_ids.len() < req.max_tokens {
        let token = sampler.sample(&last);
        if req.logprobs > 0 && !req.echo {
            logprobs.push(top_logprobs(&last, req.logprobs));
        }
        output_ids.push(token);
        on_token(token);
        let stop = req.stop_ids.contains(&token);
        let more = !stop && output_ids.len() < req.max_tokens;
        if more || (req.echo && req.logprobs > 0) {
            let mut batch =
                [Segment { state: &mut state, tokens: std::slice::from_ref(&token), logits: LogitsFor::Last }];
            last = model.forward_pipelined(&mut batch, experts, 1)?.swap_remove(0);
            if req.echo && req.logprobs > 0 {
                logprobs.push(top_logprobs(&last, req.logprobs));
            }
        }
        if stop {
            finish_reason = FinishReason::Stop;
            break;
        }
    }
    Ok(GenerateOutput { output_ids, logprobs, finish_reason })
}
