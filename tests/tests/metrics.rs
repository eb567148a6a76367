//! `/metrics` of a router and its expert nodes, through real processes: the golden list of series (names, types,
//! labels), histograms that count exactly what was served, the router's and the nodes' accounts of the same work
//! agreeing, and the Grafana dashboard querying only series that exist.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use moe_e2e::{fixture, metric_value, ExpertNodeProcess, RouterProcess};
use moe_telemetry::metrics::parse_series;
use serde_json::{json, Value};

/// The router's series: name, type, and the labels each series carries besides `model_name` (which all carry).
const ROUTER_GOLDEN: &[(&str, &str, &[&str])] = &[
    ("vllm:num_requests_running", "gauge", &[]),
    ("vllm:num_requests_waiting", "gauge", &[]),
    ("vllm:kv_cache_usage_perc", "gauge", &[]),
    ("vllm:prompt_tokens_total", "counter", &[]),
    ("vllm:generation_tokens_total", "counter", &[]),
    ("vllm:request_success_total", "counter", &["finished_reason"]),
    ("vllm:time_to_first_token_seconds", "histogram", &[]),
    ("vllm:inter_token_latency_seconds", "histogram", &[]),
    ("vllm:e2e_request_latency_seconds", "histogram", &[]),
    ("vllm:request_queue_time_seconds", "histogram", &[]),
    ("vllm:request_prefill_time_seconds", "histogram", &[]),
    ("vllm:request_decode_time_seconds", "histogram", &[]),
    ("vllm:request_prompt_tokens", "histogram", &[]),
    ("vllm:request_generation_tokens", "histogram", &[]),
    ("vllm:prefix_cache_queries_total", "counter", &[]),
    ("vllm:prefix_cache_hits_total", "counter", &[]),
    ("moe_prefix_cache_bytes", "gauge", &[]),
    ("moe_prefix_cache_entries", "gauge", &[]),
    ("moe_prefix_cache_evictions_total", "counter", &[]),
    ("moe_num_requests_running", "gauge", &[]),
    ("moe_num_requests_waiting", "gauge", &[]),
    ("moe_state_bytes_reserved", "gauge", &[]),
    ("moe_prompt_tokens_total", "counter", &[]),
    ("moe_generation_tokens_total", "counter", &[]),
    ("moe_engine_steps_total", "counter", &[]),
    ("moe_requests_finished_total", "counter", &[]),
    ("moe_requests_cancelled_total", "counter", &[]),
    ("moe_requests_failed_total", "counter", &[]),
    ("moe_requests_shed_total", "counter", &[]),
    ("moe_requests_expired_total", "counter", &[]),
    ("moe_placement_epoch", "gauge", &[]),
    ("moe_expert_nodes", "gauge", &[]),
    ("moe_expert_messages_total", "counter", &[]),
    ("moe_expert_bytes_sent_total", "counter", &[]),
    ("moe_expert_bytes_received_total", "counter", &[]),
    ("moe_expert_pieces_resent_total", "counter", &[]),
    ("moe_expert_pieces_hedged_total", "counter", &[]),
    ("moe_expert_hedges_won_total", "counter", &[]),
    ("moe_expert_pieces_cancelled_total", "counter", &[]),
    ("moe_expert_holds_total", "counter", &[]),
    ("moe_expert_holds_abandoned_total", "counter", &[]),
    ("moe_expert_holding", "gauge", &[]),
    ("moe_expert_reconnects_total", "counter", &[]),
    ("moe_dispatch_round_trip_seconds", "histogram", &["node"]),
    ("moe_node_bytes_sent_total", "counter", &["node"]),
    ("moe_node_bytes_received_total", "counter", &["node"]),
    ("moe_node_pairs_total", "counter", &["node"]),
    ("moe_node_token_share", "gauge", &["node"]),
    ("moe_layer_busiest_node_pairs_total", "counter", &["layer"]),
    ("moe_layer_mean_node_pairs_total", "counter", &["layer"]),
    ("moe_layer_load_imbalance", "gauge", &["layer"]),
    ("moe_hot_expert_tokens", "gauge", &["rank", "layer", "expert"]),
];

/// An expert node's series; each carries `node`.
const NODE_GOLDEN: &[(&str, &str, &[&str])] = &[
    ("moe_node_queue_depth", "gauge", &[]),
    ("moe_node_queue_wait_seconds", "histogram", &[]),
    ("moe_node_compute_seconds", "histogram", &[]),
    ("moe_node_batches_total", "counter", &[]),
    ("moe_node_tokens_total", "counter", &[]),
    ("moe_node_expert_pairs_total", "counter", &[]),
    ("moe_node_cancelled_total", "counter", &[]),
    ("moe_node_refusals_total", "counter", &["reason"]),
    ("moe_node_resident_experts", "gauge", &[]),
    ("moe_node_resident_bytes", "gauge", &[]),
    ("moe_node_placement_epoch", "gauge", &[]),
];

/// Checks an exposition against a golden list: every family declared with its type, nothing undeclared, and each
/// series with exactly the labels listed plus `always`.
fn check_golden(text: &str, golden: &[(&str, &str, &[&str])], always: &str) {
    let declared: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_owned(), t.to_owned()))
        .collect();
    let want: BTreeMap<String, String> = golden.iter().map(|(n, t, _)| (n.to_string(), t.to_string())).collect();
    assert_eq!(declared, want, "declared families differ from the golden list:\n{text}");
    for (name, labels, _) in parse_series(text) {
        let (family, kind, extra) = golden
            .iter()
            .find(|(n, t, _)| {
                name == *n
                    || *t == "histogram" && ["_bucket", "_sum", "_count"].iter().any(|s| name == format!("{n}{s}"))
            })
            .unwrap_or_else(|| panic!("series {name} belongs to no declared family"));
        let mut keys: BTreeSet<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.remove(always), "{name} lacks the label {always}: {labels:?}");
        if *kind == "histogram" && name.ends_with("_bucket") {
            assert!(keys.remove("le"), "{name} lacks le");
        }
        let want: BTreeSet<&str> = extra.iter().copied().collect();
        assert_eq!(keys, want, "labels of {name} (family {family})");
    }
}

/// The value of the series `name` whose labels include `label=value`.
fn labelled(text: &str, name: &str, label: &str, value: &str) -> Option<f64> {
    parse_series(text)
        .into_iter()
        .find(|(n, labels, _)| n == name && labels.iter().any(|(k, v)| k == label && v == value))
        .map(|(_, _, v)| v)
}

async fn scrape(url: &str) -> String {
    let resp = reqwest::get(url).await.expect("scrape");
    assert_eq!(resp.status().as_u16(), 200);
    let kind = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "content type {kind}");
    resp.text().await.expect("text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_and_node_metrics_follow_the_golden_list_and_count_what_was_served() {
    let dir = fixture("qwen35");
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    let nodes = [
        ExpertNodeProcess::start(&dir, "0-3", &metrics).expect("node"),
        ExpertNodeProcess::start(&dir, "4-7", &metrics).expect("node"),
    ];
    let at = format!("{},{}", nodes[0].addr(), nodes[1].addr());
    let router = RouterProcess::start(&dir, &["--experts-at", &at]).expect("router");
    let url = router.url();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("client");

    // Known work: three sequences of known prompt lengths, each exactly 6 tokens (one of them streamed, one with
    // two choices), and one that stops at its first token.
    let prompts: [Vec<u32>; 3] = [(1..9).collect(), (20..31).collect(), (40..45).collect()];
    let mut sequences = 0;
    let mut prompt_tokens = 0;
    for (i, p) in prompts.iter().enumerate() {
        let n = if i == 1 { 2 } else { 1 };
        let body = json!({"model": "qwen35", "prompt": p, "max_tokens": 6, "temperature": 0, "ignore_eos": true,
                          "n": n, "stream": i == 2});
        let resp = client.post(format!("{url}/v1/completions")).json(&body).send().await.expect("sent");
        assert_eq!(resp.status().as_u16(), 200);
        let _ = resp.text().await.expect("body");
        sequences += n;
        prompt_tokens += n * p.len();
    }
    let first: Value = client
        .post(format!("{url}/v1/completions"))
        .json(&json!({"model": "qwen35", "prompt": prompts[0], "max_tokens": 1, "temperature": 0, "ignore_eos": true}))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(first["usage"]["completion_tokens"], 1);

    let text = scrape(&format!("{url}/metrics")).await;
    check_golden(&text, ROUTER_GOLDEN, "model_name");
    let v = |name: &str| metric_value(&text, name).unwrap_or_else(|| panic!("{name} missing:\n{text}"));
    let all = (sequences + 1) as f64;
    assert_eq!(v("vllm:e2e_request_latency_seconds_count"), all);
    assert_eq!(v("vllm:time_to_first_token_seconds_count"), all);
    assert_eq!(v("vllm:request_queue_time_seconds_count"), all);
    assert_eq!(v("vllm:request_prefill_time_seconds_count"), all);
    assert_eq!(v("vllm:request_decode_time_seconds_count"), all);
    // Five gaps between six tokens, none after a single token.
    assert_eq!(v("vllm:inter_token_latency_seconds_count"), (sequences * 5) as f64);
    assert_eq!(v("vllm:request_generation_tokens_sum"), (sequences * 6 + 1) as f64);
    assert_eq!(v("vllm:request_prompt_tokens_sum"), (prompt_tokens + prompts[0].len()) as f64);
    assert_eq!(v("vllm:generation_tokens_total"), (sequences * 6 + 1) as f64);
    assert_eq!(v("vllm:prompt_tokens_total"), (prompt_tokens + prompts[0].len()) as f64);
    assert_eq!(labelled(&text, "vllm:request_success_total", "finished_reason", "length"), Some(all));
    assert_eq!(v("vllm:num_requests_running"), 0.0);
    assert_eq!(v("vllm:kv_cache_usage_perc"), 0.0);
    // A bucket never counts more than the histogram does, and +Inf counts all.
    assert_eq!(labelled(&text, "vllm:e2e_request_latency_seconds_bucket", "le", "+Inf"), Some(all));

    // The router's account of the data plane and the nodes' agree, message for message and pair for pair.
    let mut node_batches = 0.0;
    let mut node_pairs = 0.0;
    for node in &nodes {
        let at = node.metrics_addr().expect("the node announced its metrics address");
        let ntext = scrape(&format!("http://{at}/metrics")).await;
        check_golden(&ntext, NODE_GOLDEN, "node");
        let nv = |name: &str| metric_value(&ntext, name).unwrap_or_else(|| panic!("{name} missing:\n{ntext}"));
        assert!(nv("moe_node_batches_total") > 0.0);
        assert_eq!(nv("moe_node_compute_seconds_count"), nv("moe_node_batches_total"));
        assert_eq!(nv("moe_node_queue_wait_seconds_count"), nv("moe_node_batches_total"));
        assert_eq!(nv("moe_node_queue_depth"), 0.0);
        // Four experts of each of the four MoE layers.
        assert_eq!(nv("moe_node_resident_experts"), 16.0);
        assert!(nv("moe_node_resident_bytes") > 0.0);
        node_batches += nv("moe_node_batches_total");
        node_pairs += nv("moe_node_expert_pairs_total");
    }
    assert_eq!(v("moe_expert_messages_total"), node_batches);
    assert_eq!(v("moe_dispatch_round_trip_seconds_count"), node_batches);
    assert_eq!(v("moe_node_pairs_total"), node_pairs);
    assert!((v("moe_node_token_share") - 1.0).abs() < 1e-9, "shares sum to 1");
    assert_eq!(v("moe_expert_nodes"), 2.0);
    let hot = parse_series(&text).into_iter().filter(|(n, _, _)| n == "moe_hot_expert_tokens").count();
    assert!((1..=10).contains(&hot), "{hot} hot experts listed");
    // Each token visits its top-3 experts once per MoE layer: the hottest expert cannot have more tokens than
    // were fed through the model.
    let fed = v("vllm:prompt_tokens_total") + v("vllm:generation_tokens_total");
    let hottest = labelled(&text, "moe_hot_expert_tokens", "rank", "1").expect("rank 1");
    assert!(hottest > 0.0 && hottest <= fed, "hottest {hottest} of {fed} tokens");
    for l in 0..4 {
        let imbalance = labelled(&text, "moe_layer_load_imbalance", "layer", &l.to_string()).expect("layer");
        assert!((1.0..=2.001).contains(&imbalance), "layer {l}: imbalance {imbalance} out of [1, nodes]");
    }

    // The shipped dashboard queries only series the router or the nodes export.
    let mut exported: BTreeSet<String> = parse_series(&text).into_iter().map(|(n, _, _)| n).collect();
    for node in &nodes {
        let ntext = scrape(&format!("http://{}/metrics", node.metrics_addr().expect("addr"))).await;
        exported.extend(parse_series(&ntext).into_iter().map(|(n, _, _)| n));
    }
    let dashboard = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/moe-mesh.json"))
        .expect("the dashboard");
    let queried = moe_e2e::dashboard_metrics(&dashboard).expect("dashboard JSON");
    assert!(queried.len() >= 10, "the dashboard queries {queried:?}");
    for name in &queried {
        assert!(exported.contains(name), "the dashboard queries {name}, which nothing exports");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moectl_bench_reports_what_the_cluster_measured_during_the_run() {
    let dir = fixture("qwen35");
    let nodes = [
        ExpertNodeProcess::start(&dir, "0-3", &[]).expect("node"),
        ExpertNodeProcess::start(&dir, "4-7", &[]).expect("node"),
    ];
    let at = format!("{},{}", nodes[0].addr(), nodes[1].addr());
    let router = RouterProcess::start(&dir, &["--experts-at", &at]).expect("router");
    let url = router.url().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(moe_e2e::bin("moectl"))
            .args(["bench", "--url", &url, "--model", "qwen35", "--requests", "6", "--concurrency", "3"])
            .args(["--input-len", "12", "--output-len", "5", "--vocab", "250", "--stream", "--json"])
            .output()
            .expect("moectl runs")
    })
    .await
    .expect("joined");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["completed"], 6);
    let c = &report["cluster"];
    let nodes: Vec<&String> = c["nodes"].as_object().expect("per node").keys().collect();
    assert_eq!(nodes.len(), 2, "{c}");
    let share: f64 =
        c["nodes"].as_object().expect("nodes").values().map(|n| n["pair_share"].as_f64().unwrap_or(0.0)).sum();
    assert!((share - 1.0).abs() < 1e-9, "shares sum to 1: {c}");
    let imbalance = c["layer_imbalance"]["max"].as_f64().expect("imbalance");
    assert!((1.0..=2.001).contains(&imbalance), "{c}");
    // A token fed goes, per MoE layer, to each node hosting one of its experts (one or both: 64 f32 out each) and
    // comes back as one row of 64 f32 per (token, expert) pair (top-3): 1024 to 1280 bytes, over 4 layers. Counted
    // over prompt + generated tokens (each sequence's last token is not fed: 16 of every 17 here), a token costs
    // between 0.9 × 4096 and 5120 bytes.
    let per_token = c["wire_bytes_per_token"].as_f64().expect("bytes per token");
    assert!((0.9 * 4096.0..=5120.0).contains(&per_token), "{per_token} bytes per token");
}
