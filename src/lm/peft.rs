//! LoRA adapters on disk in PEFT's format, tied to their base model by a SHA-256.
//!
//! A directory written by [`Llama::save_adapter`] holds what PEFT's
//! `PeftModel.save_pretrained` writes for a LoRA adapter, so `PeftModel.from_pretrained(base,
//! dir)` loads it, and [`Llama::with_adapter`] reads PEFT's own output:
//!
//! - `adapter_config.json`: `peft_type: "LORA"`, `task_type: "CAUSAL_LM"`, `r`,
//!   `lora_alpha`, `lora_dropout`, `target_modules`, `bias: "none"`,
//!   `base_model_name_or_path` (the file or directory the base was loaded from), and PEFT's
//!   other defaults;
//! - `adapter_model.safetensors`: `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.
//!   lora_A.weight` `(r, in)` and `...lora_B.weight` `(out, r)`. Its safetensors metadata
//!   holds `format: "pt"` (as PEFT writes) and `pgrpo.base_sha256`, the
//!   [base fingerprint](Llama::base_sha256) of the weights the adapter was trained on.
//!
//! Loading onto a base whose fingerprint differs is an [`Error::AdapterBase`]. Adapters
//! without the fingerprint (made by PEFT) load with a warning. PEFT features this crate does
//! not implement (DoRA, rsLoRA, per-layer ranks, biases, `modules_to_save`, ...) are an
//! [`Error::UnsupportedModel`] naming the field.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Storage, Tensor};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::io::write_atomic_with;
use super::lora::{LoraConfig, LoraTarget};
use super::model::Llama;
use crate::{Error, Result};

/// Name of the adapter config file.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// Name of the adapter weights file.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Prefix PEFT puts before a model's own tensor names.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// Safetensors metadata key of the base fingerprint.
pub const BASE_SHA256_KEY: &str = "pgrpo.base_sha256";

impl Llama {
    /// The SHA-256 (hex) of the base weights: for every weight of
    /// [`named_vars`](Self::named_vars), in that order, its name's length (`u64` LE), name,
    /// rank and dims (`u64` LE) and values as little-endian `f32`. Independent of the file
    /// format and of the load dtype up to `f32` rounding (a GGUF and the `save_hf_dir` copy
    /// of its dequantised weights hash the same); adapters are not included.
    pub fn base_sha256(&self) -> Result<String> {
        let mut h = Sha256::new();
        let mut buf = Vec::with_capacity(1 << 16);
        for (name, var) in self.named_vars() {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            let t = var.as_tensor();
            h.update((t.rank() as u64).to_le_bytes());
            for &d in t.dims() {
                h.update((d as u64).to_le_bytes());
            }
            let mut feed = |vals: &[f32]| {
                for chunk in vals.chunks(1 << 14) {
                    buf.clear();
                    for v in chunk {
                        buf.extend_from_slice(&v.to_le_bytes());
                    }
                    h.update(&buf);
                }
            };
            let direct = t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
            if direct {
                let (s, l) = t.storage_and_layout();
                if let Storage::Cpu(c) = &*s {
                    feed(crate::ops::cpu_f32(c, l, "base_sha256")?);
                    continue;
                }
            }
            let v = t
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            feed(&v);
        }
        Ok(hex(&h.finalize()))
    }

    /// Writes the adapters in PEFT's format to `dir` (created if needed): see the
    /// [module docs](self). Each file is written atomically.
    ///
    /// # Errors
    /// [`Error::UnsupportedModel`] when the model has no adapters; [`Error::File`] when a
    /// file cannot be written.
    pub fn save_adapter(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let config = self
            .lora_config()
            .ok_or_else(|| Error::UnsupportedModel("this model has no LoRA adapters".into()))?;
        std::fs::create_dir_all(dir).map_err(|e| Error::File {
            path: dir.to_path_buf(),
            reason: format!("cannot create directory: {e}"),
        })?;
        let sha = self.base_sha256()?;
        let tensors: Vec<(String, Tensor)> = self
            .named_adapter_vars()
            .into_iter()
            .map(|(n, v)| {
                Ok((
                    format!("{PEFT_PREFIX}{n}"),
                    v.as_tensor().to_dtype(DType::F32)?,
                ))
            })
            .collect::<Result<_>>()?;
        let meta = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            (BASE_SHA256_KEY.to_string(), sha),
        ]);
        let weights = dir.join(ADAPTER_WEIGHTS_FILE);
        write_atomic_with(&weights, |tmp| {
            safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n, t)), Some(meta), tmp)
                .map_err(|e| Error::File {
                    path: weights.clone(),
                    reason: format!("cannot write adapter weights: {e}"),
                })
        })?;
        let targets: Vec<&str> = config.target_modules.iter().map(|t| t.name()).collect();
        let base = self
            .source
            .as_ref()
            .map(|p| Value::String(p.display().to_string()))
            .unwrap_or(Value::Null);
        let cfg = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "revision": null,
            "inference_mode": true,
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        });
        let text = serde_json::to_string_pretty(&cfg)?;
        super::io::write_atomic(&dir.join(ADAPTER_CONFIG_FILE), text.as_bytes())
    }

    /// This model (the base) with the adapters of a PEFT directory installed: the LoRA
    /// model they were saved from. The base is frozen as by [`with_lora`](Self::with_lora);
    /// the dropout stream starts from seed 0.
    ///
    /// # Errors
    /// [`Error::AdapterBase`] when the adapter records a base fingerprint that differs from
    /// this model's ([`base_sha256`](Self::base_sha256)); [`Error::File`] /
    /// [`Error::TensorShape`] for a missing, malformed, missing-tensor, extra-tensor or
    /// wrong-shape file; [`Error::UnsupportedModel`] for a PEFT feature this crate does not
    /// implement or a model that already has adapters.
    pub fn with_adapter(self, dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg_path = dir.join(ADAPTER_CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::File {
            path: cfg_path.clone(),
            reason: format!("cannot read: {e}"),
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| Error::File {
            path: cfg_path.clone(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let config = lora_config_from_peft(&json, &cfg_path)?;
        let path = dir.join(ADAPTER_WEIGHTS_FILE);
        let bytes = std::fs::read(&path).map_err(|e| Error::File {
            path: path.clone(),
            reason: format!("cannot read: {e}"),
        })?;
        let bad = |e: safetensors::SafeTensorError| Error::File {
            path: path.clone(),
            reason: format!("not a valid safetensors file: {e}"),
        };
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(bad)?;
        let recorded = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(BASE_SHA256_KEY).cloned());
        match recorded {
            Some(expected) => {
                let found = self.base_sha256()?;
                if found != expected {
                    return Err(Error::AdapterBase {
                        path,
                        expected,
                        found,
                    });
                }
            }
            None => tracing::warn!(
                path = %path.display(),
                "adapter records no base fingerprint ({BASE_SHA256_KEY}); cannot check that it belongs to this base model"
            ),
        }
        let mut tensors =
            candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
                Error::File {
                    path: path.clone(),
                    reason: format!("cannot read tensors: {e}"),
                }
            })?;
        let mut factors = Vec::new();
        for (i, block) in self.layers.iter().enumerate() {
            for (t, lin) in LoraTarget::ALL.into_iter().zip(block.projections()) {
                if !config.targets(t) {
                    continue;
                }
                let (out, inp) = lin.weight.dims2()?;
                let p = format!("{PEFT_PREFIX}model.layers.{i}.{}", t.path());
                let mut take = |suffix: &str, shape: [usize; 2]| -> Result<Tensor> {
                    let name = format!("{p}.{suffix}");
                    let t = tensors.remove(&name).ok_or_else(|| Error::File {
                        path: path.clone(),
                        reason: format!("missing tensor `{name}`"),
                    })?;
                    if t.dims() != shape {
                        return Err(Error::TensorShape {
                            path: path.clone(),
                            name,
                            expected: shape.to_vec(),
                            got: t.dims().to_vec(),
                        });
                    }
                    Ok(t)
                };
                let a = take("lora_A.weight", [config.r, inp])?;
                let b = take("lora_B.weight", [out, config.r])?;
                factors.push((a, b));
            }
        }
        if let Some(name) = tensors.keys().min() {
            return Err(Error::File {
                path,
                reason: format!(
                    "unexpected tensor `{name}` ({} unused in all); does adapter_config.json match?",
                    tensors.len()
                ),
            });
        }
        self.install_adapters(config, factors)
    }
}

/// The [`LoraConfig`] of a PEFT `adapter_config.json`, rejecting what this crate does not
/// implement.
fn lora_config_from_peft(json: &Value, path: &Path) -> Result<LoraConfig> {
    let err = |reason: String| Error::File {
        path: path.to_path_buf(),
        reason,
    };
    let unsupported = |what: String| Error::UnsupportedModel(format!("{}: {what}", path.display()));
    let peft_type = json.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if !peft_type.eq_ignore_ascii_case("lora") {
        return Err(unsupported(format!("peft_type `{peft_type}` (only LORA)")));
    }
    let r = json
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| err("`r` missing or not a positive integer".into()))? as usize;
    let alpha = json
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| err("`lora_alpha` missing or not a number".into()))?;
    let dropout = json
        .get("lora_dropout")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let target_modules = match json.get("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => LoraTarget::ALL.to_vec(),
        Some(Value::String(s)) => {
            return Err(unsupported(format!(
                "target_modules given as a regular expression `{s}` (use a list)"
            )))
        }
        Some(Value::Array(names)) => {
            let mut out = Vec::new();
            for n in names {
                let name = n.as_str().unwrap_or("");
                let t = LoraTarget::from_name(name).ok_or_else(|| {
                    unsupported(format!(
                        "target module `{name}` (a Llama block has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                    ))
                })?;
                out.push(t);
            }
            // PEFT stores a set: the order in the file carries no meaning.
            out.sort();
            out
        }
        _ => return Err(err("`target_modules` missing".into())),
    };
    let is_true = |k: &str| json.get(k).and_then(Value::as_bool) == Some(true);
    let non_empty = |k: &str| match json.get(k) {
        None | Some(Value::Null) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    for flag in [
        "use_dora",
        "use_rslora",
        "fan_in_fan_out",
        "lora_bias",
        "use_qalora",
    ] {
        if is_true(flag) {
            return Err(unsupported(format!("`{flag}: true`")));
        }
    }
    for field in [
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "modules_to_save",
        "layer_replication",
        "trainable_token_indices",
    ] {
        if non_empty(field) {
            return Err(unsupported(format!("`{field}` is set")));
        }
    }
    match json.get("bias").and_then(Value::as_str) {
        None | Some("none") => {}
        Some(b) => return Err(unsupported(format!("`bias: {b}` (only none)"))),
    }
    let config = LoraConfig {
        r,
        alpha,
        dropout,
        target_modules,
    };
    config.validate()?;
    Ok(config)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
