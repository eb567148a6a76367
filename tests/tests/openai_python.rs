//! The official OpenAI Python client (`openai` on PyPI) against a live router: models, completions and chat,
//! streamed and not, logprobs, n, and the errors it maps to its exception types.
//!
//! `.ci/run` installs the client in a virtual environment and points `MOE_PYTHON` at it. Elsewhere the test runs when
//! `python3` can import `openai`, and says why it skips when not; under CI (`CI` set) a missing client fails it.

use std::process::Command;

use moe_e2e::{fixture, RouterProcess};

#[test]
fn the_openai_python_client_works_unchanged() {
    let Some(python) = moe_e2e::openai_python() else { return };
    let router = RouterProcess::start(&fixture("qwen35"), &["--api-key", "sk-test"]).expect("router starts");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_client.py");
    let out = Command::new(&python).args([script, router.url(), "sk-test", "qwen35"]).output().expect("python runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}\nrouter log:\n{}", router.log_text());
    eprintln!("{stdout}");
}
