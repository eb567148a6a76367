//! `moectl bench-dataplane`: what moving the routed experts to expert-node processes costs, measured side by side in
//! one run against the single-process engine on the same machine.
//!
//! 1. Round trip of one MoE layer on loopback (activations out, expert compute, partial sums back) per token count,
//!    split into the router's encode and decode, the node's decode + encode, queueing, compute, and what is left:
//!    transport (gRPC, HTTP/2, the kernel's loopback, thread wake-ups).
//!    Each token count runs against a node with mutual TLS and a plaintext one, call by call, so the TLS cost
//!    reads as the ratio of the two.
//! 2. Decode throughput with the experts split evenly over N expert nodes (mutual TLS, as deployed), with and without micro-batch ping-pong,
//!    next to the single-process engine, in interleaved rounds; the median of the per-round ratios is reported.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use moe_model::{Experts, LogitsFor, Routing, Segment, SequenceState};
use moe_proto::v1::Dtype;
use router_node::{RemoteExperts, RemoteOptions};
use serde_json::json;

use moe_tls::{Identity, Role};

use crate::bench_model::tokens;
use crate::cluster::{even_split, LocalNode};
use crate::remote::Combine;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model directory (e.g. one written by `moectl init-model --preset bench`).
    #[arg(long)]
    model: PathBuf,
    /// Expert-node processes for the decode comparison; the experts are split evenly over them.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Token counts of the per-layer round trip.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    round_trip_tokens: Vec<usize>,
    /// Calls per token count in the round trip.
    #[arg(long, default_value_t = 20)]
    round_trip_calls: usize,
    /// Decode batch sizes to compare.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    batch: Vec<usize>,
    /// Timed decode steps per round.
    #[arg(long, default_value_t = 8)]
    decode_steps: usize,
    /// Interleaved rounds per batch size (each runs every configuration once).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Micro-batches of the ping-pong configuration.
    #[arg(long, default_value_t = 2)]
    micro_batches: usize,
    /// Also measure bf16 on the wire.
    #[arg(long)]
    bf16: bool,
    /// Where the expert outputs are added up, each measured side by side: router (a row per pair back, the same
    /// bits under every placement) and/or node (a sum per token back).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "router")]
    combine: Vec<Combine>,
    /// Skip the round trip (1) or the decode comparison (2).
    #[arg(long)]
    skip_round_trip: bool,
    #[arg(long)]
    skip_decode: bool,
    /// Show the expert nodes' logs.
    #[arg(long)]
    verbose: bool,
    /// Print the results as one JSON object too.
    #[arg(long)]
    json: bool,
}

/// `n` tokens' routing: `top_k` distinct experts of `experts` each, equal weights.
fn random_routing(n: usize, top_k: usize, experts: usize) -> Routing {
    let mut routing = Routing { offsets: vec![0], ..Default::default() };
    let mut it = tokens(n * top_k * 4, 7 + n as u64, experts).into_iter();
    for _ in 0..n {
        let mut chosen: Vec<u32> = Vec::new();
        while chosen.len() < top_k {
            let e = it.next().unwrap_or(chosen.len() as u32);
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        chosen.sort_unstable();
        routing.weights.extend(chosen.iter().map(|_| 1.0 / top_k as f32));
        routing.experts.extend(chosen);
        routing.offsets.push(routing.experts.len() as u32);
    }
    routing
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn connect(
    addrs: &[String],
    lm: &moe_model::LoadedModel,
    (wire, combine): (Dtype, Combine),
    tls: Option<std::sync::Arc<Identity>>,
) -> Result<RemoteExperts> {
    let options = RemoteOptions { wire_dtype: wire, reduce: combine.reduce(), tls, ..RemoteOptions::default() };
    RemoteExperts::connect(addrs, lm.model.config(), lm.fingerprint, options).context("connecting to the expert nodes")
}

pub fn run(args: Args) -> Result<()> {
    if args.nodes == 0 || args.decode_steps == 0 || args.rounds == 0 || args.round_trip_calls == 0 {
        bail!("--nodes, --decode-steps, --rounds and --round-trip-calls must be positive");
    }
    if args.batch.contains(&0) || args.round_trip_tokens.contains(&0) || args.micro_batches == 0 {
        bail!("every --batch, --round-trip-tokens and --micro-batches must be positive");
    }
    let lm = crate::load_model(&args.model, false, true)?;
    let cfg = lm.model.config().clone();
    let threads = rayon::current_num_threads();
    let mut report = serde_json::Map::new();
    report.insert("threads".into(), json!(threads));
    report.insert("model".into(), json!(args.model.display().to_string()));
    if args.combine.is_empty() {
        bail!("--combine needs router, node or both");
    }
    let dtypes: Vec<Dtype> = if args.bf16 { vec![Dtype::F32, Dtype::Bf16] } else { vec![Dtype::F32] };
    // Every (wire dtype, combine) pair: the "wire" column names both, e.g. f32/router.
    let wires: Vec<(Dtype, Combine)> = dtypes.iter().flat_map(|&d| args.combine.iter().map(move |&c| (d, c))).collect();
    let wire_name = |(d, c): (Dtype, Combine)| format!("{}/{}", format!("{d:?}").to_lowercase(), c.name());

    // The links as production runs them (mutual TLS, certificates from a CA made for this run), and plaintext next
    // to them in the round trip, to show what TLS costs.
    let certs = tempfile::tempdir().context("a directory for the certificates")?;
    let ca = certs.path().join("ca");
    moe_tls::dev_ca::ensure(&ca, &[(Role::Router, "bench"), (Role::Expert, "expert")])?;
    let identity = Identity::load(moe_tls::dev_ca::files(&ca, "bench"), &[Role::Router])?;
    let tls_flags = moe_tls::dev_ca::files(&ca, "expert").flags();
    let insecure = ["--insecure".to_owned()];

    if !args.skip_round_trip {
        eprintln!("starting 2 expert nodes with every expert, one with mutual TLS and one plaintext...");
        let nodes = [
            ("tls", LocalNode::start(&args.model, Some("all"), &tls_flags, args.verbose)?),
            ("plain", LocalNode::start(&args.model, Some("all"), &insecure, args.verbose)?),
        ];
        let layer = (0..cfg.num_hidden_layers).find(|&l| cfg.is_moe_layer(l)).context("the model has no MoE layer")?;
        let h = cfg.hidden_size;
        println!(
            "\nper-layer round trip on loopback (layer {layer}, hidden {h}, top-{} of {} experts; mean per call, µs; \
             the links' calls interleaved)",
            cfg.num_experts_per_tok, cfg.num_experts
        );
        println!(
            "{:>6} {:>11} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7}",
            "tokens",
            "wire",
            "link",
            "total",
            "r.encode",
            "r.decode",
            "n.codec",
            "n.queue",
            "n.compute",
            "transport",
            "local",
            "ratio",
            "vs.plain"
        );
        let mut rows = Vec::new();
        for &wire in &wires {
            let remotes = nodes
                .iter()
                .map(|(link, node)| {
                    let tls = (*link == "tls").then(|| identity.clone());
                    connect(std::slice::from_ref(&node.addr), &lm, wire, tls).map(|r| (*link, r))
                })
                .collect::<Result<Vec<_>>>()?;
            for &n in &args.round_trip_tokens {
                let hidden: Vec<f32> =
                    tokens(n * h, n as u64, 1 << 16).iter().map(|&v| v as f32 / 32768.0 - 1.0).collect();
                let routing = random_routing(n, cfg.num_experts_per_tok, cfg.num_experts);
                let mut out = vec![0f32; n * h];
                // Warm up every path (first touches, connection windows).
                for (_, remote) in &remotes {
                    remote.forward(layer, &hidden, &routing, &mut out)?;
                }
                lm.experts.forward(layer, &hidden, &routing, &mut out)?;
                let snap = |remote: &RemoteExperts| {
                    let s = &remote.stats;
                    [&s.encode_ns, &s.decode_ns, &s.node_codec_us, &s.node_queue_us, &s.node_compute_us]
                        .map(|c| c.load(Ordering::Relaxed))
                };
                let before: Vec<_> = remotes.iter().map(|(_, r)| snap(r)).collect();
                let mut total = vec![Vec::new(); remotes.len()];
                let mut local = Vec::new();
                for _ in 0..args.round_trip_calls {
                    for (i, (_, remote)) in remotes.iter().enumerate() {
                        let t = Instant::now();
                        remote.forward(layer, &hidden, &routing, &mut out)?;
                        total[i].push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    let t = Instant::now();
                    lm.experts.forward(layer, &hidden, &routing, &mut out)?;
                    local.push(t.elapsed().as_secs_f64() * 1e6);
                }
                let calls = args.round_trip_calls as f64;
                let mean_local = local.iter().sum::<f64>() / calls;
                let means: Vec<f64> = total.iter().map(|t| t.iter().sum::<f64>() / calls).collect();
                let plain = remotes.iter().position(|(l, _)| *l == "plain").map_or(f64::NAN, |i| means[i]);
                for (i, (link, remote)) in remotes.iter().enumerate() {
                    let after = snap(remote);
                    let d = |k: usize, scale: f64| (after[k] - before[i][k]) as f64 * scale / calls;
                    let (encode, decode) = (d(0, 1e-3), d(1, 1e-3));
                    let (codec, queue, compute) = (d(2, 1.0), d(3, 1.0), d(4, 1.0));
                    let mean_total = means[i];
                    let transport = (mean_total - encode - decode - codec - queue - compute).max(0.0);
                    let wire_name = wire_name(wire);
                    println!(
                        "{n:>6} {wire_name:>11} {link:>5} {mean_total:>9.0} {encode:>9.0} {decode:>9.0} {codec:>9.0} \
                         {queue:>9.0} {compute:>9.0} {transport:>9.0} {mean_local:>9.0} {:>7.2} {:>7.3}",
                        mean_local / mean_total,
                        mean_total / plain
                    );
                    rows.push(json!({
                        "tokens": n, "wire": wire_name, "link": link, "total_us": mean_total,
                        "router_encode_us": encode, "router_decode_us": decode, "node_codec_us": codec,
                        "node_queue_us": queue, "node_compute_us": compute, "transport_us": transport,
                        "in_process_us": mean_local, "ratio_to_plain": mean_total / plain,
                    }));
                }
            }
        }
        println!(
            "(r.: router, n.: node; transport = total − the rest; local = the same experts in this process; ratio = \
             local / total; vs.plain = total / the plaintext link's total)"
        );
        report.insert("round_trip".into(), json!(rows));
    }

    if !args.skip_decode {
        let specs = even_split(cfg.num_experts, args.nodes);
        eprintln!("starting {} expert nodes ({})...", args.nodes, specs.join(" | "));
        let nodes: Vec<LocalNode> = specs
            .iter()
            .map(|s| LocalNode::start(&args.model, Some(s), &tls_flags, args.verbose))
            .collect::<Result<_>>()?;
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
        let remotes: Vec<((Dtype, Combine), RemoteExperts)> = wires
            .iter()
            .map(|&w| connect(&addrs, &lm, w, Some(identity.clone())).map(|r| (w, r)))
            .collect::<Result<_>>()?;
        let mut configs: Vec<(String, &dyn Experts, usize)> = vec![("in-process".into(), &lm.experts, 1)];
        for (wire, remote) in &remotes {
            let w = wire_name(*wire);
            configs.push((format!("{} nodes {w} m=1", args.nodes), remote, 1));
            configs.push((format!("{} nodes {w} m={}", args.nodes, args.micro_batches), remote, args.micro_batches));
        }
        println!("\ndecode throughput, tokens/s (median of {} interleaved rounds of {} steps; ratio to in-process = median of per-round ratios)", args.rounds, args.decode_steps);
        let mut rows = Vec::new();
        let vocab = cfg.vocab_size;
        for &batch in &args.batch {
            let prompts: Vec<Vec<u32>> = (0..batch).map(|i| tokens(16 + i % 7, 10 + i as u64, vocab)).collect();
            // Every configuration decodes its own copies of the same sequences.
            let mut states: Vec<Vec<SequenceState>> =
                configs.iter().map(|_| (0..batch).map(|_| lm.model.new_state()).collect()).collect();
            for (c, (_, experts, m)) in configs.iter().enumerate() {
                let mut segs: Vec<Segment<'_>> = states[c]
                    .iter_mut()
                    .zip(&prompts)
                    .map(|(s, p)| Segment { state: s, tokens: p, logits: LogitsFor::Last })
                    .collect();
                lm.model.forward_pipelined(&mut segs, *experts, *m)?;
            }
            let feed = tokens(args.rounds * args.decode_steps + 1, 99, vocab);
            let mut per_config: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
            for round in 0..args.rounds {
                for (c, (_, experts, m)) in configs.iter().enumerate() {
                    let t = Instant::now();
                    for i in 0..args.decode_steps {
                        let f = feed[round * args.decode_steps + i];
                        let toks: Vec<u32> = (0..batch).map(|b| (f + b as u32) % vocab as u32).collect();
                        let mut segs: Vec<Segment<'_>> = states[c]
                            .iter_mut()
                            .zip(&toks)
                            .map(|(s, t)| Segment {
                                state: s,
                                tokens: std::slice::from_ref(t),
                                logits: LogitsFor::Last,
                            })
                            .collect();
                        lm.model.forward_pipelined(&mut segs, *experts, *m)?;
                    }
                    per_config[c].push((batch * args.decode_steps) as f64 / t.elapsed().as_secs_f64());
                }
            }
            let base = &per_config[0];
            let mut line = format!("batch {batch:>4}:");
            for (c, (name, _, _)) in configs.iter().enumerate() {
                let tps = median(per_config[c].clone());
                let ratio = median(per_config[c].iter().zip(base).map(|(x, b)| x / b).collect());
                line.push_str(&format!("  {name} {tps:.1} ({ratio:.2})"));
                rows.push(json!({ "batch": batch, "config": name, "tokens_per_s": tps, "ratio_to_in_process": ratio }));
            }
            println!("{line}");
        }
        for (wire, remote) in &remotes {
            let s = &remote.stats;
            println!(
                "{} wire totals: {} messages, {:.1} MB sent, {:.1} MB received",
                wire_name(*wire),
                s.messages.load(Ordering::Relaxed),
                s.bytes_sent.load(Ordering::Relaxed) as f64 / 1e6,
                s.bytes_received.load(Ordering::Relaxed) as f64 / 1e6
            );
        }
        report.insert("decode".into(), json!(rows));
        // Routers first: a node that goes away under an open stream is (rightly) reported as down.
        drop(configs);
        drop(remotes);
        drop(nodes);
    }
    if args.json {
        println!("{}", serde_json::Value::Object(report));
    }
    Ok(())
}
