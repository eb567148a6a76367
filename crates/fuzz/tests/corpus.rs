//! Every committed input of every target, replayed: the seeds and what the fuzzer kept (`fuzz/corpus/<target>/`),
//! and each input that once broke a target (`fuzz/regressions/<target>/`, named for what it broke).

use std::path::Path;

fn inputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            let bytes = std::fs::read(e.path()).unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_target_keeps_its_properties_on_the_committed_inputs() {
    let root = moe_fuzz::fuzz_dir();
    for &(target, run) in moe_fuzz::TARGETS {
        let corpus = inputs(&root.join("corpus").join(target));
        assert!(!corpus.is_empty(), "target {target} has no corpus in {}", root.display());
        let regressions = inputs(&root.join("regressions").join(target));
        for (name, bytes) in corpus.iter().chain(&regressions) {
            if let Err(panic) = std::panic::catch_unwind(|| run(bytes)) {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("target {target}, input {name}: {why}");
            }
        }
        eprintln!("{target}: {} corpus inputs, {} regressions", corpus.len(), regressions.len());
    }
}

#[test]
fn every_target_has_a_fuzz_binary() {
    let root = moe_fuzz::fuzz_dir();
    for &(target, _) in moe_fuzz::TARGETS {
        let path = root.join("fuzz_targets").join(format!("{target}.rs"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(text.contains(&format!("moe_fuzz::{target}(")), "{} does not run moe_fuzz::{target}", path.display());
    }
}
