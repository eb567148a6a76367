//! `moectl bench`: a load generator for any OpenAI-compatible endpoint (this one, vLLM, SGLang, ...), reporting what
//! `vllm bench serve` reports under the same JSON keys, so results compare directly.
//!
//! Each request is a random prompt of exactly `--input-len` token ids (`/v1/completions` accepts token ids) asking for
//! exactly `--output-len` tokens (`ignore_eos`, as vLLM's random dataset does). `--concurrency` requests are kept in
//! flight until `--requests` have completed. With `--stream`, time to first token (TTFT), time per output token after
//! the first (TPOT) and the gaps between streamed chunks (ITL) are measured; without it TTFT is the whole latency.
//!
//! Against moe-mesh, the router's `/metrics` is read before and after the run and the report gains `cluster`: what
//! the cluster measured meanwhile (each expert node's share of the (token, expert) pairs and its mean round trip,
//! each MoE layer's imbalance, and the bytes on the wire per token). Other servers' reports have no such key.
//!
//! `--prefix-len` puts the same prefix before every prompt (a system prompt; `vllm bench serve --random-prefix-len`),
//! and the report gains the share of prompt tokens the server's prefix cache found (`vllm:prefix_cache_*`).
//! `--json-schema` constrains every output to a schema (structured output).

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
    /// Token ids shared by every prompt, before its own --input-len ones (a system prompt, for the prefix cache).
    #[arg(long, default_value_t = 0)]
    prefix_len: usize,
    /// Constrain every output to this JSON schema (sent as `structured_outputs.json`, which vLLM reads too). The
    /// grammar then decides where an output ends, so --output-len is the most, not the exact count.
    #[arg(long)]
    json_schema: Option<String>,
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

async fn one(client: &reqwest::Client, url: &str, args: &Args, schema: Option<&Value>, i: usize) -> Outcome {
    let vocab = args.vocab.max(1) as usize;
    let mut prompt = tokens(args.prefix_len, args.seed ^ 0x005e_ed0f_5a4e_d000, vocab);
    prompt.extend(tokens(args.input_len, args.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15), vocab));
    let mut body = json!({
        "model": args.model,
        "prompt": prompt,
        "max_tokens": args.output_len,
        "min_tokens": args.output_len,
        "ignore_eos": true,
        "temperature": 0,
        "stream": args.stream,
        "stream_options": if args.stream { json!({"include_usage": true}) } else { Value::Null },
    });
    if let Some(schema) = schema {
        body["structured_outputs"] = json!({"json": schema});
        if let Some(fields) = body.as_object_mut() {
            fields.remove("min_tokens");
        }
    }
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
    let schema: Option<Value> = match &args.json_schema {
        Some(text) => Some(serde_json::from_str(text).context("--json-schema is not JSON")?),
        None => None,
    };
    let base = args.url.trim_end_matches('/').trim_end_matches("/v1").to_owned();
    let url = format!("{base}/v1/completions");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3600))
        .pool_max_idle_per_host(args.concurrency)
        .build()
        .context("building the HTTP client")?;
    let before = runtime.block_on(scrape(&client, &base, args.api_key.as_deref()));
    let outcomes = runtime.block_on(async {
        eprintln!(
            "{} requests of {} prompt + {} output tokens to {url}, {} at a time{}",
            args.requests,
            args.prefix_len + args.input_len,
            args.output_len,
            args.concurrency,
            if args.stream { ", streaming" } else { "" }
        );
        let bar = indicatif::ProgressBar::new(args.requests as u64);
        let started = Instant::now();
        let outcomes: Vec<Outcome> = futures::stream::iter(0..args.requests)
            .map(|i| {
                let (client, url, args, bar, schema) = (&client, &url, &args, &bar, schema.as_ref());
                async move {
                    let o = one(client, url, args, schema, i).await;
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
    let after = runtime.block_on(scrape(&client, &base, args.api_key.as_deref()));
    let cluster = before.as_ref().zip(after.as_ref()).and_then(|(b, a)| cluster_report(b, a));
    let prefix_hits = before.as_ref().zip(after.as_ref()).and_then(|(b, a)| prefix_hit_rate(b, a));
    let done: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok).collect();
    let failed = outcomes.len() - done.len();
    if let Some(first) = outcomes.iter().find(|o| !o.ok) {
        eprintln!("{failed} requests failed; the first: {}", first.error);
    }
    if done.is_empty() {
        bail!("every request failed");
    }
    let output: usize = done.iter().map(|o| o.output_tokens).sum();
    let input = done.len() * (args.prefix_len + args.input_len);
    let ttft = stats(done.iter().map(|o| o.ttft).collect());
    let tpot = stats(
        done.iter()
            .filter(|o| o.output_tokens > 1)
            .map(|o| (o.latency - o.ttft) / (o.output_tokens - 1) as f64)
            .collect(),
    );
    let itl = stats(done.iter().flat_map(|o| o.itl.iter().copied()).collect());
    let e2e = stats(done.iter().map(|o| o.latency).collect());
    let mut report = json!({
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
    if let Some(cluster) = &cluster {
        report["cluster"] = cluster.clone();
    }
    if let Some(rate) = prefix_hits {
        report["prefix_cache_hit_rate"] = json!(rate);
    }
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
    if let Some(rate) = prefix_hits {
        println!("prefix cache hits   {:>9.1} % of prompt tokens", 100.0 * rate);
    }
    if let Some(c) = &cluster {
        println!("measured by the cluster meanwhile:");
        println!("  wire bytes per token   {:>10.0}", c["wire_bytes_per_token"].as_f64().unwrap_or(0.0));
        println!(
            "  layer imbalance        {:>10.3} mean, {:.3} worst (busiest node / mean node)",
            c["layer_imbalance"]["mean"].as_f64().unwrap_or(0.0),
            c["layer_imbalance"]["max"].as_f64().unwrap_or(0.0)
        );
        if let Some(nodes) = c["nodes"].as_object() {
            println!("  {:<28} {:>8} {:>14}", "node", "share", "round trip ms");
            for (id, n) in nodes {
                println!(
                    "  {id:<28} {:>7.1}% {:>14.3}",
                    100.0 * n["pair_share"].as_f64().unwrap_or(0.0),
                    n["mean_round_trip_ms"].as_f64().unwrap_or(f64::NAN)
                );
            }
        }
    }
    Ok(())
}

/// The share of prompt tokens looked up in the prefix cache between two scrapes that it found; `None` when none
/// were looked up.
fn prefix_hit_rate(before: &str, after: &str) -> Option<f64> {
    let get = |text: &str, name: &str| {
        moe_telemetry::metrics::parse_series(text).iter().filter(|(n, _, _)| n == name).map(|s| s.2).sum::<f64>()
    };
    let queries = get(after, "vllm:prefix_cache_queries_total") - get(before, "vllm:prefix_cache_queries_total");
    let hits = get(after, "vllm:prefix_cache_hits_total") - get(before, "vllm:prefix_cache_hits_total");
    (queries > 0.0).then(|| hits / queries)
}

/// The server's `/metrics`, if it answers with vLLM-named series (moe-mesh's and vLLM's both do).
async fn scrape(client: &reqwest::Client, base: &str, key: Option<&str>) -> Option<String> {
    let mut req = client.get(format!("{base}/metrics")).timeout(Duration::from_secs(10));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let text = req.send().await.ok()?.error_for_status().ok()?.text().await.ok()?;
    text.contains("vllm:").then_some(text)
}

/// What the cluster measured between two scrapes of a router: `None` when its experts are not on expert nodes.
pub fn cluster_report(before: &str, after: &str) -> Option<Value> {
    use moe_telemetry::metrics::parse_series;
    use std::collections::BTreeMap;
    // Sums per value of one label (or of none), after minus before.
    let delta = |name: &str, label: Option<&str>| -> BTreeMap<String, f64> {
        let mut out: BTreeMap<String, f64> = BTreeMap::new();
        for (text, sign) in [(after, 1.0), (before, -1.0)] {
            for (n, labels, v) in parse_series(text) {
                if n != name {
                    continue;
                }
                let key = match label {
                    Some(l) => match labels.iter().find(|(k, _)| k == l) {
                        Some((_, value)) => value.clone(),
                        None => continue,
                    },
                    None => String::new(),
                };
                *out.entry(key).or_default() += sign * v;
            }
        }
        out
    };
    let total = |name: &str| delta(name, None).values().sum::<f64>();
    let messages = total("moe_expert_messages_total");
    if messages <= 0.0 {
        return None;
    }
    let pairs = delta("moe_node_pairs_total", Some("node"));
    let all_pairs: f64 = pairs.values().sum();
    let rtt_sum = delta("moe_dispatch_round_trip_seconds_sum", Some("node"));
    let rtt_count = delta("moe_dispatch_round_trip_seconds_count", Some("node"));
    let sent = delta("moe_node_bytes_sent_total", Some("node"));
    let received = delta("moe_node_bytes_received_total", Some("node"));
    let nodes: serde_json::Map<String, Value> = pairs
        .iter()
        .map(|(node, p)| {
            let count = rtt_count.get(node).copied().unwrap_or(0.0);
            let rtt = (count > 0.0).then(|| 1000.0 * rtt_sum.get(node).copied().unwrap_or(0.0) / count);
            let node_json = json!({
                "pairs": p,
                "pair_share": if all_pairs > 0.0 { p / all_pairs } else { 0.0 },
                "messages": count,
                "mean_round_trip_ms": rtt,
                "bytes_sent": sent.get(node).copied().unwrap_or(0.0),
                "bytes_received": received.get(node).copied().unwrap_or(0.0),
            });
            (node.clone(), node_json)
        })
        .collect();
    let busiest = delta("moe_layer_busiest_node_pairs_total", Some("layer"));
    let mean = delta("moe_layer_mean_node_pairs_total", Some("layer"));
    let per_layer: BTreeMap<String, f64> =
        busiest.iter().filter_map(|(l, b)| mean.get(l).filter(|m| **m > 0.0).map(|m| (l.clone(), b / m))).collect();
    let worst = per_layer.values().copied().fold(0.0, f64::max);
    let avg = if per_layer.is_empty() { 0.0 } else { per_layer.values().sum::<f64>() / per_layer.len() as f64 };
    let tokens = total("moe_prompt_tokens_total") + total("moe_generation_tokens_total");
    let wire = total("moe_expert_bytes_sent_total") + total("moe_expert_bytes_received_total");
    Some(json!({
        "nodes": nodes,
        "layer_imbalance": {"mean": avg, "max": worst, "per_layer": per_layer},
        "wire_bytes": wire,
        "wire_bytes_per_token": if tokens > 0.0 { wire / tokens } else { 0.0 },
        "messages": messages,
        "pieces_resent": total("moe_expert_pieces_resent_total"),
        "placement_epoch": parse_series(after).iter().find(|(n, _, _)| n == "moe_placement_epoch").map(|s| s.2),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_report_is_the_difference_of_two_scrapes() {
        let before = "moe_expert_messages_total{model_name=\"m\"} 10\n\
            moe_node_pairs_total{model_name=\"m\",node=\"a\"} 100\n\
            moe_node_pairs_total{model_name=\"m\",node=\"b\"} 100\n\
            moe_layer_busiest_node_pairs_total{model_name=\"m\",layer=\"0\"} 50\n\
            moe_layer_mean_node_pairs_total{model_name=\"m\",layer=\"0\"} 50\n\
            moe_expert_bytes_sent_total{model_name=\"m\"} 1000\n\
            moe_prompt_tokens_total{model_name=\"m\"} 10\n";
        let after = "moe_expert_messages_total{model_name=\"m\"} 20\n\
            moe_node_pairs_total{model_name=\"m\",node=\"a\"} 400\n\
            moe_node_pairs_total{model_name=\"m\",node=\"b\"} 200\n\
            moe_dispatch_round_trip_seconds_sum{model_name=\"m\",node=\"a\"} 0.02\n\
            moe_dispatch_round_trip_seconds_count{model_name=\"m\",node=\"a\"} 10\n\
            moe_layer_busiest_node_pairs_total{model_name=\"m\",layer=\"0\"} 350\n\
            moe_layer_mean_node_pairs_total{model_name=\"m\",layer=\"0\"} 250\n\
            moe_expert_bytes_sent_total{model_name=\"m\"} 5000\n\
            moe_prompt_tokens_total{model_name=\"m\"} 30\n";
        let r = cluster_report(before, after).expect("a report");
        assert_eq!(r["nodes"]["a"]["pair_share"], 0.75);
        assert_eq!(r["nodes"]["b"]["pair_share"], 0.25);
        assert!((r["nodes"]["a"]["mean_round_trip_ms"].as_f64().unwrap_or(0.0) - 2.0).abs() < 1e-9);
        assert_eq!(r["layer_imbalance"]["max"], 1.5);
        assert_eq!(r["wire_bytes_per_token"], 200.0);
        assert!(cluster_report(after, after).is_none(), "no messages in between: nothing measured");
    }
}
