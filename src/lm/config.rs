//! [`LlamaConfig`]: the architecture hyper-parameters, read from and written to Hugging Face's
//! `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::bail_config;
use crate::{Error, Result};

/// Hyper-parameters of a Llama-family decoder (Llama, SmolLM, Qwen2-style with q/k/v bias).
///
/// Field names are those of Hugging Face's `config.json`, so a checkpoint's file deserialises
/// directly ([`LlamaConfig::from_json_file`]) and [`LlamaConfig::to_json_file`] writes one that
/// `transformers` reads back. Unknown JSON fields are ignored. [`Default`] is the shape of
/// SmolLM2-135M.
///
/// The architecture (per block, pre-norm, as in `transformers`' `LlamaDecoderLayer`):
///
/// ```text
/// h = x + o_proj(attn(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1))),  n1 = rms_norm(x)
/// y = h + down_proj(silu(gate_proj(n2)) * up_proj(n2)),                 n2 = rms_norm(h)
/// ```
///
/// with grouped-query attention (`num_key_value_heads` shared K/V heads) and rotate-half RoPE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `"llama"`, `"qwen2"` or `"mistral"` (without sliding window). Others are rejected.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU feed-forward layer.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); `None` means one per query head.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; `None` means `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Vocabulary size (rows of the embedding and of `lm_head`).
    pub vocab_size: usize,
    /// ε inside RMSNorm: `x / sqrt(mean(x²) + ε) · w`.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base θ: frequency i is `θ^(-2i / head_dim)`.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Longest context the checkpoint was trained for (informational; not enforced).
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Whether `lm_head` reuses the token embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry a bias (`None`: true for `qwen2`, false otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Activation of the gated MLP; only `"silu"` is supported.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token(s): HF writes one id or a list.
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Padding token, if the checkpoint names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    /// RoPE scaling (Llama 3.1 "llama3", YaRN, ...). Not supported: must be absent or null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// Sliding-window attention (Mistral, Qwen2). Not supported: must be absent, null, or
    /// disabled with `use_sliding_window: false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2's switch for [`sliding_window`](Self::sliding_window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
}

/// One token id or several (HF's `eos_token_id` may be either).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a vector.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    2048
}
fn default_hidden_act() -> String {
    "silu".into()
}

impl Default for LlamaConfig {
    /// SmolLM2-135M(-Instruct): 30 blocks, width 576, 9 query / 3 KV heads, vocab 49152.
    fn default() -> Self {
        Self {
            model_type: "llama".into(),
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: Some(3),
            head_dim: None,
            vocab_size: 49152,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            attention_bias: None,
            hidden_act: "silu".into(),
            bos_token_id: Some(1),
            eos_token_id: Some(TokenIds::One(2)),
            pad_token_id: None,
            rope_scaling: None,
            sliding_window: None,
            use_sliding_window: None,
        }
    }
}

impl LlamaConfig {
    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::File {
            path: path.to_path_buf(),
            reason: format!("cannot read config: {e}"),
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|e| Error::File {
            path: path.to_path_buf(),
            reason: format!("not a valid config.json: {e}"),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Writes `config.json` (with `architectures` and `torch_dtype = "float32"` for
    /// `transformers`), atomically.
    pub fn to_json_file(&self, path: &Path) -> Result<()> {
        self.write_json(path, candle_core::DType::F32)
    }

    pub(crate) fn write_json(&self, path: &Path, dtype: candle_core::DType) -> Result<()> {
        let mut value = serde_json::to_value(self)?;
        if let serde_json::Value::Object(map) = &mut value {
            let arch = match self.model_type.as_str() {
                "qwen2" => "Qwen2ForCausalLM",
                "mistral" => "MistralForCausalLM",
                _ => "LlamaForCausalLM",
            };
            let torch_dtype = match dtype {
                candle_core::DType::F64 => "float64",
                candle_core::DType::BF16 => "bfloat16",
                candle_core::DType::F16 => "float16",
                _ => "float32",
            };
            map.insert("architectures".into(), serde_json::json!([arch]));
            map.insert("torch_dtype".into(), serde_json::json!(torch_dtype));
        }
        let text = serde_json::to_string_pretty(&value)?;
        super::io::write_atomic(path, text.as_bytes())
    }

    /// Checks that the numbers describe a model this crate can build, and that the checkpoint
    /// uses no feature it does not implement ([`Error::UnsupportedModel`]).
    pub fn validate(&self) -> Result<()> {
        match self.model_type.as_str() {
            "llama" | "qwen2" | "mistral" => {}
            other => {
                return Err(Error::UnsupportedModel(format!(
                    "model_type `{other}` (supported: llama, qwen2, mistral)"
                )))
            }
        }
        if self.hidden_act != "silu" {
            return Err(Error::UnsupportedModel(format!(
                "hidden_act `{}` (only silu)",
                self.hidden_act
            )));
        }
        if let Some(scaling) = &self.rope_scaling {
            if !scaling.is_null() {
                return Err(Error::UnsupportedModel(format!("rope_scaling {scaling}")));
            }
        }
        if self.sliding_window.is_some() && self.use_sliding_window != Some(false) {
            return Err(Error::UnsupportedModel(
                "sliding-window attention (set use_sliding_window: false or remove sliding_window)"
                    .into(),
            ));
        }
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                bail_config!(field, "must be positive");
            }
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            bail_config!(
                "num_key_value_heads",
                "must divide num_attention_heads = {}, got {kv}",
                self.num_attention_heads
            );
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail_config!(
                "hidden_size",
                "must be a multiple of num_attention_heads = {}, got {}",
                self.num_attention_heads,
                self.hidden_size
            );
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            bail_config!("head_dim", "must be even and positive for RoPE, got {hd}");
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            bail_config!(
                "rms_norm_eps",
                "must be positive, got {}",
                self.rms_norm_eps
            );
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            bail_config!("rope_theta", "must be positive, got {}", self.rope_theta);
        }
        for id in self.eos_token_ids().into_iter().chain(self.bos_token_id) {
            if id as usize >= self.vocab_size {
                bail_config!(
                    "eos_token_id",
                    "special token {id} is outside the vocabulary ({})",
                    self.vocab_size
                );
            }
        }
        Ok(())
    }

    /// Number of key/value heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether the q/k/v projections have a bias.
    pub fn has_qkv_bias(&self) -> bool {
        self.attention_bias
            .unwrap_or(self.model_type.as_str() == "qwen2")
    }

    /// The end-of-sequence ids (possibly empty).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        let (h, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim();
        let kv = self.num_kv_heads() * self.head_dim();
        let bias = if self.has_qkv_bias() { q + 2 * kv } else { 0 };
        let block = 2 * h + h * q + 2 * h * kv + q * h + bias + 3 * h * f;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * block + h + head
    }
}
