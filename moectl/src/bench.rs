//! `moectl bench`: a load generator for any OpenAI-compatible endpoint (this one, vLLM, SGLang, ...), reporting what
//! `vllm bench serve` reports under the same JSON keys, so results compare directly.
//!
//! Each request is a random prompt of exactly `--input-len` token ids (`/v1/completions` accepts token ids) asking for
//! exactly `--output-len` tokens (`ignore_eos`, as vLLM's random dataset does). `--concurrency` requests are kept in
//! flight until `--requests` have completed. With `--stream`, time to first token (TTFT), time per output token after
//! the first (TPOT) and the gaps between streamed chunks (ITL) are measured; without it TTFT is the whole latency.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::bench_model::tokens;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Base URL of the server, e.g. http://127.0.0.1:8000 (with or without /v1).
    #[arg(long)]
    url: String,
    /// Model id to send.
    #[arg(long)]
    model: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 16)]
    requests: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    input_len: usize,
    /// Tokens to generate per request.
    #[arg(long, default_value_t = 64)]
    output_len: usize,
    /// Stream the responses (needed for TTFT, TPOT and ITL).
    #[arg(long)]
    stream: bool,
    /// Token ids are drawn below this (keep it under the model's vocabulary).
    #[arg(long, default_value_t = 1000)]
    vocab: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Bearer token for servers with API keys.
    #[arg(long, env = "OPENAI_API_KEY")]
    api_key: Option<String>,
    /// Print the results as one JSON object (vllm bench serve's keys).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Clone)]
struct Outcome {
    ok: bool,
    error: String,
    latency: f64,
    ttft: f64,
    itl: Vec<f64>,
    output_tokens: usize,
}

async fn one(client: &reqwest::Client, url: &str, args: &Args, i: usize) -> Outcome {
    let body = json!({
        "model": args.model,
        "prompt": tokens(args.input_len, args.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15), args.vocab.max(1) as usize),
        "max_tokens": args.output_len,
        "min_tokens": args.output_len,
        "ignore_eos": true,
        "temperature": 0,
        "stream": args.stream,
        "stream_options": if args.stream { json!({"include_usage": true}) } else { Value::Null },
    });
    let mut req = client.post(url).json(&body);
    if let Some(key) = &args.api_key {
        req = req.bearer_auth(key);
    }
    let started = Instant::now();
    let fail = |error: String| Outcome { error, ..Outcome::default() };
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    };
    if !resp.status().is_success() {
        let status = resp.status();
        return fail(format!("HTTP {status}: {}", resp.text().await.unwrap_or_default()));
    }
    if !args.stream {
        let v: Value = match resp.json().await {
            Ok(v) => v,
            Err(e) => return fail(e.to_string()),
        };
        let latency = started.elapsed().as_secs_f64();
        let tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(args.output_len as u64) as usize;
        return Outcome { ok: true, latency, ttft: latency, output_tokens: tokens, ..Outcome::default() };
    }
    let mut out = Outcome::default();
    let mut last = started;
    let mut chunks = 0usize;
    let mut buf = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece = match piece {
            Ok(p) => p,
            Err(e) => return fail(e.to_string()),
        };
        buf.push_str(&String::from_utf8_lossy(&piece));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data:").map(str::trim) else { continue };
            if data == "[DONE]" {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
            if let Some(e) = v.get("error") {
                return fail(e.to_string());
            }
            if let Some(tokens) = v["usage"]["completion_tokens"].as_u64() {
                out.output_tokens = tokens as usize;
            }
            let has_text = v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty());
            if has_text {
                let now = Instant::now();
                if chunks == 0 {
                    out.ttft = (now - started).as_secs_f64();
                } else {
                    out.itl.push((now - last).as_secs_f64());
                }
                last = now;
                chunks += 1;
            }
        }
    }
    out.latency = started.elapsed().as_secs_f64();
    if out.output_tokens == 0 {
        out.output_tokens = chunks;
    }
    out.ok = true;
    out
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0, 0.0, 0.0);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    let pct = |p: f64| {
        let rank = p / 100.0 * (n - 1.0);
        let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
        v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
    };
    (mean * 1e3, pct(50.0) * 1e3, pct(90.0) * 1e3, pct(99.0) * 1e3, std * 1e3)
}

pub fn run(args: Args) -> Result<()> {
    if args.concurrency == 0 || args.requests == 0 || args.input_len == 0 || args.output_len == 0 {
        bail!("--concurrency, --requests, --input-len and --output-len must be positive");
    }
    let base = args.url.trim_end_matches('/').trim_end_matches("/v1").to_owned();
    let url = format!("{base}/v1/completions");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    let outcomes = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3600))
            .pool_max_idle_per_host(args.concurrency)
            .build()
            .context("building the HTTP client")?;
        eprintln!(
            "{} requests of {} prompt + {} output tokens to {url}, {} at a time{}",
            args.requests,
            args.input_len,
            args.output_len,
            args.concurrency,
            if args.stream { ", streaming" } else { "" }
        );
        let bar = indicatif::ProgressBar::new(args.requests as u64);
        let started = Instant::now();
        let outcomes: Vec<Outcome> = futures::stream::iter(0..args.requests)
            .map(|i| {
                let (client, url, args, bar) = (&client, &url, &args, &bar);
                async move {
                    let o = one(client, url, args, i).await;
                    bar.inc(1);
                    o
                }
            })
            .buffer_unordered(args.concurrency)
            .collect()
            .await;
        bar.finish_and_clear();
        anyhow::Ok((outcomes, started.elapsed().as_secs_f64()))
    })?;
    let (outcomes, duration) = outcomes;
    let done: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok).collect();
    let failed = outcomes.len() - done.len();
    if let Some(first) = outcomes.iter().find(|o| !o.ok) {
        eprintln!("{failed} requests failed; the first: {}", first.error);
    }
    if done.is_empty() {
        bail!("every request failed");
    }
    let output: usize = done.iter().map(|o| o.output_tokens).sum();
    let input = done.len() * args.input_len;
    let ttft = stats(done.iter().map(|o| o.ttft).collect());
    let tpot = stats(
        done.iter()
            .filter(|o| o.output_tokens > 1)
            .map(|o| (o.latency - o.ttft) / (o.output_tokens - 1) as f64)
            .collect(),
    );
    let itl = stats(done.iter().flat_map(|o| o.itl.iter().copied()).collect());
    let e2e = stats(done.iter().map(|o| o.latency).collect());
    let report = json!({
        "duration": duration,
        "completed": done.len(),
        "failed": failed,
        "max_concurrency": args.concurrency,
        "total_input_tokens": input,
        "total_output_tokens": output,
        "request_throughput": done.len() as f64 / duration,
        "output_throughput": output as f64 / duration,
        "total_token_throughput": (input + output) as f64 / duration,
        "mean_ttft_ms": ttft.0, "median_ttft_ms": ttft.1, "p90_ttft_ms": ttft.2, "p99_ttft_ms": ttft.3, "std_ttft_ms": ttft.4,
        "mean_tpot_ms": tpot.0, "median_tpot_ms": tpot.1, "p90_tpot_ms": tpot.2, "p99_tpot_ms": tpot.3, "std_tpot_ms": tpot.4,
        "mean_itl_ms": itl.0, "median_itl_ms": itl.1, "p90_itl_ms": itl.2, "p99_itl_ms": itl.3, "std_itl_ms": itl.4,
        "mean_e2el_ms": e2e.0, "median_e2el_ms": e2e.1, "p90_e2el_ms": e2e.2, "p99_e2el_ms": e2e.3, "std_e2el_ms": e2e.4,
    });
    if args.json {
        println!("{report}");
        return Ok(());
    }
    println!("completed {} of {} requests in {duration:.2} s ({failed} failed)", done.len(), outcomes.len());
    println!("request throughput  {:>9.2} req/s", done.len() as f64 / duration);
    println!("output throughput   {:>9.2} tokens/s", output as f64 / duration);
    println!("total throughput    {:>9.2} tokens/s", (input + output) as f64 / duration);
    println!("{:<6} {:>10} {:>10} {:>10} {:>10}", "ms", "mean", "p50", "p90", "p99");
    for (name, s) in [("TTFT", ttft), ("TPOT", tpot), ("ITL", itl), ("E2E", e2e)] {
        println!("{name:<6} {:>10.1} {:>10.1} {:>10.1} {:>10.1}", s.0, s.1, s.2, s.3);
    }
    Ok(())
}
