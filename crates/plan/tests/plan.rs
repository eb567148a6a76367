//! The planner's analytic parts against hand-computed cases, its monotonicity, and its answers to bad inputs.

use std::collections::BTreeMap;
use std::path::Path;

use moe_plan::calibrate;
use moe_plan::{
    simulate, Arrivals, Cluster, EngineLimits, ExpertLoad, HardwareFile, Inputs, Layout, Length, Network, Overhead,
    PlanError, Profile, Shape, Slo, Space, Stage, Step, Traffic,
};

/// A model small enough to count by hand: hidden 64, one linear and one full layer, 8 experts of width 32, top 2.
const TINY: &str = r#"{
  "model_type": "qwen3_5_moe_text",
  "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
  "layer_types": ["linear_attention", "full_attention"],
  "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
  "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
  "linear_conv_kernel_dim": 4,
  "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 16,
  "tie_word_embeddings": false
}"#;

fn tiny() -> Shape {
    let config = moe_model::ModelConfig::from_json_str(TINY, Path::new("tiny/config.json")).expect("tiny config");
    Shape::of(&config)
}

fn profile(name: &str) -> Profile {
    Profile {
        name: name.into(),
        source: "a test".into(),
        cost_per_hour: 1.0,
        memory_bytes: 1e9,
        memory_bandwidth_bytes_per_s: 1e10,
        matmul_flops_per_s: 1e12,
        vector_flops_per_s: 1e11,
        cores: 2,
        network: Network { bandwidth_bytes_per_s: 1e9, round_trip_s: 50e-6, codec_bytes_per_s: 0.0 },
        corrections: BTreeMap::new(),
        rest: Overhead::default(),
        serving: Overhead::default(),
    }
}

fn layout(routers: usize, expert_nodes: usize) -> Layout {
    Layout { routers, expert_nodes, replicas: 0, micro_batches: 1, one_machine: false }
}

#[test]
fn the_tiny_models_bytes_are_counted_by_hand() {
    let s = tiny();
    // Full layer: q with its gate 2·2·16·64, k and v 2·1·16·64, o 2·16·64.
    // Linear layer: qkv (2·2·8 + 4·8 = 64 channels)·64, z 32·64, b and a 2·4·64, out 64·32.
    // Both MoE: router 8·64, shared expert 3·64·16, its gate 64.
    assert_eq!(s.dense_params, 8192 + 8704 + 2 * 3648);
    assert_eq!(s.router_weight_bytes(), 24192.0 * 2.0 + 2.0 * 100.0 * 64.0 * 2.0);
    assert_eq!(s.expert_bytes(), 3.0 * 64.0 * 32.0 * 2.0);
    assert_eq!(s.all_expert_bytes(), 12288.0 * 8.0 * 2.0);
    // Keys and values of the one full layer, f32.
    assert_eq!(s.kv_bytes_per_token(), 2.0 * 16.0 * 4.0);
    // State 4·8·8 and conv window 3·64, f32, one linear layer.
    assert_eq!(s.deltanet_slot_bytes(), (256.0 + 192.0) * 4.0);
}

#[test]
fn a_decode_token_crosses_the_wire_once_out_and_once_per_expert_back() {
    let s = tiny();
    let p = profile("p");
    let load = ExpertLoad::zipf(s.experts, 0.0);
    let cluster = Cluster::new(&s, &p, &p, layout(1, 1), &load);
    let step = Step { decode: 1, prefill: 0, logits: 1, decode_context: 10.0, prefill_context: 0.0 };
    let cost = cluster.step(&step, 0.0);
    // Per MoE layer: the token's row out (64 f32), an id and weight per pair (2 · 8 bytes), a row per pair back.
    let per_layer = 64.0 * 4.0 + 2.0 * 8.0 + 2.0 * 64.0 * 4.0;
    assert!((cost.wire_bytes - 2.0 * per_layer).abs() < 1e-6, "{} vs {}", cost.wire_bytes, 2.0 * per_layer);
    // Co-located: nothing on the wire.
    let local = Cluster::new(&s, &p, &p, layout(1, 0), &load).step(&step, 0.0);
    assert_eq!(local.wire_bytes, 0.0);
    assert_eq!(local.wire, 0.0);
}

#[test]
fn a_stage_takes_the_larger_of_its_compute_and_its_memory_time_times_its_correction() {
    let mut p = profile("p");
    // 1e9 FLOPs at 1e12: 1 ms; 1e6 bytes at 1e10: 0.1 ms.
    let t = p.stage_time(Stage::DenseProjections, 1e9, 1e6, 8.0, 1.0);
    assert!((t - 1e-3).abs() < 1e-12);
    // Vector stages use the vector peak: 10 ms.
    let t = p.stage_time(Stage::AttentionCore, 1e9, 1e6, 8.0, 1.0);
    assert!((t - 1e-2).abs() < 1e-12);
    // Memory-bound: 1e9 bytes at 1e10 is 0.1 s.
    let t = p.stage_time(Stage::RoutedExperts, 1e6, 1e9, 1.0, 1.0);
    assert!((t - 0.1).abs() < 1e-12);
    // Half the cores: half the FLOP/s.
    let t = p.stage_time(Stage::DenseProjections, 1e9, 0.0, 8.0, 0.5);
    assert!((t - 2e-3).abs() < 1e-12);
    // Corrections interpolate in log tokens, and hold beyond the ends.
    p.corrections.insert(Stage::DenseProjections, vec![[1.0, 2.0], [100.0, 4.0]]);
    assert!((p.correction(Stage::DenseProjections, 10.0) - 3.0).abs() < 1e-12);
    assert_eq!(p.correction(Stage::DenseProjections, 0.5), 2.0);
    assert_eq!(p.correction(Stage::DenseProjections, 1000.0), 4.0);
    assert_eq!(p.correction(Stage::AttentionCore, 10.0), 1.0);
}

fn inputs<'a>(s: &'a Shape, p: &'a Profile, traffic: Traffic, space: Space) -> Inputs<'a> {
    Inputs {
        shape: s,
        router: p,
        expert: p,
        traffic,
        slo: Slo { ttft_s: None, tpot_s: None, percentile: 90 },
        load: ExpertLoad::zipf(s.experts, 0.0),
        limits: EngineLimits::default(),
        space,
        one_machine: false,
        wire_value_bytes: 4.0,
    }
}

fn closed(concurrency: usize) -> Traffic {
    Traffic {
        arrivals: Arrivals::Concurrency(concurrency),
        prompt: Length::Fixed(64),
        output: Length::Fixed(32),
        requests: 4 * concurrency,
    }
}

fn one(routers: usize, expert_nodes: usize) -> Space {
    Space { routers: vec![routers], expert_nodes: vec![expert_nodes], replicas: vec![0], micro_batches: vec![1] }
}

#[test]
fn memory_is_weights_caches_and_buffers_and_too_little_is_said() {
    let s = tiny();
    let mut p = profile("p");
    let plan = inputs(&s, &p, closed(4), one(1, 0)).plan().expect("plan");
    let c = &plan.candidates[0];
    // Co-located: the router holds every expert too.
    assert_eq!(c.router_memory.weights, s.router_weight_bytes() + s.all_expert_bytes());
    // Four sequences of 64 + 32 tokens reserved, and four DeltaNet slots.
    assert_eq!(c.outcome.peak_running, 4);
    assert_eq!(c.router_memory.kv_pages, 4.0 * 96.0 * s.kv_bytes_per_token());
    assert_eq!(c.router_memory.deltanet_slots, 4.0 * s.deltanet_slot_bytes());
    assert!(c.router_memory.fits);
    p.memory_bytes = c.router_memory.total - 1.0;
    let plan = inputs(&s, &p, closed(4), one(1, 0)).plan().expect("plan");
    let c = &plan.candidates[0];
    assert!(!c.router_memory.fits);
    assert!(c.verdict.starts_with("router needs"), "{}", c.verdict);
    assert!(plan.best.is_none());
}

#[test]
fn more_expert_nodes_or_more_routers_never_predict_less_throughput_at_the_same_batch() {
    let s = tiny();
    // Where the router's codec and link are not the bottleneck, compute and queueing only ever gain from another
    // node.
    let mut p = profile("p");
    p.network.codec_bytes_per_s = f64::INFINITY;
    p.network.bandwidth_bytes_per_s = f64::INFINITY;
    let mut last = 0.0;
    for nodes in 1..=8 {
        let plan = inputs(&s, &p, closed(16), one(1, nodes)).plan().expect("plan");
        let t = plan.candidates[0].outcome.output_tokens_per_s;
        assert!(t >= last * (1.0 - 1e-9), "{nodes} expert nodes: {t} < {last}");
        last = t;
    }
    // The one thing another node costs is real: a token's row is encoded and sent once for each node that holds one
    // of its experts, so on a router whose codec and link are slow the extra sends may take back a little, never
    // more than 1 %.
    let p = profile("p");
    let mut last = 0.0;
    for nodes in 1..=8 {
        let plan = inputs(&s, &p, closed(16), one(1, nodes)).plan().expect("plan");
        let t = plan.candidates[0].outcome.output_tokens_per_s;
        assert!(t >= last * 0.99, "{nodes} expert nodes: {t} < {last}");
        last = last.max(t);
    }
    let mut last = 0.0;
    for routers in 1..=4 {
        // The same batch on each router: 16 sequences per router.
        let plan = inputs(&s, &p, closed(16 * routers), one(routers, 2)).plan().expect("plan");
        let t = plan.candidates[0].outcome.output_tokens_per_s;
        assert!(t >= last * (1.0 - 1e-9), "{routers} routers: {t} < {last}");
        last = t;
    }
}

#[test]
fn a_closed_loop_step_is_the_roofline_sum_and_tpot_follows_it() {
    let s = tiny();
    let p = profile("p");
    let load = ExpertLoad::zipf(s.experts, 0.0);
    let cluster = Cluster::new(&s, &p, &p, layout(1, 0), &load);
    // One client, one-token prompts: every step after the first is a decode step of one token.
    let traffic = Traffic {
        arrivals: Arrivals::Concurrency(1),
        prompt: Length::Fixed(1),
        output: Length::Fixed(11),
        requests: 1,
    };
    let out = simulate(&cluster, &traffic, &EngineLimits::default());
    let step = |ctx: f64| {
        cluster.step(&Step { decode: 1, prefill: 0, logits: 1, decode_context: ctx, prefill_context: 0.0 }, 0.0).total
    };
    let decode: f64 = (1..11).map(|g| step(1.0 + g as f64)).sum();
    assert!((out.tpot_s.mean - decode / 10.0).abs() < 1e-12, "{} vs {}", out.tpot_s.mean, decode / 10.0);
    assert!((out.output_tokens_per_s - 11.0 / out.e2e_s.mean).abs() < 1e-9);
}

#[test]
fn an_impossible_slo_is_met_by_nothing_and_says_by_how_much() {
    let s = tiny();
    let p = profile("p");
    let mut i = inputs(&s, &p, closed(4), one(1, 2));
    i.slo = Slo { ttft_s: None, tpot_s: Some(1e-9), percentile: 99 };
    let plan = i.plan().expect("plan");
    assert!(plan.best.is_none());
    let v = &plan.candidates[0].verdict;
    assert!(v.starts_with("TPOT p99 ") && v.ends_with("> 0.0 ms"), "{v}");
    i.slo.percentile = 75;
    let e = i.plan().expect_err("p75 is not offered");
    assert_eq!(e.to_string(), "--slo: p=75: 50, 90 or 99");
}

#[test]
fn an_open_loop_past_capacity_is_saturated() {
    let s = tiny();
    let p = profile("p");
    let quick = inputs(&s, &p, closed(1), one(1, 0)).plan().expect("plan");
    let capacity = quick.candidates[0].outcome.requests_per_s;
    let mut t = closed(1);
    t.requests = 300;
    t.arrivals = Arrivals::Rate(capacity * 0.2);
    let light = inputs(&s, &p, t, one(1, 0)).plan().expect("plan");
    assert!(!light.candidates[0].outcome.saturated, "{:?} at {capacity}", light.candidates[0].outcome);
    t.arrivals = Arrivals::Rate(capacity * 50.0);
    let heavy = inputs(&s, &p, t, one(1, 0)).plan().expect("plan");
    assert!(heavy.candidates[0].outcome.saturated);
    assert!(heavy.candidates[0].verdict.contains("saturated"));
}

#[test]
fn hot_experts_slow_the_busiest_node_and_replicas_spread_them() {
    let s = tiny();
    let p = profile("p");
    let step = Step { decode: 64, prefill: 0, logits: 64, decode_context: 640.0, prefill_context: 0.0 };
    // Compute-bound nodes: at 64 tokens every copy reads its weights anyway, so on a memory-bound node a replica
    // adds reads; splitting the hot expert's pairs shows where the pairs are the cost.
    let mut p = p;
    p.memory_bandwidth_bytes_per_s = 1e14;
    let time = |skew: f64, replicas: usize| {
        let load = ExpertLoad::zipf(s.experts, skew);
        let mut l = layout(1, 4);
        l.replicas = replicas;
        Cluster::new(&s, &p, &p, l, &load).step(&step, 0.0).node_busy
    };
    assert!(time(1.5, 0) > time(0.0, 0));
    assert!(time(1.5, 2) < time(1.5, 0));
}

#[test]
fn measured_layer_loads_average_rank_by_rank() {
    // Two layers, each with one expert taking half the pairs, but not the same expert; a layer with no load is
    // left out rather than counted as uniform.
    let load = ExpertLoad::from_layers(&[vec![2.0, 1.0, 1.0, 0.0], vec![0.0, 0.0, 6.0, 6.0], vec![0.0; 4]]);
    assert_eq!(load.shares, vec![0.5, 0.375, 0.125, 0.0]);
    assert_eq!(ExpertLoad::from_layers(&[vec![0.0; 4]]).shares, vec![0.25; 4]);
}

#[test]
fn what_if_costs_the_current_layout_and_each_change_against_it() {
    let s = tiny();
    let mut p = profile("p");
    p.memory_bandwidth_bytes_per_s = 1e14;
    p.network.codec_bytes_per_s = f64::INFINITY;
    p.network.bandwidth_bytes_per_s = f64::INFINITY;
    // Expert nodes a thousand times slower than the router: the busiest node sets the pace.
    let mut slow = p.clone();
    slow.matmul_flops_per_s /= 1e3;
    let mut i = inputs(&s, &p, closed(16), one(1, 2));
    i.expert = &slow;
    i.load = ExpertLoad::zipf(s.experts, 1.5);
    let current = layout(1, 2);
    let changes = moe_plan::what_if(&i, current.clone(), 2).expect("what-if");
    let names: Vec<&str> = changes.iter().map(|c| c.change.as_str()).collect();
    assert_eq!(
        names,
        ["as it is", "one more expert node", "one more router", "a second copy of the 2 hottest experts"]
    );
    assert_eq!(changes[0].throughput_ratio, 1.0);
    assert_eq!(changes[0].candidate.outcome, i.evaluate(current).outcome);
    assert_eq!(
        (changes[1].candidate.expert_nodes, changes[2].candidate.routers, changes[3].candidate.replicas),
        (3, 2, 2)
    );
    // More of anything never predicts less; the skewed load makes the replicas pay on compute-bound nodes.
    for c in &changes[1..] {
        assert!(c.throughput_ratio >= 1.0 - 1e-9, "{}: {}", c.change, c.throughput_ratio);
    }
    assert!(changes[3].tpot_ratio < 1.0, "{}", changes[3].tpot_ratio);
    // On one machine there is no second router to add, and one expert node has nowhere to put a second copy.
    i.one_machine = true;
    let one = moe_plan::what_if(&i, Layout { one_machine: true, ..layout(1, 1) }, 2).expect("what-if");
    assert_eq!(one.iter().map(|c| c.change.as_str()).collect::<Vec<_>>(), ["as it is", "one more expert node"]);
}

fn hardware_error(text: &str) -> String {
    let e = HardwareFile::parse(text, Path::new("hw.json")).expect_err("refused");
    assert!(matches!(e, PlanError::Hardware { .. }));
    let line = e.to_string();
    assert!(!line.contains('\n'), "one line: {line}");
    line
}

#[test]
fn bad_hardware_files_are_answered_with_one_line_naming_the_field() {
    let good = serde_json::to_value(HardwareFile { profiles: vec![profile("a")] }).expect("json");
    assert!(HardwareFile::parse(&good.to_string(), Path::new("hw.json")).is_ok());
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        f(&mut v);
        v.to_string()
    };
    let e = hardware_error(&with(&|v| v["profiles"][0]["memory_bandwidth_bytes_per_s"] = (-1.0).into()));
    assert!(e.contains("memory_bandwidth_bytes_per_s must be a positive number"), "{e}");
    let e = hardware_error(&with(&|v| {
        v["profiles"][0].as_object_mut().expect("object").remove("matmul_flops_per_s");
    }));
    assert!(e.contains("matmul_flops_per_s"), "{e}");
    let e = hardware_error(&with(&|v| {
        v["profiles"][0]["corrections"] = serde_json::json!({"attention_core": [[8, 1.0], [4, 1.0]]})
    }));
    assert!(e.contains("corrections.attention_core"), "{e}");
    let e = hardware_error(&with(&|v| v["profiles"][0]["tflops"] = 1.into()));
    assert!(e.contains("unknown field `tflops`"), "{e}");
    let e = hardware_error(&with(&|v| {
        let p = v["profiles"][0].clone();
        v["profiles"].as_array_mut().expect("array").push(p);
    }));
    assert!(e.ends_with("two profiles are named \"a\""), "{e}");
    assert!(hardware_error("{\"profiles\": []}").ends_with("no profiles"));
    assert!(hardware_error("not json").starts_with("hardware file hw.json: "));
}

fn facts(p: &Profile) -> calibrate::MachineFacts {
    calibrate::MachineFacts {
        name: "here".into(),
        source: "test".into(),
        cost_per_hour: 0.5,
        memory_bytes: 1e9,
        cores: 2,
        network: p.network.clone(),
    }
}

#[test]
fn calibration_recovers_the_times_it_was_given() {
    let s = tiny();
    let bare = profile("bare");
    let load = ExpertLoad::zipf(s.experts, 0.0);
    let cluster = Cluster::new(&s, &bare, &bare, layout(1, 0), &load);
    // A report whose every stage took 3× its roofline, with 1 ms of rest per step and 10 µs per token.
    let stages = |step: &Step| {
        let c = cluster.step(step, 0.0);
        let rest = 1e-3 + 1e-5 * step.tokens() as f64;
        serde_json::json!({
            "dense_projections": {"seconds": 3.0 * c.dense},
            "routed_experts": {"seconds": 3.0 * c.experts},
            "deltanet_recurrent": {"seconds": if step.decode > 0 { 3.0 * c.deltanet } else { 0.0 }},
            "deltanet_chunked": {"seconds": if step.prefill > 0 { 3.0 * c.deltanet } else { 0.0 }},
            "attention_core": {"seconds": 3.0 * c.attention},
            "rest": {"seconds": rest},
        })
    };
    let decode: Vec<_> = [1usize, 8, 32]
        .iter()
        .map(|&b| {
            let step = Step { decode: b, prefill: 0, logits: b, decode_context: 30.0 * b as f64, prefill_context: 0.0 };
            serde_json::json!({"batch": b, "stages": stages(&step)})
        })
        .collect();
    let n = 128.0;
    let prefill =
        Step { decode: 0, prefill: 128, logits: 1, decode_context: 0.0, prefill_context: n * (n + 1.0) / 2.0 };
    let report = serde_json::json!({
        "threads": 2, "kernel": "test", "memory_bandwidth_gbps": 10.0, "fma_peak_gflops": 100.0,
        "matmul_kernel_peak_gflops": 1000.0,
        "prefill": {"prompt_tokens": 128, "stages": stages(&prefill)},
        "decode": decode,
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bench-model.json");
    std::fs::write(&path, report.to_string()).expect("write");
    let p = calibrate::from_reports(&s, &path, None, facts(&bare)).expect("calibrated");
    for (stage, points) in &p.corrections {
        for &[tokens, ratio] in points {
            assert!((ratio - 3.0).abs() < 1e-9, "{}: {ratio} at {tokens}", stage.name());
        }
    }
    assert!((p.rest.per_step_s - 1e-3).abs() < 1e-9, "{:?}", p.rest);
    assert!((p.rest.per_token_s - 1e-5).abs() < 1e-12, "{:?}", p.rest);
    // The calibrated profile predicts the report's decode step: 3× the roofline plus the rest.
    let calibrated = Cluster::new(&s, &p, &p, layout(1, 0), &load);
    let step = Step { decode: 8, prefill: 0, logits: 8, decode_context: 240.0, prefill_context: 0.0 };
    let want = 3.0 * cluster.step(&step, 0.0).total + 1e-3 + 8e-5;
    let got = calibrated.step(&step, 0.0).total;
    assert!((got - want).abs() < 1e-9 * want.max(1.0), "{got} vs {want}");
    // What it writes, it reads back.
    let file = HardwareFile { profiles: vec![p] };
    let again =
        HardwareFile::parse(&serde_json::to_string(&file).expect("json"), Path::new("out.json")).expect("parse");
    assert_eq!(again, file);

    // A dataplane report, tables first and the object on its last line as bench-dataplane prints it: per-layer
    // round trips of 200 µs plus 1 ns per byte both ways on the TLS link, with the node's compute on top (which
    // the fit takes off), beside a plaintext link and a bf16 wire that it leaves out.
    let rows: Vec<_> = [1.0f64, 16.0, 64.0, 256.0]
        .iter()
        .flat_map(|&n| {
            let (out, back) = s.wire_bytes_per_layer(n, n * s.top_k as f64, 4.0);
            let compute = 30.0 * n;
            let tls = 200.0 + (out + back) * 1e-3 + compute;
            [
                serde_json::json!({"tokens": n, "wire": "f32/router", "link": "tls", "total_us": tls,
                    "node_compute_us": compute}),
                serde_json::json!({"tokens": n, "wire": "f32/router", "link": "plain", "total_us": tls / 2.0,
                    "node_compute_us": compute}),
                serde_json::json!({"tokens": n, "wire": "bf16/router", "link": "tls", "total_us": tls / 3.0,
                    "node_compute_us": compute}),
            ]
        })
        .collect();
    let dataplane = dir.path().join("dataplane.json");
    let text = format!("per-layer round trip ...\n{}\n", serde_json::json!({"round_trip": rows}));
    std::fs::write(&dataplane, text).expect("write");
    let p = calibrate::from_reports(&s, &path, Some(&dataplane), facts(&bare)).expect("calibrated");
    assert!((p.network.round_trip_s - 200e-6).abs() < 1e-12, "{:?}", p.network);
    assert!((p.network.codec_bytes_per_s - 1e9).abs() < 1e-3, "{:?}", p.network);
}

#[test]
fn each_prefill_length_measured_is_a_point_of_its_own_and_wins_over_a_decode_batch_of_its_size() {
    let s = tiny();
    let bare = profile("bare");
    let load = ExpertLoad::zipf(s.experts, 0.0);
    let cluster = Cluster::new(&s, &bare, &bare, layout(1, 0), &load);
    // Decode batches at 3× their rooflines; prefills of 32 and 128 tokens at 2× and 5×.
    let stages = |step: &Step, f: f64| {
        let c = cluster.step(step, 0.0);
        serde_json::json!({
            "dense_projections": {"seconds": f * c.dense},
            "routed_experts": {"seconds": f * c.experts},
            "deltanet_recurrent": {"seconds": if step.decode > 0 { f * c.deltanet } else { 0.0 }},
            "deltanet_chunked": {"seconds": if step.prefill > 0 { f * c.deltanet } else { 0.0 }},
            "attention_core": {"seconds": f * c.attention},
            "rest": {"seconds": 1e-3},
        })
    };
    let decode: Vec<_> = [1usize, 8, 32]
        .iter()
        .map(|&b| {
            let step = Step { decode: b, prefill: 0, logits: b, decode_context: 30.0 * b as f64, prefill_context: 0.0 };
            serde_json::json!({"batch": b, "stages": stages(&step, 3.0)})
        })
        .collect();
    let prefill = |n: usize, f: f64| {
        let t = n as f64;
        let step = Step { decode: 0, prefill: n, logits: 1, decode_context: 0.0, prefill_context: t * (t + 1.0) / 2.0 };
        serde_json::json!({"prompt_tokens": n, "stages": stages(&step, f)})
    };
    let report = serde_json::json!({
        "threads": 2, "kernel": "test", "memory_bandwidth_gbps": 10.0, "fma_peak_gflops": 100.0,
        "matmul_kernel_peak_gflops": 1000.0,
        "prefill": prefill(128, 5.0),
        "prefills": [prefill(128, 5.0), prefill(32, 2.0)],
        "decode": decode,
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bench-model.json");
    std::fs::write(&path, report.to_string()).expect("write");
    let p = calibrate::from_reports(&s, &path, None, facts(&bare)).expect("calibrated");
    let dense = &p.corrections[&moe_plan::Stage::DenseProjections];
    let at = |t: f64| dense.iter().find(|[n, _]| *n == t).map(|[_, r]| *r);
    assert_eq!(dense.iter().map(|[t, _]| *t).collect::<Vec<_>>(), [1.0, 8.0, 32.0, 128.0], "{dense:?}");
    assert!((at(1.0).expect("1") - 3.0).abs() < 1e-9, "{dense:?}");
    assert!((at(32.0).expect("32") - 2.0).abs() < 1e-9, "the prefill's point stands: {dense:?}");
    assert!((at(128.0).expect("128") - 5.0).abs() < 1e-9, "{dense:?}");
    let chunked = &p.corrections[&moe_plan::Stage::DeltanetChunked];
    assert_eq!(chunked.len(), 2, "{chunked:?}");
    // A report of the older form, one `prefill` and no `prefills`, still calibrates.
    let mut old = report.clone();
    old.as_object_mut().expect("object").remove("prefills");
    std::fs::write(&path, old.to_string()).expect("write");
    let p = calibrate::from_reports(&s, &path, None, facts(&bare)).expect("calibrated");
    assert_eq!(p.corrections[&moe_plan::Stage::DeltanetChunked].len(), 1);
}
