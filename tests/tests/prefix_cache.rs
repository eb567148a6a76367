//! The prefix cache through a real server: a request that starts from a cached prefix answers bit for bit what a
//! server without the cache answers (greedy and sampled, alone and under concurrent load, with log-probs), the
//! `vllm:prefix_cache_*` counters count what was found, and under a tight state budget the least recently used
//! prefixes are evicted while the cache stays inside the budget.

use std::time::Duration;

use moe_e2e::{fixture, RouterProcess};
use serde_json::{json, Value};

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("client")
}

async fn complete(url: &str, body: &Value) -> Value {
    let resp = client().post(format!("{url}/v1/completions")).json(body).send().await.expect("sent");
    assert_eq!(resp.status().as_u16(), 200, "completion refused");
    resp.json().await.expect("json")
}

async fn metric(url: &str, name: &str) -> f64 {
    let text = client().get(format!("{url}/metrics")).send().await.expect("sent").text().await.expect("text");
    moe_e2e::metric_value(&text, name).unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

/// `len` token ids from `seed` (the fixture's vocabulary has 300; ids under 250 are ordinary tokens).
fn ids(seed: u32, len: usize) -> Vec<u32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s % 250
        })
        .collect()
}

/// What a completion's answer says about the tokens: text, finish and every log-prob (the ids and timing aside).
fn answer(resp: &Value) -> Value {
    let c = &resp["choices"][0];
    json!([c["text"], c["finish_reason"], c["logprobs"]])
}

fn request(prompt: &[u32], sampled: bool) -> Value {
    let mut body = json!({"prompt": prompt, "max_tokens": 24, "ignore_eos": true, "logprobs": 5});
    if sampled {
        body["temperature"] = json!(1.0);
        body["seed"] = json!(7);
    } else {
        body["temperature"] = json!(0);
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_answer_what_misses_answer_bit_for_bit() {
    let dir = fixture("qwen35");
    let cached = RouterProcess::start(&dir, &[]).expect("router with the cache");
    let plain = RouterProcess::start(&dir, &["--no-prefix-caching"]).expect("router without it");
    let system = ids(1, 200);
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| [system.clone(), ids(100 + i, 5 + 29 * i as usize)].concat()).collect();

    // One after another. The first is fed whole (a short prompt whose beginning is new is not cut at its last
    // boundary); the second shares its beginning, so it is cut there and fills the cache; the others start from it.
    for (i, p) in prompts.iter().enumerate() {
        for sampled in [false, true] {
            let body = request(p, sampled);
            let want = answer(&complete(plain.url(), &body).await);
            let got = answer(&complete(cached.url(), &body).await);
            assert_eq!(got, want, "prompt {i} (sampled: {sampled}): the cached server answers otherwise");
        }
    }
    let queries = metric(cached.url(), "vllm:prefix_cache_queries_total").await;
    let hits = metric(cached.url(), "vllm:prefix_cache_hits_total").await;
    let asked: usize = prompts.iter().map(Vec::len).sum::<usize>() * 2;
    assert_eq!(queries, asked as f64, "every prompt token is looked up");
    // Every request after the second finds at least the system prompt's 192 aligned tokens (6 blocks of 32).
    assert!(hits >= (2 * prompts.len() - 2) as f64 * 192.0, "hits {hits} of {queries}");
    assert_eq!(metric(plain.url(), "vllm:prefix_cache_queries_total").await, 0.0);
    assert!(metric(cached.url(), "moe_prefix_cache_entries").await >= 1.0);

    // A repeated prompt starts from its own last aligned boundary.
    let before = metric(cached.url(), "vllm:prefix_cache_hits_total").await;
    let body = request(&prompts[5], false);
    let (hit, miss) = (complete(cached.url(), &body).await, complete(plain.url(), &body).await);
    assert_eq!(answer(&hit), answer(&miss));
    let found = metric(cached.url(), "vllm:prefix_cache_hits_total").await - before;
    assert_eq!(found, ((prompts[5].len() - 1) / 32 * 32) as f64, "a repeat finds all but its last partial block");
    // The usage says so, as OpenAI's `prompt_tokens_details.cached_tokens`, streamed or not.
    let cached_tokens = |resp: &Value| resp["usage"]["prompt_tokens_details"]["cached_tokens"].as_f64();
    assert_eq!(cached_tokens(&hit), Some(found), "usage: {}", hit["usage"]);
    assert_eq!(cached_tokens(&miss), Some(0.0), "usage: {}", miss["usage"]);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let text = client()
        .post(format!("{}/v1/completions", cached.url()))
        .json(&streamed)
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("stream");
    let last_usage = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .rfind(|chunk| !chunk["usage"].is_null())
        .unwrap_or_else(|| panic!("no usage chunk in:\n{text}"));
    assert_eq!(cached_tokens(&last_usage), Some(found), "streamed usage: {}", last_usage["usage"]);

    // Echoed prompt log-probs need every prompt token computed: such requests skip the cache and still agree.
    let mut echo = request(&prompts[2], false);
    echo["echo"] = json!(true);
    let q0 = metric(cached.url(), "vllm:prefix_cache_queries_total").await;
    assert_eq!(answer(&complete(cached.url(), &echo).await), answer(&complete(plain.url(), &echo).await));
    assert_eq!(metric(cached.url(), "vllm:prefix_cache_queries_total").await, q0, "echo is not looked up");

    // Under concurrent load, where the token budget cuts prompts into pieces that depend on what else runs (a new
    // system prompt, so that all of them start from nothing): the same answers as one at a time without the cache.
    let system = ids(2, 300);
    let others: Vec<Vec<u32>> = (0..8).map(|i| [system.clone(), ids(300 + i, 3 + 17 * i as usize)].concat()).collect();
    let mut wants = Vec::new();
    for p in &others {
        wants.push(answer(&complete(plain.url(), &request(p, false)).await));
    }
    let url = cached.url().to_owned();
    let tasks: Vec<_> = others
        .iter()
        .map(|p| {
            let (url, body) = (url.clone(), request(p, false));
            tokio::spawn(async move { answer(&complete(&url, &body).await) })
        })
        .collect();
    for (i, (task, want)) in tasks.into_iter().zip(wants).enumerate() {
        assert_eq!(task.await.expect("task"), want, "concurrent request {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tight_budget_evicts_the_least_recently_used() {
    let dir = fixture("qwen35");
    // The fixture's state: 24,192 bytes of DeltaNet slots and 8 KiB per 16-token KV page. A 160-token prompt with
    // 8 tokens to generate reserves 24,192 + 11 pages = 114,304 bytes; its snapshot at 128 tokens holds 89,728.
    // 330,000 bytes leave room for two snapshots beside one running request, not three.
    let budget = 330_000u64;
    let gib = format!("{}", budget as f64 / (1u64 << 30) as f64);
    let router = RouterProcess::start(&dir, &["--state-budget-gib", &gib, "--max-running", "1"]).expect("router");
    let url = router.url();
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| ids(500 + i, 160)).collect();
    let body = |p: &[u32]| json!({"prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    let hits = || metric(url, "vllm:prefix_cache_hits_total");

    // Each twice: a short prompt is cut at its last boundary, and its state there kept, once its beginning has been
    // seen (the second time).
    for p in &prompts {
        for _ in 0..2 {
            complete(url, &body(p)).await;
            let bytes = metric(url, "moe_prefix_cache_bytes").await;
            assert!(bytes <= budget as f64, "the cache holds {bytes} bytes, over the {budget}-byte budget");
        }
    }
    assert_eq!(metric(url, "moe_prefix_cache_entries").await, 2.0, "two snapshots fit beside a request");
    assert!(metric(url, "moe_prefix_cache_evictions_total").await >= 2.0);
    assert_eq!(hits().await, 0.0, "four different prompts share nothing, and the first of each pair keeps nothing");

    // The two most recent are found; the oldest was evicted and is computed again (and cached again).
    let h0 = hits().await;
    complete(url, &body(&prompts[3])).await;
    assert_eq!(hits().await - h0, 128.0, "the newest prompt is still cached");
    let h1 = hits().await;
    complete(url, &body(&prompts[0])).await;
    assert_eq!(hits().await - h1, 0.0, "the oldest prompt was evicted");
    // Re-adding the first evicted the least recently used of the two left: prompts[2] (prompts[3] was just used).
    let h2 = hits().await;
    complete(url, &body(&prompts[3])).await;
    assert_eq!(hits().await - h2, 128.0);
    let h3 = hits().await;
    complete(url, &body(&prompts[2])).await;
    assert_eq!(hits().await - h3, 0.0, "the least recently used went first");
    assert!(metric(url, "moe_prefix_cache_bytes").await <= budget as f64);
}
