//! The HTTP API's request bodies: `/v1/completions`, `/v1/chat/completions`, `/tokenize` and `/detokenize`, read
//! exactly as the handlers read them, before anything runs.

use std::sync::OnceLock;
use std::time::Duration;

use moe_model::{ChatTemplate, GenerationConfig, ModelConfig, Tokenizer};
use router_node::http::{read_request, ApiError, Endpoint, Intake, RequestShape};

use crate::{fixture, fixture_dir};

struct Model {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    generation: GenerationConfig,
    vocab_size: usize,
}

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = fixture_dir();
        Model {
            tokenizer: fixture("tokenizer", Tokenizer::from_file(&dir.join("tokenizer.json"))),
            template: fixture("template", ChatTemplate::load(&dir)).expect("the fixture has a chat template"),
            generation: fixture("generation config", GenerationConfig::load(&dir)),
            vocab_size: fixture("config", ModelConfig::from_file(&dir.join("config.json"))).vocab_size,
        }
    })
}

fn intake(m: &Model) -> Intake<'_> {
    Intake {
        model_name: "fixture",
        tokenizer: &m.tokenizer,
        chat_template: Some(&m.template),
        generation: &m.generation,
        vocab_size: m.vocab_size,
        max_model_len: 256,
        max_choices: 16,
        request_timeout: Duration::from_secs(600),
        parsers: router_node::http::ChatParsers::of_template(Some(&m.template)),
        // Constraints are refused here: the fuzz targets read requests, they do not compile grammars.
        guides: None,
    }
}

/// A refusal is the client's fault (4xx) and says why; anything read is within every limit.
fn check(intake: &Intake<'_>, read: Result<RequestShape, ApiError>) {
    let shape = match read {
        Err(e) => {
            assert!(e.status().is_client_error(), "a bad body must get a 4xx, got {}: {}", e.status(), e.message());
            assert!(!e.message().is_empty(), "a refusal must say why");
            return;
        }
        Ok(shape) => shape,
    };
    assert!(shape.choices <= intake.max_choices, "{} choices", shape.choices);
    for (i, prompt) in shape.prompts.iter().enumerate() {
        assert!(prompt.iter().all(|&t| (t as usize) < intake.vocab_size), "prompt {i} holds an id past the vocabulary");
        if let Some(&max_tokens) = shape.max_tokens.get(i) {
            assert!(
                !prompt.is_empty() && max_tokens >= 1,
                "prompt {i}: {} tokens, max_tokens {max_tokens}",
                prompt.len()
            );
            assert!(prompt.len() + max_tokens <= intake.max_model_len, "prompt {i} overruns the context");
        }
    }
    assert!(shape.stop.len() <= 64 && shape.stop.iter().map(String::len).sum::<usize>() <= 4096);
    assert!(shape.stop_token_ids.len() <= 256);
    let t = shape.temperature;
    assert!(t == 0.0 || (t.is_finite() && t >= 1e-5), "temperature {t} would not sample");
    // (Only requests that generate carry one: `/tokenize` and `/detokenize` start no sequence.)
    let p = shape.repetition_penalty;
    assert!(shape.choices == 0 || (p.is_finite() && p > 0.0), "repetition penalty {p} would not scale logits");
}

/// A `/v1/completions` body.
pub fn completions(data: &[u8]) {
    let m = model();
    let intake = intake(m);
    check(&intake, read_request(&intake, Endpoint::Completions, data));
}

/// A `/v1/chat/completions` body: the messages go through the model's real template and tokenizer. A special token
/// typed into a message stays text: the rendered conversation has no more control tokens than the template emits.
pub fn chat(data: &[u8]) {
    let m = model();
    let intake = intake(m);
    let read = read_request(&intake, Endpoint::ChatCompletions, data);
    if let Ok(shape) = &read {
        let im_start = m.tokenizer.token_id("<|im_start|>");
        let starts = shape.prompts[0].iter().filter(|&&t| Some(t) == im_start).count();
        let messages = serde_json::from_slice::<serde_json::Value>(data)
            .ok()
            .and_then(|v| v.get("messages").and_then(|m| m.as_array()).map(Vec::len))
            .unwrap_or(0);
        // The fixture's template opens each message, and the assistant's turn, with one <|im_start|>.
        assert_eq!(starts, messages + 1, "a message's text became a control token");
    }
    check(&intake, read);
}

/// A `/tokenize` body (first byte even) or a `/detokenize` body (odd).
pub fn tokenize(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else { return };
    let m = model();
    let intake = intake(m);
    let endpoint = if which % 2 == 0 { Endpoint::Tokenize } else { Endpoint::Detokenize };
    check(&intake, read_request(&intake, endpoint, body));
}
