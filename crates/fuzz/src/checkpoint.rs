//! A checkpoint's files: a safetensors header and data, the shard index, and `config.json` against real weights.

use std::path::Path;
use std::sync::OnceLock;

use moe_model::{Checkpoint, Model, ModelConfig, Residency};

use crate::{fixture, fixture_dir};

/// A folder of its own for the files a target writes, kept for the process (targets run one input at a time).
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| fixture("scratch folder", tempfile::tempdir())).path()
}

/// Opens a checkpoint and reads every tensor it lists at the shape it declares, resident and mapped.
fn read_all(dir: &Path) {
    for residency in [Residency::Resident, Residency::Mapped] {
        let Ok(ckpt) = Checkpoint::open_with(dir, residency) else { return };
        for name in ckpt.tensor_names() {
            let Some(shape) = ckpt.shape(name).map(<[usize]>::to_vec) else {
                panic!("{name} is listed without a shape")
            };
            let _ = ckpt.vector(name, &shape);
            if shape.len() >= 2 {
                let _ = ckpt.matrix(name, &shape);
            }
        }
    }
}

/// One `model.safetensors`: its header and data, read as the loader reads them.
pub fn safetensors(data: &[u8]) {
    let dir = scratch().join("safetensors");
    let _ = std::fs::create_dir_all(&dir);
    if std::fs::write(dir.join("model.safetensors"), data).is_ok() {
        read_all(&dir);
    }
}

/// `model.safetensors.index.json`, over the fixture's real shard files.
pub fn shard_index(data: &[u8]) {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = scratch().join("index");
        fixture("index folder", std::fs::create_dir_all(&dir));
        let shards = fixture("fixture folder", std::fs::read_dir(fixture_dir()));
        for entry in shards.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().ends_with(".safetensors") {
                fixture("shard copy", std::fs::copy(entry.path(), dir.join(&name)));
            }
        }
        dir
    });
    if std::fs::write(dir.join("model.safetensors.index.json"), data).is_ok() {
        read_all(dir);
    }
}

/// `config.json`, then the model built from it over the fixture's real weights: a config that passes its checks
/// must not break the loader's shape arithmetic.
pub fn model_config(data: &[u8]) {
    static CKPT: OnceLock<Checkpoint> = OnceLock::new();
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = ModelConfig::from_json_str(text, Path::new("config.json")) else { return };
    for layer in 0..config.num_hidden_layers.min(1 << 16) {
        let _ = config.is_moe_layer(layer);
    }
    let ckpt = CKPT.get_or_init(|| fixture("checkpoint", Checkpoint::open_with(&fixture_dir(), Residency::Mapped)));
    let _ = Model::load(ckpt, config);
}
