//! Generation loop: end-of-sequence handling, echo positions, chunked prefill of long prompts.

use std::path::PathBuf;

use moe_model::{generate, FinishReason, GenerateRequest, LoadedModel, SamplingParams};

fn load() -> LoadedModel {
    LoadedModel::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen35")).expect("loads")
}

fn greedy(prompt: Vec<u32>, max_tokens: usize, stop_ids: Vec<u32>, logprobs: usize, echo: bool) -> GenerateRequest {
    GenerateRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams { temperature: 0.0, ..Default::default() },
        logprobs,
        echo,
        stop_ids,
    }
}

#[test]
fn stops_at_end_of_sequence_and_keeps_it() {
    let lm = load();
    let free =
        generate(&lm.model, &lm.experts, &greedy(vec![3, 1, 4, 1, 5], 12, vec![], 0, false), |_| {}).expect("generate");
    assert_eq!(free.finish_reason, FinishReason::Length);
    assert_eq!(free.output_ids.len(), 12);
    let stop = free.output_ids[4];
    let first = free.output_ids.iter().position(|&t| t == stop).expect("present");
    let mut seen = Vec::new();
    let out =
        generate(&lm.model, &lm.experts, &greedy(vec![3, 1, 4, 1, 5], 12, vec![stop], 0, false), |t| seen.push(t))
            .expect("generate");
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.output_ids, free.output_ids[..=first]);
    assert_eq!(seen, out.output_ids, "the callback sees every token in order");
}

#[test]
fn echo_and_long_prompts() {
    let lm = load();
    // Longer than one prefill chunk, so the prompt is fed in several forwards.
    let prompt: Vec<u32> = (0..moe_model::generate::PREFILL_CHUNK as u32 + 37).map(|i| (i * 7 + 3) % 290).collect();
    let plain = generate(&lm.model, &lm.experts, &greedy(prompt.clone(), 3, vec![], 2, false), |_| {}).expect("gen");
    let echo = generate(&lm.model, &lm.experts, &greedy(prompt.clone(), 3, vec![], 2, true), |_| {}).expect("gen");
    assert_eq!(plain.output_ids, echo.output_ids);
    assert_eq!(plain.logprobs.len(), 3);
    assert_eq!(echo.logprobs.len(), prompt.len() + 3);
    // The positions that produced output tokens carry the same distributions in both modes.
    for i in 0..3 {
        assert_eq!(echo.logprobs[prompt.len() - 1 + i], plain.logprobs[i]);
    }
    assert!(generate(&lm.model, &lm.experts, &greedy(vec![], 3, vec![], 0, false), |_| {}).is_err());
    assert!(generate(&lm.model, &lm.experts, &greedy(vec![100_000], 3, vec![], 0, false), |_| {}).is_err());
}

#[test]
fn a_state_only_works_with_its_own_model() {
    let a = load();
    let b = load();
    let mut state = a.model.new_state();
    let err = b
        .model
        .forward(
            &mut [moe_model::Segment { state: &mut state, tokens: &[1, 2], logits: moe_model::LogitsFor::Last }],
            &b.experts,
        )
        .expect_err("foreign state");
    assert!(err.to_string().contains("another model"), "{err}");
    assert_eq!(state.position(), 0, "a rejected forward leaves the state untouched");
}
