//! Broken model directories give errors that name the file and the tensor, never a panic; other dtypes load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use moe_model::{LoadedModel, LogitsFor, ModelError, Segment};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// Copies a fixture model into a fresh temporary directory.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixture(name)).expect("fixture dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
    }
    dir
}

/// Rewrites one safetensors file through `edit`, which may change, add or remove (name → (dtype, shape, bytes)).
fn rewrite(path: &Path, edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) {
    let bytes = std::fs::read(path).expect("read");
    let st = SafeTensors::deserialize(&bytes).expect("valid fixture");
    let mut tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, (view.dtype(), view.shape().to_vec(), view.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).expect("consistent view")))
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write");
}

fn load_err(dir: &Path) -> ModelError {
    match LoadedModel::load(dir) {
        Ok(_) => panic!("a broken model in {} loaded", dir.display()),
        Err(e) => e,
    }
}

fn assert_mentions(err: &ModelError, parts: &[&str]) {
    let text = err.to_string();
    for p in parts {
        assert!(text.contains(p), "error {text:?} should mention {p:?}");
    }
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture("qwen3next");
    rewrite(&dir.path().join("model.safetensors"), |t| {
        t.remove("model.layers.0.linear_attn.A_log");
    });
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err:?}");
    assert_mentions(&err, &["model.layers.0.linear_attn.A_log"]);
}

#[test]
fn misshapen_tensor_names_file_and_tensor() {
    let dir = copy_fixture("qwen3next");
    rewrite(&dir.path().join("model.safetensors"), |t| {
        let e = t.get_mut("model.layers.3.self_attn.q_proj.weight").expect("present");
        e.1 = vec![e.1[1], e.1[0]];
    });
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{err:?}");
    assert_mentions(&err, &["model.safetensors", "model.layers.3.self_attn.q_proj.weight", "[64, 256]", "[256, 64]"]);
}

#[test]
fn unsupported_dtype_names_file_and_tensor() {
    let dir = copy_fixture("qwen3next");
    rewrite(&dir.path().join("model.safetensors"), |t| {
        let e = t.get_mut("model.norm.weight").expect("present");
        let n: usize = e.1.iter().product();
        *e = (Dtype::I32, e.1.clone(), vec![0u8; n * 4]);
    });
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::UnsupportedDtype { .. }), "{err:?}");
    assert_mentions(&err, &["model.safetensors", "model.norm.weight", "I32"]);
}

#[test]
fn truncated_file_is_named() {
    let dir = copy_fixture("qwen3next");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() - 100]).expect("truncate");
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::Safetensors { .. }), "{err:?}");
    assert_mentions(&err, &["model.safetensors"]);
}

#[test]
fn corrupt_header_is_named() {
    let dir = copy_fixture("qwen3next");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[8..24].copy_from_slice(b"{not json at all");
    std::fs::write(&path, &bytes).expect("write");
    assert_mentions(&load_err(dir.path()), &["model.safetensors"]);
    // A header length beyond the file.
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &bytes).expect("write");
    assert_mentions(&load_err(dir.path()), &["model.safetensors"]);
    // A file shorter than the length prefix.
    std::fs::write(&path, b"abc").expect("write");
    assert_mentions(&load_err(dir.path()), &["model.safetensors"]);
}

#[test]
fn corrupt_or_inconsistent_index_is_named() {
    let dir = copy_fixture("qwen35");
    let index = dir.path().join("model.safetensors.index.json");
    let original = std::fs::read_to_string(&index).expect("read");
    std::fs::write(&index, "{\"weight_map\": [").expect("write");
    assert_mentions(&load_err(dir.path()), &["model.safetensors.index.json"]);

    // The index names a shard that is not there.
    std::fs::write(&index, original.replace("model-00002-of-00003", "model-00009-of-00003")).expect("write");
    assert_mentions(&load_err(dir.path()), &["model-00009-of-00003.safetensors"]);

    // The index places a tensor in a shard that does not hold it.
    let mut v: serde_json::Value = serde_json::from_str(&original).expect("json");
    let map = v["weight_map"].as_object_mut().expect("map");
    let (name, file) = map.iter().next().map(|(k, f)| (k.clone(), f.as_str().unwrap_or("").to_owned())).expect("one");
    let other =
        if file.contains("00001") { "model-00002-of-00003.safetensors" } else { "model-00001-of-00003.safetensors" };
    map.insert(name.clone(), serde_json::json!(other));
    std::fs::write(&index, v.to_string()).expect("write");
    assert_mentions(&load_err(dir.path()), &["model.safetensors.index.json", &name]);
}

#[test]
fn unknown_model_type_and_bad_config_are_named() {
    let dir = copy_fixture("qwen3next");
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).expect("read");
    std::fs::write(&cfg, text.replace("\"qwen3_next\"", "\"llama\"")).expect("write");
    let err = load_err(dir.path());
    assert!(matches!(err, ModelError::UnknownModelType { .. }), "{err:?}");
    assert_mentions(&err, &["config.json", "llama"]);
    std::fs::write(&cfg, "{").expect("write");
    assert_mentions(&load_err(dir.path()), &["config.json"]);
}

#[test]
fn missing_files_are_named() {
    let dir = copy_fixture("qwen3next");
    std::fs::remove_file(dir.path().join("tokenizer.json")).expect("rm");
    assert_mentions(&load_err(dir.path()), &["tokenizer.json"]);
    std::fs::remove_file(dir.path().join("model.safetensors")).expect("rm");
    assert_mentions(&load_err(dir.path()), &["model.safetensors"]);
}

/// F32 and F16 checkpoints load too: F32 holding bf16-exact values gives the very same logits.
#[test]
fn f32_and_f16_tensors_load() {
    let base = LoadedModel::load(&fixture("qwen3next")).expect("fixture loads");
    let prompt = [5u32, 17, 99, 3, 250];
    let run = |lm: &LoadedModel| {
        let mut st = lm.model.new_state();
        lm.model
            .forward(&mut [Segment { state: &mut st, tokens: &prompt, logits: LogitsFor::All }], &lm.experts)
            .expect("forward")
            .remove(0)
    };
    let want = run(&base);
    for (dtype, exact) in [(Dtype::F32, true), (Dtype::F16, false)] {
        let dir = copy_fixture("qwen3next");
        rewrite(&dir.path().join("model.safetensors"), |t| {
            for (_, (d, _, bytes)) in t.iter_mut() {
                assert_eq!(*d, Dtype::BF16);
                let vals = bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32());
                *bytes = match dtype {
                    Dtype::F32 => vals.flat_map(f32::to_le_bytes).collect(),
                    _ => vals.flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect(),
                };
                *d = dtype;
            }
        });
        let lm = LoadedModel::load(dir.path()).expect("converted checkpoint loads");
        let got = run(&lm);
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        if exact {
            assert_eq!(worst, 0.0, "{dtype:?}: bf16-exact values must give identical logits");
        } else {
            assert!(worst < 0.05, "{dtype:?}: logits moved by {worst}");
        }
    }
}

#[test]
fn a_tokenizer_with_ids_beyond_the_vocabulary_is_refused_at_load() {
    let dir = copy_fixture("qwen35");
    let path = dir.path().join("tokenizer.json");
    let mut t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    let added = t["added_tokens"].as_array_mut().expect("added tokens");
    added.push(serde_json::json!({"id": 300, "content": "<|beyond|>", "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": true}));
    std::fs::write(&path, t.to_string()).expect("write");
    let err = LoadedModel::load(dir.path()).expect_err("id 300 of a 300-token vocabulary").to_string();
    assert!(err.contains("token id 300 is beyond the model's vocabulary of 300"), "{err}");
}
