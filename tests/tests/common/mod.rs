//! What the fault tests share: HTTP clients that read streams the way vLLM's benchmark client does, greedy
//! streams checked against the in-process engine, and bounded waits on a router's metrics and readiness.
#![allow(dead_code)] // each test file uses its own part

use std::time::Duration;

use moe_e2e::{local_greedy, ExpertNodeProcess};
use moe_model::LoadedModel;
use serde_json::{json, Value};

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("client")
}

pub fn prompt(i: u32) -> Vec<u32> {
    (0..6 + i % 7).map(|k| (i * 41 + k * 13 + 7) % 250).collect()
}

pub async fn metric(url: &str, name: &str) -> f64 {
    let text = client().get(format!("{url}/metrics")).send().await.expect("sent").text().await.expect("text");
    moe_e2e::metric_value(&text, name).unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

pub async fn status_of(url: &str, path: &str) -> u16 {
    client().get(format!("{url}{path}")).send().await.map_or(0, |r| r.status().as_u16())
}

/// A streamed completion as vLLM's benchmark client reads it: line by line, blank lines and `:` comments skipped,
/// `data: ` stripped, `[DONE]` last.
#[derive(Debug, Default)]
pub struct Streamed {
    pub status: u16,
    /// Whether the first non-empty line of the body was a data line (that client cannot start on a comment).
    pub starts_with_data: bool,
    pub comments: usize,
    pub text: String,
    pub finish_reason: Option<String>,
    pub usage: Option<Value>,
    pub error: Option<Value>,
    pub done: bool,
}

pub async fn stream(url: &str, body: Value) -> Streamed {
    let resp = client().post(format!("{url}/v1/completions")).json(&body).send().await.expect("sent");
    let mut out = Streamed { status: resp.status().as_u16(), ..Default::default() };
    let text = resp.text().await.expect("body");
    if out.status != 200 {
        out.error = serde_json::from_str(&text).ok();
        return out;
    }
    let mut first = true;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if first {
            out.starts_with_data = line.starts_with("data: ");
            first = false;
        }
        if line.starts_with(':') {
            out.comments += 1;
            continue;
        }
        let data = line.strip_prefix("data: ").expect("an SSE data line");
        if data == "[DONE]" {
            out.done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(data).expect("json");
        if chunk.get("error").is_some() {
            out.error = Some(chunk);
            continue;
        }
        if let Some(c) = chunk["choices"].get(0) {
            out.text.push_str(c["text"].as_str().unwrap_or(""));
            if let Some(r) = c["finish_reason"].as_str() {
                out.finish_reason = Some(r.to_owned());
            }
        }
        if !chunk["usage"].is_null() {
            out.usage = Some(chunk["usage"].clone());
        }
    }
    out
}

pub fn greedy(p: &[u32], max_tokens: usize, streamed: bool) -> Value {
    json!({
        "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true,
        "stream": streamed, "stream_options": {"include_usage": true},
    })
}

/// Waits (bounded) until the router has generated at least `n` tokens.
pub async fn wait_for_tokens(url: &str, n: f64) {
    for _ in 0..400 {
        if metric(url, "moe_generation_tokens_total").await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no tokens within 4 s");
}

pub async fn stream_owned(url: String, body: Value) -> Streamed {
    stream(&url, body).await
}

/// Greedy streams running against a router, with the text each must end with (the in-process engine's).
pub struct GreedyStreams {
    pub want: Vec<String>,
    pub tasks: Vec<tokio::task::JoinHandle<Streamed>>,
}

/// Starts `n` greedy streams of `max_tokens` tokens on `url`.
pub fn start_greedy_streams(url: &str, lm: &LoadedModel, n: u32, max_tokens: usize) -> GreedyStreams {
    let prompts: Vec<Vec<u32>> = (0..n).map(prompt).collect();
    GreedyStreams {
        want: prompts.iter().map(|p| local_greedy(lm, p, max_tokens)).collect(),
        tasks: prompts
            .iter()
            .map(|p| tokio::spawn(stream_owned(url.to_owned(), greedy(p, max_tokens, true))))
            .collect(),
    }
}

impl GreedyStreams {
    /// Waits for every stream; each must have ended without an error, with the fault-free text (`across` names the
    /// fault in the message).
    pub async fn finish(self, across: &str) -> Vec<Streamed> {
        let mut out = Vec::with_capacity(self.tasks.len());
        for (i, (task, want)) in self.tasks.into_iter().zip(&self.want).enumerate() {
            let s = task.await.expect("stream task");
            assert!(s.error.is_none(), "stream {i} failed: {:?}", s.error);
            assert_eq!(&s.text, want, "stream {i}: greedy text changed across {across}");
            out.push(s);
        }
        out
    }
}

/// Waits (bounded) until the node's log says it registered in the cluster.
pub fn wait_registered(node: &ExpertNodeProcess) {
    for _ in 0..200 {
        if node.log_text().contains("registered") {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the node did not register:\n{}", node.log_text());
}

/// Waits (bounded) until `url` answers /readyz with 200.
pub async fn wait_ready(url: &str) {
    for _ in 0..300 {
        if status_of(url, "/readyz").await == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} never became ready");
}

/// The fixture model's experts take 12 KiB each (4 MoE layers of 8): room for 12 on a node, 3 per layer.
pub const TWELVE_EXPERTS_GIB: &str = "0.000138";
