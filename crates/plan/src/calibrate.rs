//! A hardware profile from this machine's own measurements: the roofline figures and per-stage times that
//! `moectl bench-model --json` printed, each stage's measured time divided by what the roofline predicts for the
//! same work (the correction table), the rest of the step fitted as a fixed and a per-token part, and the expert
//! link's round trip from `moectl bench-dataplane --json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::cost::{Cluster, ExpertLoad, Layout, Step};
use crate::error::{PlanError, Result};
use crate::hardware::{Network, Overhead, Profile, Stage};
use crate::shape::Shape;
use crate::simulate::{simulate, Arrivals, EngineLimits, Length, Traffic};

/// Decode context of `bench-model`'s decode rounds: prompts of 16 to 22 tokens, then a few dozen steps.
const BENCH_DECODE_CONTEXT: f64 = 30.0;

/// What the machine is, beyond what the benchmark measured.
#[derive(Debug, Clone)]
pub struct MachineFacts {
    pub name: String,
    pub source: String,
    pub cost_per_hour: f64,
    pub memory_bytes: f64,
    pub cores: usize,
    /// Used when no dataplane measurement is given.
    pub network: Network,
}

fn field(v: &Value, path: &[&str], file: &Path) -> Result<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p).ok_or_else(|| PlanError::Calibration {
            path: file.to_owned(),
            message: format!("no field {}", path.join(".")),
        })?;
    }
    cur.as_f64().ok_or_else(|| PlanError::Calibration {
        path: file.to_owned(),
        message: format!("{} is not a number", path.join(".")),
    })
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).map_err(|e| PlanError::Io { path: path.to_owned(), message: e.to_string() })?;
    // `bench-dataplane --json` prints its tables, then the object on the last line.
    serde_json::from_str(&text)
        .or_else(|e| text.lines().rev().find(|l| l.starts_with('{')).map_or(Err(e), serde_json::from_str))
        .map_err(|e| PlanError::Calibration { path: path.to_owned(), message: e.to_string() })
}

/// A profile from a `bench-model --json` report of the model `shape` describes, and optionally a
/// `bench-dataplane --json` report.
pub fn from_reports(
    shape: &Shape,
    bench_model: &Path,
    dataplane: Option<&Path>,
    facts: MachineFacts,
) -> Result<Profile> {
    let report = read_json(bench_model)?;
    let f = |p: &[&str]| field(&report, p, bench_model);
    let bandwidth = f(&["memory_bandwidth_gbps"])? * 1e9;
    let vector = f(&["fma_peak_gflops"])? * 1e9;
    let matmul = f(&["matmul_kernel_peak_gflops"])? * 1e9;
    let threads = f(&["threads"])? as usize;
    let mut profile = Profile {
        name: facts.name,
        source: facts.source,
        cost_per_hour: facts.cost_per_hour,
        memory_bytes: facts.memory_bytes,
        memory_bandwidth_bytes_per_s: bandwidth,
        matmul_flops_per_s: matmul,
        vector_flops_per_s: vector,
        cores: if facts.cores > 0 { facts.cores } else { threads.max(1) },
        network: facts.network,
        corrections: BTreeMap::new(),
        rest: Overhead::default(),
        serving: Overhead::default(),
    };
    // The roofline alone (no corrections, no rest) is what each measured stage is compared with.
    let bare = profile.clone();
    let load = ExpertLoad::zipf(shape.experts, 0.0);
    let layout = Layout { routers: 1, expert_nodes: 0, replicas: 0, micro_batches: 1, one_machine: false };
    let cluster = Cluster::new(shape, &bare, &bare, layout, &load);
    let mut corrections: BTreeMap<Stage, Vec<[f64; 2]>> = BTreeMap::new();
    let mut rest_points: Vec<(f64, f64)> = Vec::new();
    let mut add = |stage: Stage, tokens: f64, measured: f64, roof: f64| {
        if measured > 0.0 && roof > 0.0 {
            corrections.entry(stage).or_default().push([tokens, measured / roof]);
        }
    };
    let stage_seconds =
        |stages: &Value, s: Stage| stages.get(s.name()).and_then(|v| v["seconds"].as_f64()).unwrap_or(0.0);

    let decode = report.get("decode").and_then(Value::as_array).cloned().unwrap_or_default();
    for d in &decode {
        let b = field(d, &["batch"], bench_model)?;
        let stages = &d["stages"];
        let step = Step {
            decode: b as usize,
            prefill: 0,
            logits: b as usize,
            decode_context: b * BENCH_DECODE_CONTEXT,
            prefill_context: 0.0,
        };
        let roof = cluster.step(&step, 0.0);
        add(Stage::DenseProjections, b, stage_seconds(stages, Stage::DenseProjections), roof.dense);
        add(Stage::RoutedExperts, b, stage_seconds(stages, Stage::RoutedExperts), roof.experts);
        add(Stage::DeltanetRecurrent, b, stage_seconds(stages, Stage::DeltanetRecurrent), roof.deltanet);
        add(Stage::AttentionCore, b, stage_seconds(stages, Stage::AttentionCore), roof.attention);
        rest_points.push((b, stages.get("rest").and_then(|v| v["seconds"].as_f64()).unwrap_or(0.0)));
    }
    // Every prompt length measured (`prefills`; older reports have the one `prefill`). A prefill of n tokens is
    // its own point in each table, so a prompt the cluster sees is read near a prefill of its size, not between a
    // decode batch and a much longer prompt.
    let prefills = match report.get("prefills").and_then(Value::as_array) {
        Some(list) if !list.is_empty() => list.clone(),
        _ => vec![report.get("prefill").cloned().ok_or_else(|| PlanError::Calibration {
            path: bench_model.to_owned(),
            message: "no field prefill".into(),
        })?],
    };
    let mut prefill_points: BTreeMap<Stage, Vec<[f64; 2]>> = BTreeMap::new();
    for p in &prefills {
        let n = field(p, &["prompt_tokens"], bench_model)?;
        let stages = &p["stages"];
        let step = Step {
            decode: 0,
            prefill: n as usize,
            logits: 1,
            decode_context: 0.0,
            prefill_context: n * (n + 1.0) / 2.0,
        };
        let roof = cluster.step(&step, 0.0);
        let mut put = |stage: Stage, measured: f64, roof: f64| {
            if measured > 0.0 && roof > 0.0 {
                prefill_points.entry(stage).or_default().push([n, measured / roof]);
            }
        };
        put(Stage::DenseProjections, stage_seconds(stages, Stage::DenseProjections), roof.dense);
        put(Stage::RoutedExperts, stage_seconds(stages, Stage::RoutedExperts), roof.experts);
        put(Stage::DeltanetChunked, stage_seconds(stages, Stage::DeltanetChunked), roof.deltanet);
        put(Stage::AttentionCore, stage_seconds(stages, Stage::AttentionCore), roof.attention);
        rest_points.push((n, stages.get("rest").and_then(|v| v["seconds"].as_f64()).unwrap_or(0.0)));
    }
    // Where a prefill and a decode batch have the same size, the prefill's point stands (a prompt step is the
    // planner's TTFT; a decode batch that large is rare).
    for (stage, points) in prefill_points {
        let table = corrections.entry(stage).or_default();
        table.retain(|[t, _]| !points.iter().any(|[n, _]| n == t));
        table.extend(points);
    }
    if decode.is_empty() {
        return Err(PlanError::Calibration {
            path: bench_model.to_owned(),
            message: "no decode measurements (run bench-model with --batch 1,8,32,64)".into(),
        });
    }
    for points in corrections.values_mut() {
        points.sort_by(|a, b| a[0].total_cmp(&b[0]));
        points.dedup_by(|a, b| a[0] == b[0]);
    }
    profile.corrections = corrections;
    profile.rest = fit_line(&rest_points);
    if let Some(dp) = dataplane {
        let (round_trip, codec) = dataplane_link(shape, dp)?;
        profile.network.round_trip_s = round_trip;
        profile.network.codec_bytes_per_s = codec;
    }
    Ok(profile)
}

/// The least-squares line `a + b·x` through the points, with both parts kept at zero or more.
pub fn fit_line(points: &[(f64, f64)]) -> Overhead {
    let n = points.len() as f64;
    if points.is_empty() {
        return Overhead::default();
    }
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(a, b), &(x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = points.iter().map(|&(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = points.iter().map(|&(x, y)| (x - mx) * (y - my)).sum();
    let slope = if sxx > 0.0 { (sxy / sxx).max(0.0) } else { 0.0 };
    let intercept = my - slope * mx;
    if intercept < 0.0 {
        // Through the origin instead.
        let sxx0: f64 = points.iter().map(|&(x, _)| x * x).sum();
        let sxy0: f64 = points.iter().map(|&(x, y)| x * y).sum();
        return Overhead { per_step_s: 0.0, per_token_s: if sxx0 > 0.0 { (sxy0 / sxx0).max(0.0) } else { 0.0 } };
    }
    Overhead { per_step_s: intercept, per_token_s: slope }
}

/// The TLS link's fixed round trip and codec rate, fitted as a line through `bench-dataplane`'s per-layer round
/// trips (f32 on the wire, answers combined by the router; one node holds every expert): time less the node's
/// expert compute against the activation bytes both ways. The intercept is the round trip, the slope's inverse the
/// bytes per second that encoding, TLS and decoding move.
fn dataplane_link(shape: &Shape, path: &Path) -> Result<(f64, f64)> {
    let report = read_json(path)?;
    let rows = report.get("round_trip").and_then(Value::as_array).ok_or_else(|| PlanError::Calibration {
        path: path.to_owned(),
        message: "no round_trip rows (run bench-dataplane with --json, without --skip-round-trip)".into(),
    })?;
    let k = shape.top_k as f64;
    let points: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r["link"].as_str() == Some("tls") && r["wire"].as_str() == Some("f32/router"))
        .filter_map(|r| {
            let n = r["tokens"].as_f64()?;
            let us = r["total_us"].as_f64()? - r["node_compute_us"].as_f64().unwrap_or(0.0);
            let (out, back) = shape.wire_bytes_per_layer(n, n * k, 4.0);
            Some((out + back, us.max(0.0) * 1e-6))
        })
        .collect();
    if points.is_empty() {
        return Err(PlanError::Calibration {
            path: path.to_owned(),
            message: "no TLS round trip with f32 on the wire in round_trip".into(),
        });
    }
    let line = fit_line(&points);
    let codec = if line.per_token_s > 0.0 { 1.0 / line.per_token_s } else { 0.0 };
    Ok((line.per_step_s, codec))
}

/// A closed-loop serving measurement (`moectl bench --json` or `vllm bench serve --save-result`) on a known
/// layout: what it is compared with to find the serving overhead per step.
#[derive(Debug, Clone)]
pub struct ServingRun {
    pub layout: Layout,
    pub concurrency: usize,
    pub prompt: usize,
    pub output: usize,
    pub requests: usize,
    pub measured_tpot_s: f64,
}

impl ServingRun {
    /// Reads the run's figures; its layout is what the caller started.
    pub fn read(path: &Path, layout: Layout, prompt: usize, output: usize) -> Result<ServingRun> {
        let report = read_json(path)?;
        let f = |p: &[&str]| field(&report, p, path);
        Ok(ServingRun {
            layout,
            concurrency: f(&["max_concurrency"])? as usize,
            prompt,
            output,
            requests: (f(&["completed"])? as usize).max(1),
            measured_tpot_s: f(&["mean_tpot_ms"])? * 1e-3,
        })
    }
}

/// Sets the profile's serving overhead, a part per step and a part per sampled token, so that the simulated mean
/// TPOT of each run matches the measured one: a line through each run's shortfall against its mean decode batch
/// (with one run, or runs of one batch, the part per step alone). The forward pass is what the stages cover; this
/// is the scheduler, sampling and streaming.
pub fn fit_serving(shape: &Shape, profile: &mut Profile, runs: &[ServingRun]) {
    if runs.is_empty() {
        return;
    }
    let mut points = Vec::new();
    profile.serving = Overhead::default();
    for run in runs {
        let load = ExpertLoad::zipf(shape.experts, 0.0);
        let cluster = Cluster::new(shape, profile, profile, run.layout.clone(), &load);
        let traffic = Traffic {
            arrivals: Arrivals::Concurrency(run.concurrency),
            prompt: Length::Fixed(run.prompt),
            output: Length::Fixed(run.output),
            requests: run.requests,
        };
        let predicted = simulate(&cluster, &traffic, &EngineLimits::default());
        points.push((predicted.mean_decode_batch, (run.measured_tpot_s - predicted.tpot_s.mean).max(0.0)));
    }
    let spread = points.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max)
        - points.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
    profile.serving = if spread > 0.5 {
        fit_line(&points)
    } else {
        Overhead { per_step_s: points.iter().map(|p| p.1).sum::<f64>() / points.len() as f64, per_token_s: 0.0 }
    };
}
