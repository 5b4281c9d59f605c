//! Hugging Face checkpoint directories: `config.json` + `model.safetensors` (or shards listed
//! in `model.safetensors.index.json`) + `tokenizer.json`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::config::LlamaConfig;
use super::io::write_atomic_with;
use super::model::Llama;
use crate::{Error, Result};

/// Name of the config file in a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// Name of the single-file weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the shard index of sharded weights.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of the tokenizer file.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

impl Llama {
    /// Loads `dir/config.json` and the safetensors weights (single file or sharded), converting
    /// them to `dtype` on `device`.
    ///
    /// Errors: [`Error::File`] for a missing/unreadable file or a missing/unexpected tensor,
    /// [`Error::TensorShape`] for a tensor whose shape contradicts the config,
    /// [`Error::UnsupportedModel`] for an architecture this crate does not implement.
    pub fn from_hf_dir(dir: impl AsRef<Path>, device: &Device, dtype: DType) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::File {
                path: dir.to_path_buf(),
                reason: "not a directory".into(),
            });
        }
        let config = LlamaConfig::from_json_file(&dir.join(CONFIG_FILE))?;
        let (tensors, source) = load_weights(dir)?;
        Self::from_tensors(config, tensors, device, dtype, &source)
    }

    /// Writes `dir/config.json`, `dir/generation_config.json` (BOS / EOS / pad ids) and
    /// `dir/model.safetensors` (in the model's dtype), creating `dir` if needed. Each file is
    /// written to a temporary name and renamed into place. A LoRA model writes its base
    /// weights only; save [`merged`](Self::merged) for the adapted model.
    pub fn save_hf_dir(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::File {
            path: dir.to_path_buf(),
            reason: format!("cannot create directory: {e}"),
        })?;
        let weights = dir.join(WEIGHTS_FILE);
        let tensors: HashMap<String, Tensor> = self.tensors();
        write_atomic_with(&weights, |tmp| {
            candle_core::safetensors::save(&tensors, tmp).map_err(|e| Error::File {
                path: weights.clone(),
                reason: format!("cannot write weights: {e}"),
            })
        })?;
        super::chat::write_generation_config(self.config(), dir)?;
        self.config()
            .write_json(&dir.join(CONFIG_FILE), self.dtype())
    }
}

/// Reads all weights of a checkpoint directory; also returns the path to name in errors.
fn load_weights(dir: &Path) -> Result<(HashMap<String, Tensor>, PathBuf)> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok((read_safetensors(&single)?, single));
    }
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if !index.is_file() {
        return Err(Error::File {
            path: single,
            reason: format!("missing (and no {WEIGHTS_INDEX_FILE} either)"),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::File {
        path: index.clone(),
        reason: format!("cannot read: {e}"),
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::File {
        path: index.clone(),
        reason: format!("not valid JSON: {e}"),
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::File {
            path: index.clone(),
            reason: "no `weight_map` object".into(),
        })?;
    let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    let mut tensors = HashMap::new();
    for shard in shards {
        tensors.extend(read_safetensors(&dir.join(shard))?);
    }
    Ok((tensors, index))
}

fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(Error::File {
            path: path.to_path_buf(),
            reason: "missing".into(),
        });
    }
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::File {
        path: path.to_path_buf(),
        reason: format!("cannot read safetensors: {e}"),
    })
}
