//! The fuzz targets: every parser that reads bytes from outside the process, driven as the server drives it, with
//! the properties its answer must keep. A target panics when a property breaks; a parser's own panic, hang or
//! runaway allocation is found the same way.
//!
//! `fuzz/` runs them coverage-guided (cargo-fuzz and libFuzzer, `fuzz/run` for bounded runs); this crate's tests
//! replay the committed corpus and every input that once broke a target (`fuzz/regressions/`), so a fix stays fixed
//! without a fuzzer installed.
//!
//! The targets read the small real checkpoint in `tests/fixtures/qwen35` (its tokenizer, template and weights).

use std::path::{Path, PathBuf};

mod checkpoint;
mod http;
mod placement;
mod text;
mod wire;

pub use checkpoint::{model_config, safetensors, shard_index};
pub use http::{chat, completions, tokenize};
pub use placement::placement;
pub use text::{chat_template, tokenizer_json};
pub use wire::forward;

/// A target's body: one input.
pub type Target = fn(&[u8]);

/// Every target by name: the names of `fuzz/fuzz_targets/*.rs` and of the corpus folders.
pub const TARGETS: &[(&str, Target)] = &[
    ("completions", completions),
    ("chat", chat),
    ("tokenize", tokenize),
    ("forward", forward),
    ("safetensors", safetensors),
    ("shard_index", shard_index),
    ("model_config", model_config),
    ("tokenizer_json", tokenizer_json),
    ("chat_template", chat_template),
    ("placement", placement),
];

/// The checkpoint the targets read.
pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen35")
}

/// The cargo-fuzz project: `corpus/<target>/` and `regressions/<target>/`.
pub fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// libFuzzer's harness aborts at any panic, even one that is caught. The tokenizers crate panics on some malformed
/// files, and moe-model catches that and reports an error, as the server must: those panics (raised in that crate's
/// sources) unwind here as they do in the server. Any other panic is a finding and aborts.
fn foreign_panics_unwind() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let finding = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.location().is_some_and(|l| l.file().contains("/tokenizers-")) {
                return;
            }
            finding(info);
        }));
    });
}

/// A fixture the targets cannot run without is a broken checkout, not a finding.
fn fixture<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("the fuzz fixture {what} ({}) does not load: {e}", fixture_dir().display()))
}
