//! `moectl generate --experts-at` through the real binaries: the JSON output (f32 on the wire, the default) equals
//! the in-process run's.

use std::process::Command;

use moe_e2e::{bin, fixture, regrouping_tolerance, ExpertNodeProcess};
use serde_json::Value;

fn generate(extra: &[&str]) -> Value {
    let model = fixture("qwen35");
    let out = Command::new(bin("moectl"))
        .arg("generate")
        .arg("--model")
        .arg(&model)
        .args(["--prompt-ids", "5,17,33,2,90,41,8", "--max-tokens", "16", "--temperature", "0", "--json"])
        .args(["--logprobs", "4", "--echo"])
        .args(extra)
        .args(moe_e2e::tls::flags(moe_tls::Role::Controller))
        .output()
        .expect("moectl runs");
    assert!(out.status.success(), "moectl {extra:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn logprobs(v: &Value) -> Vec<(u64, f64)> {
    v["logprobs"]
        .as_array()
        .expect("logprobs")
        .iter()
        .flat_map(|pos| pos.as_array().expect("position").iter())
        .map(|pair| (pair[0].as_u64().expect("id"), pair[1].as_f64().expect("logprob")))
        .collect()
}

#[test]
fn generate_with_experts_on_three_nodes_equals_in_process() {
    let model = fixture("qwen35");
    let nodes: Vec<_> = ["layers=0-1", "layers=2-3:experts=0-3", "layers=2-3:experts=4-7"]
        .iter()
        .map(|s| ExpertNodeProcess::start(&model, s, &[]).expect("node starts"))
        .collect();
    let addrs = nodes.iter().map(|n| n.addr()).collect::<Vec<_>>().join(",");
    let local = generate(&[]);
    let remote = generate(&["--experts-at", &addrs]);
    assert_eq!(remote["output_ids"], local["output_ids"]);
    assert_eq!(remote["text"], local["text"]);
    let (a, b) = (logprobs(&local), logprobs(&remote));
    assert_eq!(a.len(), b.len());
    let worst = a.iter().zip(&b).map(|(x, y)| (x.1 - y.1).abs()).fold(0.0, f64::max);
    assert!(a.iter().zip(&b).all(|(x, y)| x.0 == y.0), "the top tokens differ");
    assert!(worst == 0.0, "the router adds the experts' outputs as one process does, yet log-probs differ by {worst}");

    // Sums per node: the same tokens, the last bits grouped by node.
    let node = generate(&["--experts-at", &addrs, "--combine", "node"]);
    assert_eq!(node["output_ids"], local["output_ids"]);
    let worst = logprobs(&local).iter().zip(&logprobs(&node)).map(|(x, y)| (x.1 - y.1).abs()).fold(0.0, f64::max);
    assert!(worst <= regrouping_tolerance(), "log-probs differ by {worst} with sums per node");

    // bf16 on the wire: the same computation, rounded.
    let bf16 = generate(&["--experts-at", &addrs, "--wire-dtype", "bf16"]);
    let worst = logprobs(&local).iter().zip(&logprobs(&bf16)).map(|(x, y)| (x.1 - y.1).abs()).fold(0.0, f64::max);
    eprintln!("bf16 wire: log-probs within {worst:.2e}; tokens equal: {}", bf16["output_ids"] == local["output_ids"]);
}

#[test]
fn generate_reports_unreachable_and_incomplete_expert_nodes() {
    let model = fixture("qwen35");
    let out = Command::new(bin("moectl"))
        .arg("generate")
        .arg("--model")
        .arg(&model)
        .args(["--prompt-ids", "1,2", "--experts-at", "127.0.0.1:1"])
        .args(moe_e2e::tls::flags(moe_tls::Role::Controller))
        .output()
        .expect("moectl runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: connecting to the expert nodes: expert node 127.0.0.1:1 is unreachable"),
        "{stderr}"
    );

    let half = ExpertNodeProcess::start(&model, "layers=0-2", &[]).expect("node starts");
    let out = Command::new(bin("moectl"))
        .arg("generate")
        .arg("--model")
        .arg(&model)
        .args(["--prompt-ids", "1,2", "--experts-at", half.addr()])
        .args(moe_e2e::tls::flags(moe_tls::Role::Controller))
        .output()
        .expect("moectl runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("expert 0 of layer 3 is hosted by none of"), "{stderr}");
}
