//! `moectl generate`: one prompt in, tokens out, with the JSON contract that tests and scripts rely on.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use moe_model::{generate, Decoder, Experts, GenerateRequest, Message, SamplingParams};
use serde_json::json;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompt_ids"])))]
#[command(allow_negative_numbers = true)]
pub struct Args {
    /// Model directory (config.json, safetensors, tokenizer.json), as published on the Hugging Face Hub.
    #[arg(long)]
    model: PathBuf,
    /// Read the weights in place from the memory-mapped files instead of copying them into process memory: starts
    /// faster, decodes slower.
    #[arg(long)]
    mapped: bool,
    /// Prompt text.
    #[arg(long)]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// Most tokens to generate; generation also stops at an end-of-sequence token.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy. Default: generation_config.json's, else 1.
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1]. Default: generation_config.json's, else 1.
    #[arg(long)]
    top_p: Option<f32>,
    /// Sample among the K most likely tokens; 0 disables. Default: generation_config.json's, else 0.
    #[arg(long)]
    top_k: Option<usize>,
    /// Random seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Report the N most likely tokens and their log-probabilities at each position.
    #[arg(long, default_value_t = 0)]
    logprobs: usize,
    /// Report log-probabilities for every prompt position too (with --logprobs).
    #[arg(long)]
    echo: bool,
    /// Print one JSON object: {"prompt_ids","output_ids","text","logprobs","finish_reason"}.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    remote: crate::remote::RemoteArgs,
    #[command(flatten)]
    cpu: moe_model::cpu::CpuArgs,
    /// Where to compute: `cpu`, or `cuda[:0,1,...]` in builds with `--features cuda` (the model's layers on the
    /// first GPU listed; without --experts-at the routed experts on every GPU listed).
    #[arg(long, env = "MOE_DEVICE", default_value = "cpu")]
    device: String,
}

/// The model's layers on a GPU, and the routed experts when they are not remote.
type OnGpu = (Box<dyn Decoder>, Option<Box<dyn Experts>>);

/// The model's layers, and the routed experts unless they are remote, on the GPUs of `device`.
#[cfg(feature = "cuda")]
fn on_gpu(
    dir: &std::path::Path,
    config: &moe_model::ModelConfig,
    ordinals: &[usize],
    with_experts: bool,
) -> Result<OnGpu> {
    let ckpt = moe_model::Checkpoint::open_with(dir, moe_model::Residency::Mapped)?;
    let first = ordinals.first().copied().unwrap_or(0);
    let decoder = moe_cuda::CudaModel::load(&ckpt, config.clone(), first, 1 << 30)?;
    let experts: Option<Box<dyn Experts>> = if with_experts {
        let experts = moe_cuda::CudaExperts::new(config, ordinals)?;
        experts.load_more(&ckpt, config, |_, _| true)?;
        Some(Box::new(experts))
    } else {
        None
    };
    Ok((Box::new(decoder), experts))
}

#[cfg(not(feature = "cuda"))]
fn on_gpu(
    _dir: &std::path::Path,
    _config: &moe_model::ModelConfig,
    _ordinals: &[usize],
    _with_experts: bool,
) -> Result<OnGpu> {
    Err(moe_cuda::CudaError::NotBuilt.into())
}

pub fn run(args: Args) -> Result<()> {
    args.cpu.apply()?;
    let device: moe_cuda::Device = args.device.parse()?;
    let gpus = match &device {
        moe_cuda::Device::Cpu => None,
        moe_cuda::Device::Cuda(ordinals) => {
            moe_cuda::probe(ordinals).with_context(|| format!("--device {device}"))?;
            Some(ordinals.clone())
        }
    };
    let remote = args.remote.is_remote();
    // On a GPU the host copy of the model serves the tokenizer and configuration only: leave it mapped.
    let lm = crate::load_model(&args.model, args.mapped || gpus.is_some(), !remote && gpus.is_none())?;
    let (gpu_decoder, gpu_experts) = match &gpus {
        Some(ordinals) => {
            let (d, e) = on_gpu(&args.model, lm.model.config(), ordinals, !remote)?;
            (Some(d), e)
        }
        None => (None, None),
    };
    let experts = match (remote, gpu_experts) {
        (true, _) => crate::remote::ExpertsIn::Remote(Box::new(args.remote.connect(&lm)?)),
        (false, Some(on_gpu)) => crate::remote::ExpertsIn::Boxed(on_gpu),
        (false, None) => crate::remote::ExpertsIn::Local(&lm),
    };
    let decoder: &dyn Decoder = gpu_decoder.as_deref().unwrap_or(&lm.model);
    let cfg = lm.model.config();

    let prompt = match (&args.prompt, &args.prompt_ids) {
        (Some(text), None) => {
            if args.chat {
                let template = lm
                    .chat_template
                    .as_ref()
                    .with_context(|| format!("--chat: the model in {} has no chat template", args.model.display()))?;
                template.encode(&lm.tokenizer, &[Message::new("user", text.clone())], true)?
            } else {
                lm.tokenizer.encode(text, true)?
            }
        }
        (None, Some(ids)) => ids.clone(),
        _ => bail!("give exactly one of --prompt and --prompt-ids"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        bail!("--prompt-ids: token id {bad} is out of range (vocab_size {})", cfg.vocab_size);
    }
    if prompt.len() + args.max_tokens > cfg.max_position_embeddings {
        bail!(
            "prompt ({} tokens) + --max-tokens ({}) exceeds the model's context of {} tokens",
            prompt.len(),
            args.max_tokens,
            cfg.max_position_embeddings
        );
    }
    if args.echo && args.logprobs == 0 {
        bail!("--echo reports prompt log-probabilities: give --logprobs N as well");
    }

    let gen = &lm.generation;
    let greedy_default = gen.do_sample == Some(false);
    let sampling = SamplingParams {
        temperature: args.temperature.unwrap_or(if greedy_default { 0.0 } else { gen.temperature.unwrap_or(1.0) }),
        top_p: args.top_p.unwrap_or(gen.top_p.unwrap_or(1.0)),
        top_k: args.top_k.unwrap_or(gen.top_k.unwrap_or(0)),
        seed: args.seed,
    };
    sampling.validate()?;
    let req = GenerateRequest {
        prompt: prompt.clone(),
        max_tokens: args.max_tokens,
        sampling,
        logprobs: args.logprobs,
        echo: args.echo,
        stop_ids: lm.eos_token_ids(),
    };

    let gen_started = Instant::now();
    let mut first_token = None;
    let mut produced: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut stdout = std::io::stdout().lock();
    let out = generate(decoder, experts.as_dyn(), &req, |tok| {
        first_token.get_or_insert_with(|| gen_started.elapsed());
        if args.json {
            return;
        }
        // Stream the text: print whatever the decoded output gained, holding back an incomplete UTF-8 sequence.
        produced.push(tok);
        if let Ok(text) = lm.tokenizer.decode(&produced, true) {
            if text.len() > printed && !text.ends_with('\u{FFFD}') {
                let _ = stdout.write_all(&text.as_bytes()[printed..]);
                let _ = stdout.flush();
                printed = text.len();
            }
        }
    })?;
    let elapsed = gen_started.elapsed();
    let text = lm.tokenizer.decode(&out.output_ids, true)?;
    if args.json {
        let logprobs: Vec<Vec<(u32, f32)>> = out.logprobs;
        let obj = json!({
            "prompt_ids": prompt,
            "output_ids": out.output_ids,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": out.finish_reason.as_str(),
        });
        writeln!(stdout, "{obj}")?;
    } else {
        if text.len() > printed {
            stdout.write_all(&text.as_bytes()[printed..])?;
        }
        writeln!(stdout)?;
        let n = out.output_ids.len();
        let ttft = first_token.unwrap_or(elapsed);
        let decode = elapsed.saturating_sub(ttft);
        eprintln!(
            "[{} prompt tokens, {n} generated ({}); first token {:.0} ms, then {:.1} tokens/s]",
            prompt.len(),
            out.finish_reason.as_str(),
            ttft.as_secs_f64() * 1e3,
            if n > 1 { (n - 1) as f64 / decode.as_secs_f64().max(1e-9) } else { 0.0 }
        );
    }
    Ok(())
}
