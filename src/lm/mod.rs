//! A trainable Llama-family causal language model as a [`Policy`](crate::Policy).
//!
//! - [`config`]: [`LlamaConfig`], read from / written to Hugging Face `config.json`;
//! - [`model`]: [`Llama`], differentiable forward (and a detached fast path), padding-exact
//!   attention, [`KvCache`];
//! - [`hf`]: load / save HF checkpoint directories (safetensors, sharded or not);
//! - [`gguf`]: load llama.cpp GGUF files, dequantised to dense trainable weights;
//! - [`tokenizer`]: `tokenizer.json`, GGUF tokenizers, the ChatML prompt format;
//! - [`chat`]: special tokens and the model's own chat template ([`TokenizerConfig`]),
//!   `tokenizer_config.json` / `generation_config.json` for `transformers`;
//! - [`sampling`]: batched KV-cache sampling ([`SamplingConfig`]: temperature, top-k, top-p,
//!   min-p, repetition penalty), and what is scored;
//! - [`policy`]: [`LmPolicy`], the [`Policy`](crate::Policy) implementation (log-probs at the
//!   sampling temperature; the sampler's own log-probs; truncation and the generation budget);
//! - [`reward`]: [`TextReward`], a reward over decoded text;
//! - [`lora`]: LoRA adapters over a frozen base ([`LoraConfig`], [`Llama::with_lora`]);
//! - [`peft`]: adapters on disk in PEFT's format, tied to their base by a SHA-256.
//!
//! candle's stock `candle-transformers` models do not train (their fused kernels record no
//! backward); this module's training path uses only differentiable ops, and a test checks
//! that every weight receives a gradient.

pub mod chat;
pub mod config;
pub mod gguf;
pub mod hf;
mod io;
pub mod lora;
pub mod model;
pub mod peft;
pub mod policy;
pub mod reward;
pub mod sampling;
pub mod tokenizer;

pub use chat::{ChatMessage, TokenizerConfig};
pub use config::{LlamaConfig, TokenIds};
pub use gguf::GgufFile;
pub use lora::{LoraConfig, LoraTarget};
pub use model::{Grad, Kernels, KvCache, Llama};
pub use policy::LmPolicy;
pub use reward::TextReward;
pub use sampling::{sample_token, DecodePrecision, SamplingConfig};
pub use tokenizer::{chatml, Tokenizer};
