//! `tokenizer.json` and chat templates, as a model directory brings them.

use std::path::Path;

use moe_model::{ChatTemplate, Message, Tokenizer};

use crate::{fixture, fixture_dir};

const SAMPLE: &str = "Hello, 世界! <|im_start|>user\n  1234 \u{1F600}<|im_end|>";

/// A `tokenizer.json`: loaded, then used on text that spells special tokens, with them read as text and not.
pub fn tokenizer_json(data: &[u8]) {
    crate::foreign_panics_unwind();
    let Ok(tok) = Tokenizer::from_bytes(data, Path::new("tokenizer.json")) else { return };
    if let Ok(ids) = tok.encode(SAMPLE, true) {
        let _ = tok.decode(&ids, false);
        let _ = tok.decode(&ids, true);
    }
    let whole = 0..SAMPLE.len();
    let _ = tok.encode_literal(SAMPLE, std::slice::from_ref(&whole));
    let _ = tok.max_id();
}

/// A chat template's source, compiled and rendered (under its fuel) over a conversation that spells the fixture
/// tokenizer's control tokens.
pub fn chat_template(data: &[u8]) {
    crate::foreign_panics_unwind();
    static TOKENIZER: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    let Ok(source) = std::str::from_utf8(data) else { return };
    let Ok(template) = ChatTemplate::from_source(
        source.to_owned(),
        Some("<|endoftext|>".into()),
        Some("<|im_end|>".into()),
        Path::new("chat_template.jinja"),
    ) else {
        return;
    };
    let tok =
        TOKENIZER.get_or_init(|| fixture("tokenizer", Tokenizer::from_file(&fixture_dir().join("tokenizer.json"))));
    let messages =
        [Message::new("system", "Be brief."), Message::new("user", SAMPLE), Message::new("assistant", String::new())];
    for generation_prompt in [false, true] {
        let _ = template.encode(tok, &messages, generation_prompt);
    }
}
