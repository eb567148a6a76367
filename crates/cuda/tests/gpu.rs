//! The CUDA backend against the CPU backend and the reference fixtures. Each test needs a GPU: without one (or
//! without the CUDA libraries) it prints why and passes, so that the suite runs everywhere; with one (`device` tool,
//! or any CUDA machine) it checks:
//! - `CudaExperts` against `LocalExperts` on the qwen35 fixture (one GPU, and two when present): bf16 activations;
//! - the fixture's echo log-probs (transformers 5.24) with the routed experts on the GPU;
//! - every other kernel against the CPU backend's functions or a direct host computation of the same formula.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use cudarc::driver::CudaSlice;
use moe_cuda::ops::{self, GdnDims, KvPool};
use moe_cuda::{CudaExperts, Gpu};
use moe_model::cpu::ops::{log_softmax, rms_norm_offset, silu, Rope};
use moe_model::{Checkpoint, Experts, LoadedModel, LocalExperts, LogitsFor, ModelConfig, Residency, Routing, Segment};
use rand::{Rng, SeedableRng};

/// `tests/fixtures/NAME`; `MOE_FIXTURES` points elsewhere (a test binary carried to a GPU machine).
fn fixture(name: &str) -> PathBuf {
    std::env::var_os("MOE_FIXTURES")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"), PathBuf::from)
        .join(name)
}

/// Device 0, or `None` after printing why the test is skipped.
fn gpu() -> Option<Gpu> {
    match moe_cuda::probe(&[0]).and_then(|_| Gpu::open(0)) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            eprintln!("skipped: no usable CUDA device ({e})");
            None
        }
    }
}

fn device_count() -> usize {
    (0..8).take_while(|&i| moe_cuda::probe(&[i]).is_ok()).count()
}

fn up<T: cudarc::driver::DeviceRepr>(gpu: &Gpu, v: &[T]) -> CudaSlice<T> {
    gpu.stream.clone_htod(v).unwrap()
}

fn down<T: cudarc::driver::DeviceRepr + Default + Clone>(gpu: &Gpu, v: &CudaSlice<T>) -> Vec<T> {
    let out = gpu.stream.clone_dtoh(v).unwrap();
    gpu.synchronize().unwrap();
    out
}

fn random(rng: &mut rand::rngs::StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Largest |a − b| / (|b| + floor), with `floor` the typical magnitude so that tiny entries do not dominate.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let floor = b.iter().map(|v| v.abs()).sum::<f32>() / b.len().max(1) as f32 + 1e-12;
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / (y.abs() + floor)).fold(0.0, f32::max)
}

fn random_routing(rng: &mut rand::rngs::StdRng, ntok: usize, ne: usize, k: usize) -> Routing {
    let mut r = Routing { offsets: vec![0], experts: Vec::new(), weights: Vec::new() };
    for _ in 0..ntok {
        let mut picked: Vec<u32> = Vec::new();
        while picked.len() < k {
            let e = rng.random_range(0..ne as u32);
            if !picked.contains(&e) {
                picked.push(e);
            }
        }
        for e in picked {
            r.experts.push(e);
            r.weights.push(rng.random_range(0.05..1.0));
        }
        r.offsets.push(r.experts.len() as u32);
    }
    r
}

fn check_experts(ordinals: &[usize]) {
    let dir = fixture("qwen35");
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open_with(&dir, Residency::Resident).unwrap();
    let cpu = LocalExperts::load(&ckpt, &cfg, |_, _| true).unwrap();
    let gpu = CudaExperts::new(&cfg, ordinals).unwrap();
    let loaded = gpu.load_more(&ckpt, &cfg, |_, _| true).unwrap();
    assert_eq!(loaded.bytes, cpu.resident_bytes());
    assert_eq!(gpu.hosted(), cpu.hosted());
    let per_device = gpu.resident_bytes_per_device();
    assert!(per_device.iter().all(|&b| b > 0), "every GPU holds experts: {per_device:?}");
    let layer = (0..cfg.num_hidden_layers).find(|&l| cfg.is_moe_layer(l)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let h = cfg.hidden_size;
    for ntok in [1, 7, 64, 300] {
        let hidden = random(&mut rng, ntok * h, 1.0);
        let routing = random_routing(&mut rng, ntok, cfg.num_experts, cfg.num_experts_per_tok);
        let mut want = vec![0f32; ntok * h];
        let mut got = vec![0f32; ntok * h];
        cpu.forward(layer, &hidden, &routing, &mut want).unwrap();
        gpu.forward(layer, &hidden, &routing, &mut got).unwrap();
        let err = rel_err(&got, &want);
        eprintln!("{ordinals:?} {ntok} tokens: relative error {err:.2e}");
        // The GPU rounds the activations (in and between the GEMMs) to bf16: 2^-8 relative each.
        assert!(err < 3e-2, "{ntok} tokens: {err}");
        // The same batch again gives the same bits (no atomics in the combine).
        let mut again = vec![0f32; ntok * h];
        gpu.forward(layer, &hidden, &routing, &mut again).unwrap();
        assert_eq!(again, got);
    }
    // Unloading an expert makes work routed to it fail cleanly.
    gpu.unload(|l, e| l == layer && e == 0);
    assert!(!gpu.is_loaded(layer, 0));
    let routing = Routing { offsets: vec![0, 1], experts: vec![0], weights: vec![1.0] };
    let mut out = vec![0f32; h];
    let err = gpu.forward(layer, &vec![0.5; h], &routing, &mut out).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("not loaded"), "{err}");
}

#[test]
fn experts_match_the_cpu_backend() {
    if gpu().is_none() {
        return;
    }
    check_experts(&[0]);
}

#[test]
fn experts_over_two_gpus_reduce_through_nccl() {
    if gpu().is_none() {
        return;
    }
    if device_count() < 2 {
        eprintln!("skipped: one CUDA device (two are needed)");
        return;
    }
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        eprintln!("skipped: libnccl not found");
        return;
    }
    check_experts(&[0, 1]);
}

/// Runs every echo case of the qwen35 fixture through the CPU model and through `on_gpu` (prompt → logits of every
/// position); returns the worst log-prob difference of the GPU run to the transformers reference and to the CPU.
fn echo_differences(lm: &LoadedModel, on_gpu: impl Fn(&[u32]) -> Vec<f32>) -> (f32, f32) {
    let vocab = lm.model.config().vocab_size;
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qwen35.expected.json")).unwrap()).unwrap();
    let (mut worst_ref, mut worst_cpu) = (0f32, 0f32);
    for case in expected["echo"].as_array().unwrap() {
        let prompt: Vec<u32> =
            case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let mut state = lm.model.new_state();
        let cpu = lm
            .model
            .forward(&mut [Segment { state: &mut state, tokens: &prompt, logits: LogitsFor::All }], &lm.experts)
            .unwrap()
            .remove(0);
        let gpu = on_gpu(&prompt);
        for (pos, (rc, rg)) in cpu.chunks_exact(vocab).zip(gpu.chunks_exact(vocab)).enumerate() {
            let (lc, lg) = (log_softmax(rc), log_softmax(rg));
            for (j, id) in case["top_ids"][pos].as_array().unwrap().iter().enumerate() {
                let id = id.as_u64().unwrap() as usize;
                let want = case["top_logprobs"][pos][j].as_f64().unwrap() as f32;
                worst_ref = worst_ref.max((lg[id] - want).abs());
                worst_cpu = worst_cpu.max((lg[id] - lc[id]).abs());
            }
        }
    }
    (worst_ref, worst_cpu)
}

/// The fixture's echo log-probs with the routed experts on the GPU: within bf16 tolerance of the reference and of
/// the CPU backend.
#[test]
fn fixture_logprobs_with_experts_on_the_gpu() {
    if gpu().is_none() {
        return;
    }
    let dir = fixture("qwen35");
    let lm = LoadedModel::load(&dir).unwrap();
    let cfg = lm.model.config().clone();
    let ckpt = Checkpoint::open_with(&dir, Residency::Mapped).unwrap();
    let on_gpu = CudaExperts::new(&cfg, &[0]).unwrap();
    on_gpu.load_more(&ckpt, &cfg, |_, _| true).unwrap();
    let (worst_ref, worst_cpu) = echo_differences(&lm, |prompt| {
        let mut state = lm.model.new_state();
        lm.model
            .forward(&mut [Segment { state: &mut state, tokens: prompt, logits: LogitsFor::All }], &on_gpu)
            .unwrap()
            .remove(0)
    });
    eprintln!("experts on the GPU: worst echo log-prob difference {worst_ref:.2e} to the reference, {worst_cpu:.2e} to the CPU backend");
    assert!(worst_ref < 5e-2 && worst_cpu < 5e-2, "{worst_ref} {worst_cpu}");
}

#[test]
fn norms_and_rope_match_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (rows, n) = (37, 256);
    let x = random(&mut rng, rows * n, 2.0);
    let w = random(&mut rng, n, 0.5);
    let mut want = x.clone();
    rms_norm_offset(&mut want, &w, 1e-6);
    let (xd, wd) = (up(&gpu, &x), up(&gpu, &w));
    let mut out = up(&gpu, &vec![0f32; rows * n]);
    ops::rms_norm_offset(&gpu, &xd, n, &wd, &mut out, n, rows, 1e-6).unwrap();
    assert!(rel_err(&down(&gpu, &out), &want) < 1e-5);
    // In place, on every other head of rows twice as wide (q inside [q | gate]).
    let wide: Vec<f32> = random(&mut rng, rows * 2 * n, 2.0);
    let mut wd2 = up(&gpu, &wide);
    ops::rms_norm_offset_in_place(&gpu, &mut wd2, 2 * n, &wd, rows, 1e-6).unwrap();
    let got = down(&gpu, &wd2);
    for r in 0..rows {
        let mut q = wide[r * 2 * n..r * 2 * n + n].to_vec();
        rms_norm_offset(&mut q, &w, 1e-6);
        assert!(rel_err(&got[r * 2 * n..r * 2 * n + n], &q) < 1e-5);
        assert_eq!(
            &got[r * 2 * n + n..(r + 1) * 2 * n],
            &wide[r * 2 * n + n..(r + 1) * 2 * n],
            "the gate is untouched"
        );
    }
    // Gated: w · (o / rms(o)) · silu(z).
    let z = random(&mut rng, rows * n, 3.0);
    let mut y = up(&gpu, &vec![0f32; rows * n]);
    ops::rms_norm_gated(&gpu, &xd, &up(&gpu, &z), &wd, &mut y, 1e-6).unwrap();
    let want: Vec<f32> = (0..rows * n)
        .map(|i| {
            let row = &x[(i / n) * n..(i / n + 1) * n];
            let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / n as f32 + 1e-6).sqrt();
            w[i % n] * (x[i] * inv) * silu(z[i])
        })
        .collect();
    assert!(rel_err(&down(&gpu, &y), &want) < 1e-5);
    // Partial RoPE: 64 of 256 dims rotated, 4 heads per token at positions up to 5000.
    let (ntok, heads, hd, rot) = (9, 4, 256, 64);
    let v = random(&mut rng, ntok * heads * hd, 1.0);
    let pos: Vec<i32> = (0..ntok as i32).map(|t| t * 600 + 3).collect();
    let mut vd = up(&gpu, &v);
    ops::rope_partial(&gpu, &mut vd, &up(&gpu, &pos), heads, heads * hd, hd, rot, 10_000_000.0).unwrap();
    let rope = Rope::new(rot, 10_000_000.0);
    let mut want = v.clone();
    for t in 0..ntok {
        for h in 0..heads {
            rope.apply(&mut want[(t * heads + h) * hd..(t * heads + h + 1) * hd], pos[t] as usize);
        }
    }
    // Angles up to ~5000 rad: sin/cos of f32 arguments differ by a few ulps of the angle between libm and CUDA.
    let got = down(&gpu, &vd);
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst < 2e-3, "{worst}");
}

#[test]
fn softmax_topk_matches_the_cpu_rule() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let (ntok, ne, k) = (33, 512, 10);
    let mut logits = random(&mut rng, ntok * ne, 4.0);
    logits[5] = logits[9]; // a tie inside a row: the lower id first
    for renorm in [false, true] {
        let (e, w) = ops::softmax_topk(&gpu, &up(&gpu, &logits), ne, k, renorm).unwrap();
        let (e, w) = (down(&gpu, &e), down(&gpu, &w));
        for t in 0..ntok {
            let mut p = logits[t * ne..(t + 1) * ne].to_vec();
            moe_model::cpu::ops::softmax(&mut p);
            let mut order: Vec<usize> = (0..ne).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            let sum: f32 = order[..k].iter().map(|&i| p[i]).sum();
            for j in 0..k {
                assert_eq!(e[t * k + j] as usize, order[j], "token {t} rank {j}");
                let want = if renorm { p[order[j]] / sum } else { p[order[j]] };
                assert!((w[t * k + j] - want).abs() <= 1e-6 + 1e-5 * want, "{} vs {want}", w[t * k + j]);
            }
        }
    }
}

#[test]
fn gated_deltanet_kernels_agree() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let d = GdnDims { hk: 2, hv: 4, dk: 128, dv: 128 };
    let (kernel, n) = (4, 150);
    let c = 2 * d.hk * d.dk + d.hv * d.dv;
    // Causal conv against the host formula, and its state against the window's tail.
    let state0 = random(&mut rng, (kernel - 1) * c, 1.0);
    let inp = random(&mut rng, n * c, 1.0);
    let w = random(&mut rng, kernel * c, 0.5);
    let inp_d = up(&gpu, &inp);
    let (u, next) =
        ops::causal_conv_silu(&gpu, &up(&gpu, &state0), &inp_d.as_view(), &up(&gpu, &w), c, kernel).unwrap();
    let window: Vec<f32> = state0.iter().chain(&inp).copied().collect();
    let want: Vec<f32> = (0..n * c)
        .map(|i| {
            let (t, ch) = (i / c, i % c);
            silu((0..kernel).map(|j| w[j * c + ch] * window[(t + j) * c + ch]).sum())
        })
        .collect();
    let u_host = down(&gpu, &u);
    assert!(rel_err(&u_host, &want) < 1e-5);
    assert_eq!(down(&gpu, &next), window[n * c..].to_vec());
    // The chunked rule equals the recurrent one (spec §3.4), outputs and final state.
    let b = random(&mut rng, n * d.hv, 2.0);
    let a = random(&mut rng, n * d.hv, 2.0);
    let neg_a: Vec<f32> = (0..d.hv).map(|j| -((j + 1) as f32).ln().exp()).collect();
    let dt_bias = random(&mut rng, d.hv, 0.5);
    let heads = ops::gdn_prepare(
        &gpu,
        &u,
        &up(&gpu, &b).as_view(),
        &up(&gpu, &a).as_view(),
        &up(&gpu, &neg_a),
        &up(&gpu, &dt_bias),
        d,
    )
    .unwrap();
    let s0 = random(&mut rng, d.hv * d.dk * d.dv, 0.1);
    let (mut s_rec, mut s_chunk) = (up(&gpu, &s0), up(&gpu, &s0));
    let o_rec = down(&gpu, &ops::gated_delta_recurrent(&gpu, &heads, &mut s_rec, d).unwrap());
    let o_chunk = down(&gpu, &ops::gated_delta_chunked(&gpu, &heads, &mut s_chunk, d).unwrap());
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    let (o_rec, o_chunk) = (f(o_rec), f(o_chunk));
    let err_o = rel_err(&o_chunk, &o_rec);
    let err_s = rel_err(&down(&gpu, &s_chunk), &down(&gpu, &s_rec));
    eprintln!("chunked vs recurrent over {n} tokens: output {err_o:.2e}, state {err_s:.2e}");
    assert!(err_o < 1e-4 && err_s < 1e-4);
    // The recurrent rule against a host recurrence in f64 on the prepared inputs.
    let (q, k, v, beta, g) = (
        down(&gpu, &heads.q),
        down(&gpu, &heads.k),
        down(&gpu, &heads.v),
        down(&gpu, &heads.beta),
        down(&gpu, &heads.g),
    );
    let mut worst = 0f64;
    for j in 0..d.hv {
        let mut s: Vec<f64> = s0[j * d.dk * d.dv..(j + 1) * d.dk * d.dv].iter().map(|&x| f64::from(x)).collect();
        for t in 0..n {
            let row = j * n + t;
            let alpha = g[row].exp();
            for col in 0..d.dv {
                let mut e = v[row * d.dv + col];
                for i in 0..d.dk {
                    e -= k[row * d.dk + i] * alpha * s[i * d.dv + col];
                }
                e *= beta[row];
                let mut o = 0.0;
                for i in 0..d.dk {
                    let x = alpha * s[i * d.dv + col] + k[row * d.dk + i] * e;
                    o += q[row * d.dk + i] * x;
                    s[i * d.dv + col] = f64::from(x as f32);
                }
                worst = worst.max((o - f64::from(o_rec[row * d.dv + col])).abs() / (o.abs() + 1e-3));
            }
        }
    }
    assert!(worst < 1e-5, "{worst}");
    // The output norm.
    let z = random(&mut rng, n * d.hv * d.dv, 2.0);
    let wn = random(&mut rng, d.dv, 1.0);
    let o_dev = up(&gpu, &o_rec.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>());
    let mut y_dev = up(&gpu, &vec![0f32; z.len()]);
    ops::gdn_output_norm(&gpu, &o_dev, &up(&gpu, &z).as_view(), &up(&gpu, &wn), d.hv, 1e-6, &mut y_dev.as_view_mut())
        .unwrap();
    let y = down(&gpu, &y_dev);
    for t in [0, n / 2, n - 1] {
        for j in 0..d.hv {
            let o = &o_rec[(j * n + t) * d.dv..(j * n + t + 1) * d.dv];
            let inv = 1.0 / (o.iter().map(|x| x * x).sum::<f32>() / d.dv as f32 + 1e-6).sqrt();
            for col in 0..d.dv {
                let at = (t * d.hv + j) * d.dv + col;
                let want = wn[col] * (o[col] * inv) * silu(z[at]);
                assert!((y[at] - want).abs() <= 1e-5 * (1.0 + want.abs()));
            }
        }
    }
}

#[test]
fn paged_attention_matches_a_direct_softmax() {
    let Some(gpu) = gpu() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let (nh, nkv, hd, page_tokens) = (8, 2, 256, 16);
    let width = nkv * hd;
    let (ctx0, n) = (70, 5); // 70 cached positions, then 5 new tokens
    let mut pool = KvPool::new(&gpu, 16, page_tokens, width).unwrap();
    // The sequence's pages, scattered over the pool.
    let table: Vec<i32> = vec![9, 2, 14, 0, 7, 11];
    let table_d = up(&gpu, &table);
    let keys = random(&mut rng, (ctx0 + n) * width, 1.0);
    let vals = random(&mut rng, (ctx0 + n) * width, 1.0);
    ops::kv_append(
        &gpu,
        &mut pool,
        &table_d,
        &up(&gpu, &keys[..ctx0 * width]).as_view(),
        &up(&gpu, &vals[..ctx0 * width]).as_view(),
        0,
    )
    .unwrap();
    ops::kv_append(
        &gpu,
        &mut pool,
        &table_d,
        &up(&gpu, &keys[ctx0 * width..]).as_view(),
        &up(&gpu, &vals[ctx0 * width..]).as_view(),
        ctx0,
    )
    .unwrap();
    let qg = random(&mut rng, n * nh * 2 * hd, 1.0);
    let mut o_dev = up(&gpu, &vec![0f32; n * nh * hd]);
    ops::attention_paged(
        &gpu,
        &up(&gpu, &qg).as_view(),
        &pool,
        &table_d,
        ctx0,
        (nh, nkv, hd),
        &mut o_dev.as_view_mut(),
    )
    .unwrap();
    let o = down(&gpu, &o_dev);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut want = vec![0f32; n * nh * hd];
    for t in 0..n {
        for h in 0..nh {
            let g = h / (nh / nkv);
            let q = &qg[(t * nh + h) * 2 * hd..(t * nh + h) * 2 * hd + hd];
            let gate = &qg[(t * nh + h) * 2 * hd + hd..(t * nh + h + 1) * 2 * hd];
            let ctx = ctx0 + t + 1;
            let scores: Vec<f32> = (0..ctx)
                .map(|p| {
                    q.iter().zip(&keys[p * width + g * hd..p * width + (g + 1) * hd]).map(|(a, b)| a * b).sum::<f32>()
                        * scale
                })
                .collect();
            let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f32 = e.iter().sum();
            for dd in 0..hd {
                let x: f32 = (0..ctx).map(|p| e[p] * vals[p * width + g * hd + dd]).sum::<f32>() / sum;
                want[(t * nh + h) * hd + dd] = x / (1.0 + (-gate[dd]).exp());
            }
        }
    }
    let err = rel_err(&o, &want);
    assert!(err < 1e-4, "{err}");
}

/// Without a GPU, asking for one fails in one line that names what is missing, and never panics (cudarc would, on
/// the first driver call, were the library not checked first). With a GPU, the probe finds device 0.
#[test]
fn probe_is_one_clear_line() {
    match moe_cuda::probe(&[0]) {
        Ok(found) => {
            assert_eq!(found.len(), 1);
            eprintln!("found {}", found[0]);
            let err = moe_cuda::probe(&[4096]).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.starts_with("no CUDA device 4096"), "{err}");
        }
        Err(e) => {
            let line = e.to_string();
            assert!(!line.contains('\n'), "{line}");
            assert!(line.contains("not found") || line.contains("CUDA driver"), "{line}");
            eprintln!("as expected without a GPU: {line}");
        }
    }
}

/// The decoder on the GPU (routed experts on the CPU, so that only the decoder differs): the fixture's echo log-probs
/// within bf16 tolerance of transformers and of the CPU decoder; greedy tokens equal to the CPU's; prefill then
/// decode equal to one pass; KV pages back in the pool when the states go.
#[test]
fn decoder_on_the_gpu_matches_the_reference() {
    use moe_cuda::CudaModel;
    use moe_model::Decoder;
    if gpu().is_none() {
        return;
    }
    let dir = fixture("qwen35");
    let lm = LoadedModel::load(&dir).unwrap();
    let cfg = lm.model.config().clone();
    let ckpt = Checkpoint::open_with(&dir, Residency::Mapped).unwrap();
    let model = CudaModel::load(&ckpt, cfg.clone(), 0, 64 << 20).unwrap();
    let free = model.free_kv_pages();
    let (worst_ref, worst_cpu) = echo_differences(&lm, |prompt| {
        let mut state = Decoder::new_state(&model);
        let out = model
            .forward_pipelined(
                &mut [Segment { state: &mut state, tokens: prompt, logits: LogitsFor::All }],
                &lm.experts,
                1,
            )
            .unwrap()
            .remove(0);
        assert_eq!(state.position(), prompt.len());
        out
    });
    eprintln!("decoder on the GPU: worst echo log-prob difference {worst_ref:.2e} to the reference, {worst_cpu:.2e} to the CPU decoder");
    assert!(worst_ref < 1e-1 && worst_cpu < 1e-1, "{worst_ref} {worst_cpu}");
    assert_eq!(model.free_kv_pages(), free, "every page back once the states are dropped");

    // Prefill of 69 tokens (chunked rule, several KV pages) then one decode step, against one pass over all 70.
    let prompt: Vec<u32> = (0..70u32).map(|i| (i * 37 + 11) % cfg.vocab_size as u32).collect();
    let mut one = Decoder::new_state(&model);
    let whole = model
        .forward_pipelined(&mut [Segment { state: &mut one, tokens: &prompt, logits: LogitsFor::Last }], &lm.experts, 1)
        .unwrap()
        .remove(0);
    let mut two = Decoder::new_state(&model);
    model
        .forward_pipelined(
            &mut [Segment { state: &mut two, tokens: &prompt[..69], logits: LogitsFor::None }],
            &lm.experts,
            1,
        )
        .unwrap();
    let step = model
        .forward_pipelined(
            &mut [Segment { state: &mut two, tokens: &prompt[69..], logits: LogitsFor::Last }],
            &lm.experts,
            1,
        )
        .unwrap()
        .remove(0);
    let err = rel_err(&step, &whole);
    eprintln!("prefill + decode vs one pass: {err:.2e}");
    assert!(err < 1e-2, "{err}");
    // Two sequences in one batch give what each gives alone.
    let mut a = Decoder::new_state(&model);
    let mut b = Decoder::new_state(&model);
    let both = model
        .forward_pipelined(
            &mut [
                Segment { state: &mut a, tokens: &prompt[..5], logits: LogitsFor::Last },
                Segment { state: &mut b, tokens: &prompt, logits: LogitsFor::Last },
            ],
            &lm.experts,
            1,
        )
        .unwrap();
    assert!(rel_err(&both[1], &whole) < 1e-2);
    // A decode step of several sequences at once (the batched kernels) against the CPU decoder doing the same.
    let lens = [5usize, 17, 69];
    let mut gpu_states: Vec<_> = lens.iter().map(|_| Decoder::new_state(&model)).collect();
    let mut cpu_states: Vec<_> = lens.iter().map(|_| lm.model.new_state()).collect();
    for ((gs, cs), &len) in gpu_states.iter_mut().zip(cpu_states.iter_mut()).zip(&lens) {
        let seg = |state| Segment { state, tokens: &prompt[..len], logits: LogitsFor::None };
        model.forward_pipelined(&mut [seg(gs)], &lm.experts, 1).unwrap();
        lm.model.forward(&mut [seg(cs)], &lm.experts).unwrap();
    }
    for step in 0..3 {
        let next: Vec<[u32; 1]> = lens.iter().map(|&l| [prompt[(l + step) % prompt.len()]]).collect();
        let mut segs: Vec<Segment<'_>> = gpu_states
            .iter_mut()
            .zip(&next)
            .map(|(state, t)| Segment { state, tokens: t, logits: LogitsFor::Last })
            .collect();
        let gpu_out = model.forward_pipelined(&mut segs, &lm.experts, 1).unwrap();
        let mut segs: Vec<Segment<'_>> = cpu_states
            .iter_mut()
            .zip(&next)
            .map(|(state, t)| Segment { state, tokens: t, logits: LogitsFor::Last })
            .collect();
        let cpu_out = lm.model.forward(&mut segs, &lm.experts).unwrap();
        for (g, c) in gpu_out.iter().zip(&cpu_out) {
            let err = rel_err(g, c);
            assert!(err < 2e-2, "decode step {step}: {err}");
        }
    }
    // A state from another decoder is refused.
    let err = model
        .forward_pipelined(
            &mut [Segment { state: &mut lm.model.new_state(), tokens: &prompt[..1], logits: LogitsFor::Last }],
            &lm.experts,
            1,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("another model"), "{err}");
}
