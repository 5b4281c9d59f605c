//! GGUF (llama.cpp) checkpoints: dequantised to trainable dense weights.
//!
//! GGUF stores a Llama as `token_embd`, `blk.N.attn_{q,k,v,output}`, `blk.N.ffn_{gate,up,down}`,
//! `blk.N.{attn,ffn}_norm`, `output_norm`, `output` (absent when tied), with the config in
//! `{arch}.*` metadata keys. llama.cpp's converter permutes the rows of Llama's `attn_q` and
//! `attn_k` (for its interleaved RoPE); [`unpermute_rows`] undoes that so the weights work with
//! Hugging Face's rotate-half RoPE used here. Qwen2 GGUFs are not permuted.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use super::config::{LlamaConfig, TokenIds};
use super::model::Llama;
use crate::{Error, Result};

/// An opened GGUF file: its header (metadata and tensor table) and a reader for tensor data.
pub struct GgufFile {
    path: std::path::PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .field("metadata", &self.content.metadata.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens `path` and reads its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::File {
            path: path.to_path_buf(),
            reason: format!("cannot open: {e}"),
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| Error::File {
            path: path.to_path_buf(),
            reason: format!("not a readable GGUF file: {e}"),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    /// The parsed header (metadata and tensor infos).
    pub fn content(&self) -> &Content {
        &self.content
    }

    fn err(&self, reason: String) -> Error {
        Error::File {
            path: self.path.clone(),
            reason,
        }
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_u64(&self, key: &str) -> Result<Option<u64>> {
        self.meta(key)
            .map(|v| value_u64(v).ok_or_else(|| self.err(format!("`{key}` is not an integer"))))
            .transpose()
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        self.meta(key)
            .map(|v| match v {
                Value::F32(x) => Ok(*x as f64),
                Value::F64(x) => Ok(*x),
                other => value_u64(other)
                    .map(|x| x as f64)
                    .ok_or_else(|| self.err(format!("`{key}` is not a number"))),
            })
            .transpose()
    }

    fn required_u64(&self, key: &str) -> Result<u64> {
        self.meta_u64(key)?
            .ok_or_else(|| self.err(format!("missing metadata `{key}`")))
    }

    /// The model config described by the `general.architecture` and `{arch}.*` metadata.
    ///
    /// Supports `llama` and `qwen2`; others are [`Error::UnsupportedModel`], as are RoPE
    /// scaling and partial rotary embeddings.
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = match self.meta("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(self.err("missing metadata `general.architecture`".into())),
        };
        if arch != "llama" && arch != "qwen2" {
            return Err(Error::UnsupportedModel(format!(
                "GGUF architecture `{arch}` (supported: llama, qwen2)"
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        if let Some(Value::String(s)) = self.meta(&key("rope.scaling.type")) {
            if s != "none" {
                return Err(Error::UnsupportedModel(format!("RoPE scaling `{s}`")));
            }
        }
        let heads = self.required_u64(&key("attention.head_count"))? as usize;
        let kv_heads = self
            .meta_u64(&key("attention.head_count_kv"))?
            .map_or(heads, |v| v as usize);
        let hidden = self.required_u64(&key("embedding_length"))? as usize;
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| self.err("missing tensor `token_embd.weight`".into()))?;
        let vocab = embd.shape.dims().first().copied().unwrap_or(0);
        let head_dim = self
            .meta_u64(&key("attention.key_length"))?
            .map(|v| v as usize);
        let hd = head_dim.unwrap_or(hidden / heads.max(1));
        if let Some(rot) = self.meta_u64(&key("rope.dimension_count"))? {
            if rot as usize != hd {
                return Err(Error::UnsupportedModel(format!(
                    "partial rotary embedding ({rot} of {hd} head dims)"
                )));
            }
        }
        let has_bias = self.content.tensor_infos.contains_key("blk.0.attn_q.bias");
        let eos = self.meta_u64("tokenizer.ggml.eos_token_id")?;
        let config = LlamaConfig {
            model_type: arch.clone(),
            hidden_size: hidden,
            intermediate_size: self.required_u64(&key("feed_forward_length"))? as usize,
            num_hidden_layers: self.required_u64(&key("block_count"))? as usize,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            head_dim: head_dim.filter(|&d| d != hidden / heads.max(1)),
            vocab_size: vocab,
            rms_norm_eps: self
                .meta_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-6),
            rope_theta: self.meta_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            max_position_embeddings: self
                .meta_u64(&key("context_length"))?
                .map_or(2048, |v| v as usize),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: Some(has_bias),
            hidden_act: "silu".into(),
            bos_token_id: self
                .meta_u64("tokenizer.ggml.bos_token_id")?
                .map(|v| v as u32),
            eos_token_id: eos.map(|v| TokenIds::One(v as u32)),
            pad_token_id: self
                .meta_u64("tokenizer.ggml.padding_token_id")?
                .map(|v| v as u32),
            rope_scaling: None,
            sliding_window: None,
            use_sliding_window: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// Every tensor dequantised to `f32` on the CPU, renamed to Hugging Face names, with
    /// Llama's `attn_q` / `attn_k` rows un-permuted.
    pub fn hf_tensors(&mut self, config: &LlamaConfig) -> Result<HashMap<String, Tensor>> {
        let permuted = config.model_type == "llama";
        let mut names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        names.sort();
        let mut out = HashMap::with_capacity(names.len());
        for name in names {
            let q = self
                .content
                .tensor(&mut self.reader, &name, &Device::Cpu)
                .map_err(|e| self.err(format!("cannot read tensor `{name}`: {e}")))?;
            let mut t = q
                .dequantize(&Device::Cpu)
                .map_err(|e| self.err(format!("cannot dequantize `{name}`: {e}")))?;
            let hf = hf_name(&name);
            if permuted {
                if hf.contains("self_attn.q_proj.") {
                    t = unpermute_rows(&t, config.num_attention_heads)?;
                } else if hf.contains("self_attn.k_proj.") {
                    t = unpermute_rows(&t, config.num_kv_heads())?;
                }
            }
            out.insert(hf, t);
        }
        Ok(out)
    }
}

impl Llama {
    /// Loads a GGUF checkpoint (any quantisation candle reads) as a dense trainable model in
    /// `dtype` on `device`. See the [module docs](self) for the name mapping.
    pub fn from_gguf(path: impl AsRef<Path>, device: &Device, dtype: DType) -> Result<Self> {
        let mut file = GgufFile::open(path.as_ref())?;
        let config = file.config()?;
        let tensors = file.hf_tensors(&config)?;
        Self::from_tensors(config, tensors, device, dtype, path.as_ref())
    }
}

/// Maps a GGUF tensor name to its Hugging Face name; unknown names are returned unchanged
/// (and later reported as unexpected).
pub fn hf_name(gguf: &str) -> String {
    match gguf {
        "token_embd.weight" => return "model.embed_tokens.weight".into(),
        "output_norm.weight" => return "model.norm.weight".into(),
        "output.weight" => return "lm_head.weight".into(),
        _ => {}
    }
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return gguf.into();
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return gguf.into();
    };
    let Some((part, suffix)) = rest.split_once('.') else {
        return gguf.into();
    };
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return gguf.into(),
    };
    format!("model.layers.{layer}.{hf}.{suffix}")
}

/// Undoes llama.cpp's row permutation of a q/k projection (weight `(out, in)` or bias
/// `(out,)`): view the rows as `(heads, out/heads/2, 2)`, swap the last two of those axes.
///
/// llama.cpp stores row `h·d + 2i + j` (head `h`, pair `i`, `j ∈ {0,1}`) from Hugging Face row
/// `h·d + j·d/2 + i`, where `d = out / heads`.
pub fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let out = dims.first().copied().unwrap_or(0);
    if heads == 0 || out == 0 || out % (2 * heads) != 0 {
        return Err(Error::ShapeMismatch {
            what: "q/k projection rows (must split into heads × pairs)",
            expected: vec![2 * heads],
            got: dims,
        });
    }
    let half = out / heads / 2;
    let rest: usize = dims.iter().skip(1).product();
    let y = t
        .reshape((heads, half, 2, rest))?
        .transpose(1, 2)?
        .reshape(dims.as_slice())?;
    Ok(y)
}

fn value_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}
