//! Properties of the forward pass that must hold exactly (≤ 1e-5): prefill then decode equals one full forward, and a
//! sequence decoded inside a batch of 8 sequences of different lengths and positions gives what it gives alone. And
//! bit for bit: a prompt fed in pieces that end on multiples of `ALIGN_TOKENS` gives what one call gives, and a
//! snapshot continues as the state it was taken from (what the prefix cache rests on).

use std::path::PathBuf;

use moe_model::cpu::matmul::{self, Kernel, Precision};
use moe_model::state::ALIGN_TOKENS;
use moe_model::{LoadedModel, LogitsFor, Segment, SequenceState};

const TOL: f32 = 1e-5;
/// The same bound for the matrix units' split precision: `hi = bf16(x)` rounds, so two values of `x` that differ in
/// their last bits (the chunked and the recurrent delta rule round differently) can split into high and low parts
/// whose sum differs by up to about 2⁻¹⁷ of `x`; the later layers' matmuls carry that on. Measured: under 5e-5.
const SPLIT_TOL: f32 = 1e-4;

/// The prefill-versus-decode tolerance of this process's kernel.
fn path_tol() -> f32 {
    let sel = matmul::selection();
    if sel.kernel.group().is_some() || sel.precision == Precision::Bf16 {
        SPLIT_TOL
    } else {
        TOL
    }
}

fn load(name: &str) -> LoadedModel {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name);
    LoadedModel::load(&dir).expect("fixture model loads")
}

fn tokens(n: usize, seed: u32, vocab: usize) -> Vec<u32> {
    let mut s = seed.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s % vocab as u32
        })
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn prefill_then_decode_equals_full_forward(name: &str) {
    let lm = load(name);
    let vocab = lm.model.config().vocab_size;
    // 150 tokens: the prefill spans three 64-token chunks; the decode runs the recurrent kernel.
    let seq = tokens(150, 7, vocab);
    let mut full_state = lm.model.new_state();
    let full = lm
        .model
        .forward(&mut [Segment { state: &mut full_state, tokens: &seq, logits: LogitsFor::All }], &lm.experts)
        .expect("full forward")
        .remove(0);
    for split in [1, 63, 64, 100] {
        let mut state = lm.model.new_state();
        let mut got = lm
            .model
            .forward(&mut [Segment { state: &mut state, tokens: &seq[..split], logits: LogitsFor::All }], &lm.experts)
            .expect("prefill")
            .remove(0);
        for t in &seq[split..] {
            let row = lm
                .model
                .forward(
                    &mut [Segment { state: &mut state, tokens: std::slice::from_ref(t), logits: LogitsFor::Last }],
                    &lm.experts,
                )
                .expect("decode")
                .remove(0);
            got.extend(row);
        }
        assert_eq!(state.position(), seq.len());
        let d = max_diff(&got, &full);
        eprintln!("{name}: prefill {split} then decode vs full forward: {d:.2e}");
        assert!(d <= path_tol(), "{name}: prefill {split} then decode differs from the full forward by {d}");
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn aligned_pieces_and_snapshots_are_bit_identical(name: &str) {
    let lm = load(name);
    let vocab = lm.model.config().vocab_size;
    let seq = tokens(150, 11, vocab);
    let run = |state: &mut SequenceState, toks: &[u32]| {
        lm.model
            .forward(&mut [Segment { state, tokens: toks, logits: LogitsFor::All }], &lm.experts)
            .expect("forward")
            .remove(0)
    };
    let mut one_state = lm.model.new_state();
    let whole = bits(&run(&mut one_state, &seq));
    let a = ALIGN_TOKENS;
    for cuts in [vec![a], vec![2 * a, 3 * a], vec![a, 2 * a, 3 * a, 4 * a]] {
        let mut state = lm.model.new_state();
        let mut got = Vec::new();
        let mut from = 0;
        for to in cuts.iter().copied().chain([seq.len()]) {
            got.extend(run(&mut state, &seq[from..to]));
            from = to;
        }
        assert_eq!(bits(&got), whole, "{name}: fed in pieces ending at {cuts:?}");
    }

    // A last piece of one token (the recurrent step) gives what a last chunk of one token in a longer call gives.
    let short = &seq[..4 * a + 1];
    let mut state = lm.model.new_state();
    let one_call = bits(&run(&mut state, short));
    let mut state = lm.model.new_state();
    let pieces = bits(&[run(&mut state, &short[..4 * a]), run(&mut state, &short[4 * a..])].concat());
    assert_eq!(pieces, one_call, "{name}: a last piece of one token");

    // A snapshot at an aligned position continues as the state does, and as one call does; the state it was taken
    // from, going on first, leaves it untouched (the pages they share are full).
    let mut state = lm.model.new_state();
    let head = run(&mut state, &seq[..2 * a]);
    let mut snap = state.snapshot().expect("a CPU state can be copied");
    let tail = run(&mut state, &seq[2 * a..]);
    assert_eq!(bits(&[head.clone(), tail].concat()), whole, "{name}: the original after its snapshot");
    let tail = run(&mut snap, &seq[2 * a..]);
    assert_eq!(bits(&[head, tail].concat()), whole, "{name}: the snapshot continued");

    // At an unaligned position the shared page is still filling: whoever writes first copies it, and each goes on
    // as the same cut without a snapshot does.
    let cut = 2 * a + 5;
    let mut reference = lm.model.new_state();
    let expected = bits(&[run(&mut reference, &seq[..cut]), run(&mut reference, &seq[cut..])].concat());
    let mut state = lm.model.new_state();
    let head = run(&mut state, &seq[..cut]);
    let mut snap = state.snapshot().expect("a CPU state can be copied");
    let tail = run(&mut state, &seq[cut..]);
    assert_eq!(bits(&[head.clone(), tail].concat()), expected, "{name}: the original, unaligned");
    let tail = run(&mut snap, &seq[cut..]);
    assert_eq!(bits(&[head, tail].concat()), expected, "{name}: the snapshot, unaligned");
}

fn batch_of_eight_equals_alone(name: &str, micro_batches: usize) {
    let lm = load(name);
    let vocab = lm.model.config().vocab_size;
    let prompt_lens = [3usize, 70, 12, 1, 130, 33, 64, 9];
    let prompts: Vec<Vec<u32>> = prompt_lens.iter().enumerate().map(|(i, &n)| tokens(n, i as u32 + 1, vocab)).collect();
    let steps = 6;
    let next: Vec<Vec<u32>> = (0..8).map(|i| tokens(steps, 100 + i as u32, vocab)).collect();

    // Alone: each sequence prefilled and decoded by itself.
    let mut alone = Vec::new();
    for (p, nx) in prompts.iter().zip(&next) {
        let mut state = lm.model.new_state();
        let mut rows = Vec::new();
        let mut seg = [Segment { state: &mut state, tokens: p, logits: LogitsFor::Last }];
        rows.push(lm.model.forward(&mut seg, &lm.experts).expect("prefill").remove(0));
        for t in nx {
            let mut seg = [Segment { state: &mut state, tokens: std::slice::from_ref(t), logits: LogitsFor::Last }];
            rows.push(lm.model.forward(&mut seg, &lm.experts).expect("decode").remove(0));
        }
        alone.push(rows);
    }

    // Batched: all eight prefilled in one forward, then decoded together, one token each per step.
    let mut states: Vec<_> = (0..8).map(|_| lm.model.new_state()).collect();
    let mut batched: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 8];
    let mut segs: Vec<Segment<'_>> = states
        .iter_mut()
        .zip(&prompts)
        .map(|(s, p)| Segment { state: s, tokens: p, logits: LogitsFor::Last })
        .collect();
    for (i, row) in lm
        .model
        .forward_pipelined(&mut segs, &lm.experts, micro_batches)
        .expect("batched prefill")
        .into_iter()
        .enumerate()
    {
        batched[i].push(row);
    }
    for step in 0..steps {
        let mut segs: Vec<Segment<'_>> = states
            .iter_mut()
            .zip(&next)
            .map(|(s, nx)| Segment { state: s, tokens: std::slice::from_ref(&nx[step]), logits: LogitsFor::Last })
            .collect();
        for (i, row) in lm
            .model
            .forward_pipelined(&mut segs, &lm.experts, micro_batches)
            .expect("batched decode")
            .into_iter()
            .enumerate()
        {
            batched[i].push(row);
        }
    }
    let mut worst = 0f32;
    for i in 0..8 {
        for (a, b) in alone[i].iter().zip(&batched[i]) {
            worst = worst.max(max_diff(a, b));
        }
    }
    eprintln!("{name}: batch-vs-alone worst logit difference {worst:.2e} ({micro_batches} micro-batches)");
    assert!(worst <= TOL, "{name}: a sequence in a batch of 8 differs from itself alone by {worst}");
    // The matmul kernels are batch-invariant, so the difference is not just small: it is none.
    assert_eq!(worst, 0.0, "{name}: batching changed the bits of a sequence's logits");
}

/// Selects this test process's matmul kernel (nextest runs each test in its own process); false, with the reason
/// printed, when this CPU lacks it.
fn select(kernel: Option<Kernel>, precision: Precision) -> bool {
    if let Some(Err(why)) = kernel.map(Kernel::check) {
        eprintln!("skipped: kernel {} is not available here: {why}", kernel.map_or("", Kernel::name));
        return false;
    }
    matmul::configure(kernel, precision)
        .expect("one kernel per test process: run the tests with cargo nextest, which gives each test its own");
    true
}

/// The properties once per kernel and precision: `default_kernel` is whatever this CPU selects; kernels the CPU lacks
/// are skipped with the reason.
macro_rules! per_kernel {
    ($($name:ident: $kernel:expr, $precision:expr;)*) => {
        $(mod $name {
            use super::*;

            #[test]
            fn qwen35_prefill_then_decode() {
                if select($kernel, $precision) { prefill_then_decode_equals_full_forward("qwen35") }
            }

            #[test]
            fn qwen3next_prefill_then_decode() {
                if select($kernel, $precision) { prefill_then_decode_equals_full_forward("qwen3next") }
            }

            #[test]
            fn qwen35_aligned_pieces_and_snapshots() {
                if select($kernel, $precision) { aligned_pieces_and_snapshots_are_bit_identical("qwen35") }
            }

            #[test]
            fn qwen3next_aligned_pieces_and_snapshots() {
                if select($kernel, $precision) { aligned_pieces_and_snapshots_are_bit_identical("qwen3next") }
            }

            #[test]
            fn qwen35_batch_of_eight() {
                if select($kernel, $precision) { batch_of_eight_equals_alone("qwen35", 1) }
            }

            #[test]
            fn qwen35_batch_of_eight_in_three_micro_batches() {
                if select($kernel, $precision) { batch_of_eight_equals_alone("qwen35", 3) }
            }

            #[test]
            fn qwen3next_batch_of_eight() {
                if select($kernel, $precision) { batch_of_eight_equals_alone("qwen3next", 2) }
            }
        })*
    };
}

per_kernel! {
    default_kernel: None, Precision::Split;
    amx: Some(Kernel::Amx), Precision::Split;
    amx_bf16_precision: Some(Kernel::Amx), Precision::Bf16;
    avx512_bf16: Some(Kernel::Avx512Bf16), Precision::Split;
    avx512_bf16_bf16_precision: Some(Kernel::Avx512Bf16), Precision::Bf16;
    avx512f: Some(Kernel::Avx512F), Precision::Split;
    avx2: Some(Kernel::Avx2), Precision::Split;
}
