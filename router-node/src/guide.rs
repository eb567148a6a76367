//! Constrained decoding: a sequence's tokens kept inside a grammar (a JSON schema, a regular expression, a choice of
//! strings, a Lark grammar), with llguidance computing each step's allowed tokens.
//!
//! A [`Guides`] is built once per model from its `tokenizer.json`. Each constrained sequence gets a [`Guide`] whose
//! matcher lives on a thread of its own: the mask for the next token is computed there while the engine runs the
//! step that produces that token's logits, so the mask is off the batch's critical path. The engine only waits
//! when a mask takes longer than a whole step.

use std::sync::mpsc;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

/// Why a constraint could not be built or followed.
#[derive(Debug, thiserror::Error)]
pub enum GuideError {
    #[error("the tokenizer cannot be read for constrained decoding: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Grammar(String),
    #[error("the grammar matcher stopped: {0}")]
    Matcher(String),
}

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum GuideSpec {
    /// A JSON value valid under this schema.
    JsonSchema(Value),
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// Text matching a regular expression, whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect (vLLM's `guided_grammar`).
    Lark(String),
    /// Free reasoning up to the first `</think>` (the prompt opened the block), the blank line the templates put
    /// after it, then the output the inner constraint allows: the model thinks as it would unconstrained, and the
    /// constrained answer is the content. (vLLM with a reasoning parser behaves so.)
    AfterReasoning(Box<GuideSpec>),
}

impl GuideSpec {
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            GuideSpec::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema.clone())),
            GuideSpec::JsonObject => TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"}))),
            GuideSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            GuideSpec::Choice(options) => {
                let alternatives: Vec<String> = options.iter().map(|o| lark_string(o)).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
            GuideSpec::Lark(source) => TopLevelGrammar::from_lark(source.clone()),
            GuideSpec::AfterReasoning(inner) => {
                // A lazy lexeme whose visible suffix is `</think>`: it ends at the first one. The inner grammar is
                // referenced by name from the outer one.
                let mut inner = inner.grammar();
                let mut grammars = vec![llguidance::api::GrammarWithLexer::from_lark(format!(
                    "start: reasoning {} @inner\nreasoning[suffix={}]: /(.|\\n)*/",
                    lark_string("\n\n"),
                    lark_string(REASONING_END),
                ))];
                if let Some(first) = inner.grammars.first_mut() {
                    first.name = Some("inner".into());
                }
                grammars.extend(inner.grammars);
                TopLevelGrammar { grammars, max_tokens: None }
            }
        }
    }
}

/// What ends a reasoning block.
pub const REASONING_END: &str = "</think>";

/// A schema whose JSON is written as Python's `json.dumps` writes it (`", "` and `": "`, no other white space),
/// unless the schema sets its own llguidance options: free white space lets a model pad forever.
pub fn compact(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(
            || serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// A string as a Lark literal (JSON's escapes are Lark's).
pub fn lark_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// The model's vocabulary as llguidance sees it, and the factory of matchers over it.
pub struct Guides {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for Guides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guides").finish_non_exhaustive()
    }
}

impl Guides {
    /// Builds the token trie from `tokenizer.json` (its text), for a model whose logits have `vocab_size` entries;
    /// `eos_ids` end a constrained output once the grammar is complete.
    pub fn new(tokenizer_json: &str, eos_ids: &[u32], vocab_size: usize) -> Result<Self, GuideError> {
        let json: Value = serde_json::from_str(tokenizer_json).map_err(|e| GuideError::Tokenizer(e.to_string()))?;
        let mut words =
            llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| GuideError::Tokenizer(e.to_string()))?;
        if words.len() > vocab_size {
            return Err(GuideError::Tokenizer(format!(
                "the tokenizer has {} tokens, the model's logits only {vocab_size}",
                words.len()
            )));
        }
        // Ids the tokenizer does not have (the model's padding) are special tokens no grammar allows.
        for i in words.len()..vocab_size {
            let mut word = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            word.extend_from_slice(format!("<[pad{i}]>").as_bytes());
            words.push(word);
        }
        let eos: Vec<u32> = eos_ids.iter().copied().filter(|&e| (e as usize) < vocab_size).collect();
        let Some(&first) = eos.first() else {
            return Err(GuideError::Tokenizer("the model has no end-of-sequence token in its vocabulary".into()));
        };
        let info = TokRxInfo::new(vocab_size as u32, first);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos);
        let env: llguidance::toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| GuideError::Tokenizer(e.to_string()))?;
        factory.quiet();
        Ok(Guides { factory: Arc::new(factory) })
    }

    /// Checks and compiles `spec`; an error is the client's (a schema llguidance cannot follow, a bad regex).
    pub fn compile(&self, spec: &GuideSpec) -> Result<Compiled, GuideError> {
        let parser = self.factory.create_parser(spec.grammar()).map_err(|e| GuideError::Grammar(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GuideError::Grammar(e));
        }
        Ok(Compiled(matcher))
    }
}

/// A compiled constraint, not yet following a sequence.
pub struct Compiled(Matcher);

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compiled")
    }
}

impl Compiled {
    /// A fresh copy, for another choice of the same request.
    pub fn copy(&self) -> Compiled {
        Compiled(self.0.deep_clone())
    }

    /// Starts following a sequence: the matcher moves to its own thread, which computes the first mask at once.
    pub fn start(self) -> Result<Guide, GuideError> {
        let (token_tx, token_rx) = mpsc::channel::<u32>();
        let (mask_tx, mask_rx) = mpsc::sync_channel::<Result<SimpleVob, String>>(1);
        let mut matcher = self.0;
        std::thread::Builder::new()
            .name("guide".into())
            .spawn(move || {
                loop {
                    let mask = matcher.compute_mask_or_eos().map_err(|e| e.to_string());
                    let failed = mask.is_err();
                    if mask_tx.send(mask).is_err() || failed {
                        return;
                    }
                    // The sequence's next token, or the end of the sequence (the sender dropped).
                    let Ok(token) = token_rx.recv() else { return };
                    if let Err(e) = matcher.consume_token(token) {
                        let _ = mask_tx.send(Err(e.to_string()));
                        return;
                    }
                }
            })
            .map_err(|e| GuideError::Matcher(format!("cannot start its thread: {e}")))?;
        Ok(Guide { token_tx, mask_rx, waiting: true })
    }
}

/// A constraint following one sequence, as the engine uses it: [`Guide::restrict`] then [`Guide::commit`], once
/// per generated token.
#[derive(Debug)]
pub struct Guide {
    token_tx: mpsc::Sender<u32>,
    mask_rx: mpsc::Receiver<Result<SimpleVob, String>>,
    /// A mask is on its way (computed after the last commit).
    waiting: bool,
}

impl Guide {
    /// Sets the logits of every token the grammar does not allow next to −∞.
    pub fn restrict(&mut self, logits: &mut [f32]) -> Result<(), GuideError> {
        if !self.waiting {
            return Err(GuideError::Matcher("a token was asked for twice without being committed".into()));
        }
        self.waiting = false;
        let mask = self
            .mask_rx
            .recv()
            .map_err(|_| GuideError::Matcher("its thread ended".into()))?
            .map_err(GuideError::Matcher)?;
        if mask.is_zero() {
            return Err(GuideError::Matcher("no token can continue the output".into()));
        }
        for (i, l) in logits.iter_mut().enumerate() {
            if !mask.get(i) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// The token the sequence took; the next mask is computed from it in the background.
    pub fn commit(&mut self, token: u32) -> Result<(), GuideError> {
        self.token_tx.send(token).map_err(|_| GuideError::Matcher("its thread ended".into()))?;
        self.waiting = true;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub(crate) fn fixture_guides() -> (Guides, moe_model::Tokenizer) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen35");
        let json = std::fs::read_to_string(dir.join("tokenizer.json")).expect("fixture tokenizer");
        let tok = moe_model::Tokenizer::from_file(&dir.join("tokenizer.json")).expect("tokenizer");
        let eos = tok.token_id("<|im_end|>").expect("im_end");
        (Guides::new(&json, &[eos], 300).expect("guides"), tok)
    }

    /// Generates under `spec` from seeded random logits until an end token, returning the text.
    pub(crate) fn run(
        guides: &Guides,
        tok: &moe_model::Tokenizer,
        spec: &GuideSpec,
        seed: u64,
        limit: usize,
    ) -> Option<String> {
        let mut guide = guides.compile(spec).expect("compiles").start().expect("starts");
        let eos = tok.token_id("<|im_end|>").expect("im_end");
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut ids = Vec::new();
        for _ in 0..limit {
            let mut logits: Vec<f32> = (0..300)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % 1000) as f32 / 100.0
                })
                .collect();
            guide.restrict(&mut logits).expect("a token is allowed");
            let id = moe_model::sampling::argmax(&logits);
            if id == eos {
                return Some(tok.decode(&ids, false).expect("decode"));
            }
            ids.push(id);
            guide.commit(id).expect("commit");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{fixture_guides, run};
    use super::*;

    #[test]
    fn random_logits_under_a_schema_give_valid_json() {
        let (guides, tok) = fixture_guides();
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"unit": {"enum": ["celsius", "kelvin"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
                           "ok": {"type": "boolean"}},
            "required": ["unit", "n", "ok"], "additionalProperties": false});
        for seed in 0..20 {
            let text = run(&guides, &tok, &GuideSpec::JsonSchema(schema.clone()), seed, 200).expect("ends");
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(matches!(v["unit"].as_str(), Some("celsius" | "kelvin")), "{text}");
            assert!(v["n"].as_u64().is_some_and(|n| n <= 99), "{text}");
            assert!(v["ok"].is_boolean(), "{text}");
        }
    }

    #[test]
    fn choices_and_regexes_are_followed_and_bad_ones_refused() {
        let (guides, tok) = fixture_guides();
        let choice = GuideSpec::Choice(vec!["yes".into(), "no \"way\"".into()]);
        for seed in 0..10 {
            let text = run(&guides, &tok, &choice, seed, 50).expect("ends");
            assert!(text == "yes" || text == "no \"way\"", "{text:?}");
        }
        let rx = GuideSpec::Regex("[a-c]{2}-[0-9]".into());
        for seed in 0..10 {
            let text = run(&guides, &tok, &rx, seed, 50).expect("ends");
            assert_eq!(text.len(), 4, "{text:?}");
            assert!(text.as_bytes()[2] == b'-', "{text:?}");
        }
        assert!(guides.compile(&GuideSpec::Regex("(unclosed".into())).is_err());
        assert!(guides.compile(&GuideSpec::Lark("start: nothing_defined".into())).is_err());
    }

    #[test]
    fn reasoning_is_free_until_it_closes_then_the_constraint_holds() {
        let (guides, tok) = fixture_guides();
        let eos = tok.token_id("<|im_end|>").expect("im_end");
        let spec = GuideSpec::AfterReasoning(Box::new(GuideSpec::Choice(vec!["A".into(), "B".into()])));
        let compiled = guides.compile(&spec).expect("compiles");
        let ascii: Vec<u32> = (0..297)
            .filter(|&t| {
                tok.decode(&[t], false)
                    .is_ok_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
            })
            .collect();
        assert!(ascii.len() > 100, "{} ASCII tokens", ascii.len());
        for seed in 0..4u32 {
            let mut guide = compiled.copy().start().expect("starts");
            // Inside reasoning, every token of ASCII text may come next, at every step, and the output may not end.
            let thought = format!("Reasoning {seed}: <b>A</b> or B? </thin no, it is A ");
            for id in tok.encode(&thought, false).expect("encodes") {
                let mut logits = vec![0.0f32; 300];
                guide.restrict(&mut logits).expect("a token is allowed");
                for (t, l) in ascii.iter().map(|&t| (t, logits[t as usize])) {
                    assert!(l.is_finite(), "token {t} is not allowed inside reasoning");
                }
                assert!(!logits[eos as usize].is_finite(), "the output may not end inside reasoning");
                guide.commit(id).expect("reasoning is free");
            }
            // `</think>` ends it; then the blank line, then only the choices.
            let mut ids = tok.encode(REASONING_END, false).expect("encodes");
            for &id in &ids {
                let mut logits = vec![0.0f32; 300];
                guide.restrict(&mut logits).expect("a token is allowed");
                assert!(logits[id as usize].is_finite());
                guide.commit(id).expect("commit");
            }
            let mut state = u64::from(seed) * 7 + 1;
            loop {
                let mut logits: Vec<f32> = (0..300)
                    .map(|_| {
                        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                        (state >> 40) as f32
                    })
                    .collect();
                guide.restrict(&mut logits).expect("a token is allowed");
                let id = moe_model::sampling::argmax(&logits);
                if id == eos {
                    break;
                }
                ids.push(id);
                guide.commit(id).expect("commit");
                assert!(ids.len() < 40, "no end");
            }
            let text = tok.decode(&ids, false).expect("decodes");
            assert!(text == "</think>\n\nA" || text == "</think>\n\nB", "{text:?}");
        }
    }
}
