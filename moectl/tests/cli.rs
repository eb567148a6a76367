//! The `moectl` command line as operators and scripts use it: real processes, real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn moectl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moectl")).args(args).output().expect("moectl runs")
}

fn ok_json(args: &[&str]) -> Value {
    let out = moectl(args);
    assert!(out.status.success(), "moectl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn fails_with(args: &[&str], needle: &str) {
    let out = moectl(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "moectl {args:?} should fail");
    assert!(stderr.contains(needle), "moectl {args:?}: stderr {stderr:?} should mention {needle:?}");
    assert!(!stderr.contains("panicked"), "moectl {args:?} panicked: {stderr}");
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id")).collect()
}

fn init_tiny(dir: &Path, extra: &[&str]) {
    let mut args = vec!["init-model", "--preset", "tiny", "--out", dir.to_str().expect("utf-8 path"), "--seed", "3"];
    args.extend_from_slice(extra);
    let out = moectl(&args);
    assert!(out.status.success(), "init-model failed: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn generate_json_contract() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tmp.path().join("tiny");
    init_tiny(&model, &[]);
    let m = model.to_str().expect("utf-8");
    let v = ok_json(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "hello world",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--logprobs",
        "3",
        "--json",
    ]);
    let prompt = ids(&v["prompt_ids"]);
    let output = ids(&v["output_ids"]);
    assert!(!prompt.is_empty() && !output.is_empty() && output.len() <= 6);
    assert!(v["text"].is_string());
    let lps = v["logprobs"].as_array().expect("logprobs");
    assert_eq!(lps.len(), output.len(), "one entry per output token without --echo");
    for (i, pos) in lps.iter().enumerate() {
        let pairs = pos.as_array().expect("pairs");
        assert_eq!(pairs.len(), 3);
        let lp: Vec<f64> = pairs.iter().map(|p| p[1].as_f64().expect("lp")).collect();
        assert!(lp.windows(2).all(|w| w[0] >= w[1]), "most likely first");
        assert!(lp.iter().all(|&x| x <= 0.0));
        assert_eq!(pairs[0][0].as_u64(), Some(output[i]), "greedy picks the top log-prob");
    }

    // --echo: every prompt and output position, and the same continuation.
    let e = ok_json(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "hello world",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--logprobs",
        "2",
        "--echo",
        "--json",
    ]);
    assert_eq!(ids(&e["output_ids"]), output);
    assert_eq!(e["logprobs"].as_array().expect("logprobs").len(), prompt.len() + output.len());
    assert_eq!(e["logprobs"][prompt.len() - 1][0][0].as_u64(), Some(output[0]));

    // Chat template and seeded sampling.
    let c = ok_json(&["generate", "--model", m, "--prompt", "hi", "--chat", "--max-tokens", "4", "--json"]);
    assert!(ids(&c["prompt_ids"]).len() > 3, "the template wraps the message");
    let s1 = ok_json(&["generate", "--model", m, "--prompt", "hi", "--max-tokens", "8", "--seed", "7", "--json"]);
    let s2 = ok_json(&["generate", "--model", m, "--prompt", "hi", "--max-tokens", "8", "--seed", "7", "--json"]);
    assert_eq!(s1["output_ids"], s2["output_ids"], "same seed, same tokens");
}

#[test]
fn generate_matches_reference_greedy() {
    let exp: Value = serde_json::from_str(&std::fs::read_to_string(fixture("qwen35.expected.json")).expect("fixture"))
        .expect("json");
    let case = &exp["greedy"][1];
    let prompt: Vec<String> = ids(&case["prompt_ids"]).iter().map(u64::to_string).collect();
    let want = ids(&case["output_ids"]);
    let margins: Vec<f64> =
        case["margins"].as_array().expect("margins").iter().map(|m| m.as_f64().expect("f")).collect();
    let decisive = margins.iter().take_while(|&&m| m > 1e-2).count();
    let dir = fixture("qwen35");
    let v = ok_json(&[
        "generate",
        "--model",
        dir.to_str().expect("utf-8"),
        "--prompt-ids",
        &prompt.join(","),
        "--max-tokens",
        &want.len().to_string(),
        "--temperature",
        "0",
        "--json",
    ]);
    assert_eq!(ids(&v["output_ids"])[..decisive], want[..decisive]);
}

#[test]
fn sharded_model_equals_single_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let single = tmp.path().join("single");
    let sharded = tmp.path().join("sharded");
    init_tiny(&single, &[]);
    init_tiny(&sharded, &["--shard-gib", "0.0002"]);
    let shards = std::fs::read_dir(&sharded)
        .expect("dir")
        .filter(|e| e.as_ref().map(|e| e.file_name().to_string_lossy().ends_with(".safetensors")).unwrap_or(false));
    assert!(shards.count() > 1, "a small shard size splits the model");
    assert!(sharded.join("model.safetensors.index.json").exists());
    let run = |d: &Path| {
        ok_json(&[
            "generate",
            "--model",
            d.to_str().expect("utf-8"),
            "--prompt-ids",
            "1,2,3,4",
            "--max-tokens",
            "5",
            "--temperature",
            "0",
            "--logprobs",
            "1",
            "--json",
        ])
    };
    assert_eq!(run(&single), run(&sharded));
}

#[test]
fn errors_are_one_clear_line() {
    fails_with(&["generate", "--model", "/nonexistent/model", "--prompt", "x"], "/nonexistent/model");
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tmp.path().join("tiny");
    init_tiny(&model, &[]);
    let m = model.to_str().expect("utf-8");
    fails_with(&["generate", "--model", m, "--prompt-ids", "1,999999"], "999999");
    fails_with(&["generate", "--model", m, "--prompt", "x", "--top-p", "0"], "top_p");
    fails_with(&["generate", "--model", m, "--prompt", "x", "--temperature", "-1"], "temperature");
    fails_with(&["generate", "--model", m, "--prompt", "x", "--max-tokens", "10000000"], "context");
    fails_with(&["generate", "--model", m, "--prompt", "x", "--echo"], "--logprobs");
    fails_with(&["init-model", "--preset", "nope", "--out", m], "unknown preset");
    fails_with(&["init-model", "--preset", "tiny", "--out", m], "not empty");
    std::fs::write(model.join("config.json"), "{\"model_type\": \"llama\"}").expect("write");
    fails_with(&["generate", "--model", m, "--prompt", "x"], "llama");
}

/// `bench-model --json` keeps its fields (`prefill` is the first prompt length) and reports every length in
/// `prefills`, each with its stage breakdown, which `plan calibrate` reads.
#[test]
fn bench_model_reports_each_prompt_length_with_its_stages() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tmp.path().join("tiny");
    init_tiny(&model, &[]);
    let m = model.to_str().expect("utf-8");
    let v = ok_json(&[
        "bench-model",
        "--model",
        m,
        "--batch",
        "1,2",
        "--rounds",
        "1",
        "--decode-steps",
        "1",
        "--prompt-len",
        "40,8",
        "--bandwidth-gib",
        "0.02",
        "--json",
    ]);
    assert_eq!(v["prefill"]["prompt_tokens"], 40, "{v}");
    let prefills = v["prefills"].as_array().expect("prefills");
    assert_eq!(prefills.iter().map(|p| p["prompt_tokens"].as_u64()).collect::<Vec<_>>(), [Some(40), Some(8)]);
    for p in prefills.iter().chain([&v["prefill"]]) {
        assert!(p["tokens_per_s"].as_f64().is_some_and(|t| t > 0.0), "{p}");
        for stage in ["routed_experts", "dense_projections", "deltanet_chunked", "attention_core", "rest"] {
            assert!(p["stages"][stage]["seconds"].as_f64().is_some(), "{stage} in {p}");
        }
    }
    assert_eq!(v["decode"].as_array().map(Vec::len), Some(2));
    fails_with(&["bench-model", "--model", m, "--prompt-len", "8,0"], "--prompt-len");
}
