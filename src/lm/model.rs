//! [`Llama`]: a trainable Llama-family decoder built only from candle ops that have a backward.
//!
//! candle's own `candle-transformers` models use fused kernels (`rms_norm`, `softmax_last_dim`,
//! `rope`) that record no backward op, so gradients silently stop at them. This module runs
//! the same architecture in two modes ([`Grad`]):
//!
//! - [`Grad::Track`] — the training path: only differentiable ops (`rms_norm_slow`,
//!   `ops::softmax`, rotate-half RoPE written with `narrow`/`cat`, `matmul`, `silu`,
//!   `index_select`), every weight attached to its [`Var`];
//! - [`Grad::Detached`] — sampling and old/reference log-probs: weights detached from their
//!   vars (same storage, so optimizer updates are seen) and fused kernels where candle has them.
//!
//! Batches may be padded on either side. Each row's RoPE positions count only its real tokens,
//! and padding keys are masked out of attention, so a left-padded row gets the same logits as
//! the row alone. A [`KvCache`] makes incremental decoding cost one token per step.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::Rng;

use super::config::LlamaConfig;
use super::lora::{Adapter, LoraState};
use crate::ops::Dropout;
use crate::{Error, Result};

/// Whether a forward pass records the autograd graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grad {
    /// Differentiable ops only; gradients reach every [`Var`].
    Track,
    /// No graph (weights detached); fused kernels where available.
    Detached,
}

/// Which kernels a [`Llama`] runs.
///
/// Both give the same numbers (to float rounding) and the same gradients; the choice only
/// changes speed and memory. Set with [`Llama::with_kernels`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The fused kernels of [`crate::ops`] (RMSNorm, linear, RoPE, attention, SwiGLU,
    /// log-softmax + gather), each one graph node with its own backward, on the CPU in `f32`;
    /// for other devices and dtypes every op falls back to its candle composition. Default.
    /// On the CPU in `f32` the training forward ([`Grad::Track`] without a caller's cache)
    /// goes further: each decoder block is one graph node ([`crate::ops::decoder_block`]).
    #[default]
    Fused,
    /// The per-op fused kernels only (no whole-block node): for measuring what the block
    /// node buys, and as a second reference.
    FusedOps,
    /// candle's stock differentiable ops only (`rms_norm_slow`, `softmax`, rotate-half RoPE
    /// from `narrow`/`cat`, `matmul` with `w.t()`, `log_softmax` + `gather`), with candle's
    /// fused no-grad kernels in [`Grad::Detached`] mode: the reference the fused path is
    /// tested against, and the "stock candle" baseline of the benchmarks.
    Reference,
}

/// A linear layer `y = x Wᵀ (+ b)` with `W: (out, in)`, plus an optional LoRA adapter
/// `+ (α/r) · (drop(x) Aᵀ) Bᵀ`.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    pub(crate) weight: Var,
    pub(crate) bias: Option<Var>,
    pub(crate) adapter: Option<Adapter>,
}

/// One pre-norm decoder block.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub(crate) input_layernorm: Var,
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    pub(crate) o_proj: Linear,
    pub(crate) post_attention_layernorm: Var,
    pub(crate) gate_proj: Linear,
    pub(crate) up_proj: Linear,
    pub(crate) down_proj: Linear,
}

impl Block {
    /// The projections in [`crate::ops::PROJECTIONS`] order (q, k, v, o, gate, up, down).
    pub(crate) fn projections(&self) -> [&Linear; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }

    /// [`projections`](Self::projections), mutably.
    pub(crate) fn projections_mut(&mut self) -> [&mut Linear; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }
}

/// A Llama-family causal language model with Hugging Face weight names.
///
/// Build a small one from scratch with [`Llama::new`] (seeded), or load a checkpoint with
/// [`Llama::from_hf_dir`] / [`Llama::from_gguf`]. Its trainable
/// tensors are [`Var`]s in a fixed order ([`Llama::named_vars`]). `Clone` shares those vars
/// (an optimizer step on one is seen by the other); [`Llama::snapshot`] copies them.
///
/// With [`Llama::with_lora`] the base weights are frozen and only LoRA adapters train
/// ([`Llama::trainable_vars`]); see [`lora`](super::lora).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use pgrpo::lm::{Llama, LlamaConfig};
/// use rand::{rngs::StdRng, SeedableRng};
///
/// let config = LlamaConfig {
///     hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
///     num_attention_heads: 4, num_key_value_heads: Some(2), vocab_size: 50,
///     ..Default::default()
/// };
/// let model = Llama::new(config, &mut StdRng::seed_from_u64(0), &Device::Cpu, DType::F32)?;
/// let ids = Tensor::new(&[[3u32, 7, 9], [0, 4, 5]], &Device::Cpu)?;
/// let mask = Tensor::new(&[[1u8, 1, 1], [0, 1, 1]], &Device::Cpu)?; // row 1 is left-padded
/// let logits = model.forward(&ids, Some(&mask))?;
/// assert_eq!(logits.dims(), &[2, 3, 50]);
/// # Ok::<(), pgrpo::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    device: Device,
    dtype: DType,
    pub(crate) embed_tokens: Var,
    pub(crate) layers: Vec<Block>,
    pub(crate) norm: Var,
    /// `None` when tied to `embed_tokens`.
    pub(crate) lm_head: Option<Var>,
    kernels: Kernels,
    /// The base weights get no gradient (a LoRA model, or the reference of one).
    pub(crate) frozen: bool,
    /// The LoRA settings when the projections carry adapters.
    pub(crate) lora: Option<LoraState>,
    /// The file or directory the weights were loaded from (`None`: random init).
    pub(crate) source: Option<PathBuf>,
}

/// Key/value cache for incremental decoding, one entry per block.
///
/// Holds, per block, keys and values (after RoPE) of shape `(B, T_past, num_kv_heads,
/// head_dim)` under [`Kernels::Fused`], `(B, num_kv_heads, T_past, head_dim)` under
/// [`Kernels::Reference`], plus which past columns are real tokens and each row's next RoPE position. Created
/// empty by [`Llama::new_cache`] and filled by [`Llama::forward_cached`].
#[derive(Debug, Clone)]
pub struct KvCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    /// `real[row][col]`: whether past column `col` of `row` holds a real token.
    real: Vec<Vec<bool>>,
    /// Per row: number of real tokens seen so far (the next RoPE position).
    next_pos: Vec<u32>,
}

impl KvCache {
    /// Number of cached columns (past tokens, padding included).
    pub fn len(&self) -> usize {
        self.real.first().map_or(0, Vec::len)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of rows, or `None` before the first forward.
    pub fn batch_size(&self) -> Option<usize> {
        (!self.real.is_empty()).then_some(self.real.len())
    }

    /// Keeps (and reorders, repeats) rows: row `i` of the result is old row `rows[i]`.
    ///
    /// Used to repeat a prefilled prompt for `n` samples and to drop finished rows.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let b = self.real.len();
        if let Some(&bad) = rows.iter().find(|&&r| r >= b) {
            return Err(Error::IndexOutOfRange {
                what: "rows",
                row: rows.iter().position(|&r| r == bad).unwrap_or(0),
                value: bad,
                bound: b,
                of: "cache rows",
            });
        }
        if rows.is_empty() {
            return Err(Error::Empty("rows"));
        }
        let device = self
            .kv
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.device().clone());
        if let Some(device) = device {
            let idx = Tensor::from_vec(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                rows.len(),
                &device,
            )?;
            for (k, v) in self.kv.iter_mut().flatten() {
                *k = k.index_select(&idx, 0)?;
                *v = v.index_select(&idx, 0)?;
            }
        }
        self.real = rows.iter().map(|&r| self.real[r].clone()).collect();
        self.next_pos = rows.iter().map(|&r| self.next_pos[r]).collect();
        Ok(())
    }
}

/// Attention inputs shared by all blocks for one forward call.
struct AttnCtx {
    /// `(B, T, head_dim / 2)` RoPE cosines / sines (reference kernels with a graph:
    /// `(B, 1, T, head_dim)`, sign folded into `sin`).
    cos: Tensor,
    sin: Tensor,
    /// Additive mask, 0 where attention is allowed, -inf elsewhere: `(B, T, T_past + T)`
    /// (reference kernels: `(B, 1, T, T_past + T)`).
    mask: Tensor,
}

impl Llama {
    /// A model with freshly initialised weights drawn from `rng`: matrices and the embedding
    /// `~ N(0, 0.02²)` (HF's `initializer_range`), norm weights 1, biases 0.
    ///
    /// The same seed gives bit-identical weights (candle's own `randn` is not seeded on CPU).
    pub fn new(
        config: LlamaConfig,
        rng: &mut StdRng,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        config.validate()?;
        let mut tensors = HashMap::new();
        for (name, shape) in tensor_specs(&config) {
            let n: usize = shape.iter().product();
            let data = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                normal_vec(n, 0.02, rng)
            };
            let t = Tensor::from_vec(data, shape.as_slice(), device)?;
            tensors.insert(name, t);
        }
        let mut model =
            Self::from_tensors(config, tensors, device, dtype, Path::new("<random init>"))?;
        model.source = None;
        Ok(model)
    }

    /// Builds the model from tensors keyed by Hugging Face names (`model.embed_tokens.weight`,
    /// `model.layers.0.self_attn.q_proj.weight`, ...), converting them to `dtype` on `device`.
    ///
    /// `source` names the checkpoint in errors: a missing or unexpected tensor is an
    /// [`Error::File`], a wrong shape an [`Error::TensorShape`]. RoPE `inv_freq` buffers and a
    /// redundant `lm_head.weight` of a tied model are ignored.
    pub fn from_tensors(
        config: LlamaConfig,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
        source: &Path,
    ) -> Result<Self> {
        config.validate()?;
        if !matches!(dtype, DType::F32 | DType::F64 | DType::BF16 | DType::F16) {
            return Err(Error::UnsupportedModel(format!(
                "dtype {dtype:?} (use f32, f64, bf16 or f16)"
            )));
        }
        let mut take = |name: &str, shape: &[usize]| -> Result<Var> {
            let t = tensors.remove(name).ok_or_else(|| Error::File {
                path: source.to_path_buf(),
                reason: format!("missing tensor `{name}`"),
            })?;
            if t.dims() != shape {
                return Err(Error::TensorShape {
                    path: source.to_path_buf(),
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            let t = t.to_device(device)?.to_dtype(dtype)?;
            Ok(Var::from_tensor(&t)?)
        };
        let c = &config;
        let (h, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let q_out = c.num_attention_heads * c.head_dim();
        let kv_out = c.num_kv_heads() * c.head_dim();
        let bias = c.has_qkv_bias();
        let embed_tokens = take("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut linear = |name: &str, out: usize, inp: usize, with_bias: bool| {
                let weight = take(&format!("{p}.{name}.weight"), &[out, inp])?;
                let bias = if with_bias {
                    Some(take(&format!("{p}.{name}.bias"), &[out])?)
                } else {
                    None
                };
                Ok::<_, Error>(Linear {
                    weight,
                    bias,
                    adapter: None,
                })
            };
            let q_proj = linear("self_attn.q_proj", q_out, h, bias)?;
            let k_proj = linear("self_attn.k_proj", kv_out, h, bias)?;
            let v_proj = linear("self_attn.v_proj", kv_out, h, bias)?;
            let o_proj = linear("self_attn.o_proj", h, q_out, false)?;
            let gate_proj = linear("mlp.gate_proj", f, h, false)?;
            let up_proj = linear("mlp.up_proj", f, h, false)?;
            let down_proj = linear("mlp.down_proj", h, f, false)?;
            layers.push(Block {
                input_layernorm: take(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_attention_layernorm: take(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                )?,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                gate_proj,
                up_proj,
                down_proj,
            });
        }
        let norm = take("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(take("lm_head.weight", &[v, h])?)
        };
        tensors.retain(|name, _| {
            !(name.ends_with("rotary_emb.inv_freq")
                || (c.tie_word_embeddings && name == "lm_head.weight"))
        });
        if let Some(name) = tensors.keys().min() {
            return Err(Error::File {
                path: source.to_path_buf(),
                reason: format!(
                    "unexpected tensor `{name}` ({} unused in all); does config.json match the checkpoint?",
                    tensors.len()
                ),
            });
        }
        Ok(Self {
            config,
            device: device.clone(),
            dtype,
            embed_tokens,
            layers,
            norm,
            lm_head,
            kernels: Kernels::default(),
            frozen: false,
            lora: None,
            source: Some(source.to_path_buf()),
        })
    }

    /// The same model (sharing its vars) running `kernels`.
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// Switches the kernels (the vars are untouched). A [`KvCache`] filled under one setting
    /// must not be used under the other.
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// The kernels in use.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// The architecture.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device holding the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The base weights' vars with their Hugging Face names, in a fixed order: embedding,
    /// then per block `input_layernorm, q, (q bias), k, (k bias), v, (v bias), o,
    /// post_attention_layernorm, gate, up, down`, then `model.norm`, then `lm_head` (untied).
    /// LoRA adapters are not included ([`named_adapter_vars`](Self::named_adapter_vars)).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (i, b) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                b.input_layernorm.clone(),
            ));
            for (name, lin) in [
                ("self_attn.q_proj", &b.q_proj),
                ("self_attn.k_proj", &b.k_proj),
                ("self_attn.v_proj", &b.v_proj),
                ("self_attn.o_proj", &b.o_proj),
            ] {
                out.push((format!("{p}.{name}.weight"), lin.weight.clone()));
                if let Some(bias) = &lin.bias {
                    out.push((format!("{p}.{name}.bias"), bias.clone()));
                }
            }
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                b.post_attention_layernorm.clone(),
            ));
            for (name, lin) in [
                ("mlp.gate_proj", &b.gate_proj),
                ("mlp.up_proj", &b.up_proj),
                ("mlp.down_proj", &b.down_proj),
            ] {
                out.push((format!("{p}.{name}.weight"), lin.weight.clone()));
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.clone()));
        }
        out
    }

    /// Every base weight in the order of [`named_vars`](Self::named_vars) (what an optimizer
    /// trains is [`trainable_vars`](Self::trainable_vars): these, or a LoRA model's adapters).
    pub fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }

    /// A deep copy with its own storage (not updated by an optimizer stepping `self`), LoRA
    /// adapters included. (For a LoRA model's KL reference, which needs no copy, see
    /// [`Llama::without_adapters`].)
    pub fn snapshot(&self) -> Result<Self> {
        let copy = |v: &Var| Var::from_tensor(&v.as_tensor().detach());
        let lin = |l: &Linear| -> Result<Linear> {
            Ok(Linear {
                weight: copy(&l.weight)?,
                bias: l.bias.as_ref().map(copy).transpose()?,
                adapter: l
                    .adapter
                    .as_ref()
                    .map(|a| {
                        Ok::<_, Error>(Adapter {
                            a: copy(&a.a)?,
                            b: copy(&a.b)?,
                        })
                    })
                    .transpose()?,
            })
        };
        let layers = self
            .layers
            .iter()
            .map(|b| {
                Ok(Block {
                    input_layernorm: copy(&b.input_layernorm)?,
                    q_proj: lin(&b.q_proj)?,
                    k_proj: lin(&b.k_proj)?,
                    v_proj: lin(&b.v_proj)?,
                    o_proj: lin(&b.o_proj)?,
                    post_attention_layernorm: copy(&b.post_attention_layernorm)?,
                    gate_proj: lin(&b.gate_proj)?,
                    up_proj: lin(&b.up_proj)?,
                    down_proj: lin(&b.down_proj)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: self.config.clone(),
            device: self.device.clone(),
            dtype: self.dtype,
            embed_tokens: copy(&self.embed_tokens)?,
            layers,
            norm: copy(&self.norm)?,
            lm_head: self.lm_head.as_ref().map(copy).transpose()?,
            kernels: self.kernels,
            frozen: self.frozen,
            lora: self.lora.as_ref().map(LoraState::copy),
            source: self.source.clone(),
        })
    }

    /// The weights as plain tensors keyed by Hugging Face name (detached), e.g. for saving.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect()
    }

    /// Differentiable logits `(B, T, V)` for token ids `(B, T)` (`u32`).
    ///
    /// `attention_mask` is `(B, T)` of any dtype, nonzero for real tokens and zero for padding
    /// (left or right); `None` means no padding. Padding positions get finite logits that
    /// carry no meaning.
    pub fn forward(&self, ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_mode(ids, attention_mask, Grad::Track)
    }

    /// [`forward`](Self::forward) without an autograd graph (fused kernels; for sampling and
    /// reference log-probs).
    pub fn forward_detached(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_mode(ids, attention_mask, Grad::Detached)
    }

    fn forward_mode(&self, ids: &Tensor, mask: Option<&Tensor>, grad: Grad) -> Result<Tensor> {
        if grad == Grad::Detached && self.has_adapters() {
            return self.merged_shared()?.forward_mode(ids, mask, grad);
        }
        let real = real_from_mask(ids, mask)?;
        let h = self.hidden_states(ids, &real, None, grad)?;
        self.logits(&h, grad)
    }

    /// An empty cache for [`forward_cached`](Self::forward_cached).
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            kv: vec![None; self.layers.len()],
            real: Vec::new(),
            next_pos: Vec::new(),
        }
    }

    /// Appends tokens `ids: (B, T)` to `cache` and returns their logits `(B, T, V)` (no graph).
    ///
    /// `real` (length `B·T`, row-major) marks real tokens; `None` means all real. Prefill a
    /// left-padded prompt batch with one call, then feed one column per step. LoRA adapters
    /// run unmerged here (two thin matmuls per adapted projection); [`Llama::generate`]
    /// merges them once per call instead.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        real: Option<&[bool]>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let all;
        let real = match real {
            Some(r) => r,
            None => {
                all = vec![true; ids.elem_count()];
                &all
            }
        };
        let h = self.hidden_states(ids, real, Some(cache), Grad::Detached)?;
        self.logits(&h, Grad::Detached)
    }

    /// Final-norm hidden states `(B, T, hidden)` for `ids: (B, T)`.
    ///
    /// `real` (length `B·T`, row-major) marks real tokens. With a `cache`, the tokens are
    /// appended after the cached ones (their keys/values are stored) and attend to them.
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        real: &[bool],
        cache: Option<&mut KvCache>,
        grad: Grad,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if real.len() != b * t {
            return Err(Error::LengthMismatch {
                what: "real",
                got: real.len(),
                against: "ids",
                expected: b * t,
            });
        }
        let caller_cache = cache.is_some();
        let mut fresh;
        let cache = match cache {
            Some(c) => c,
            None => {
                fresh = self.new_cache();
                &mut fresh
            }
        };
        if let Some(cb) = cache.batch_size() {
            if cb != b {
                return Err(Error::ShapeMismatch {
                    what: "ids (batch vs. cache)",
                    expected: vec![cb, t],
                    got: vec![b, t],
                });
            }
        } else {
            cache.real = vec![Vec::new(); b];
            cache.next_pos = vec![0; b];
        }
        let ctx = self.attn_ctx(b, t, real, cache, grad)?;
        let pass = self.block_pass(grad);
        let w = |v: &Var| pass.base(v);
        let mut x = w(&self.embed_tokens).index_select(&ids.flatten_all()?, 0)?; // (B·T, H)
        let fused = self.kernels != Kernels::Reference;
        // Training forward on the CPU in f32: each block is one graph node (no KV cache to fill).
        let whole_blocks = self.kernels == Kernels::Fused
            && grad == Grad::Track
            && !caller_cache
            && crate::ops::fusable(&x)
            && self.config.num_kv_heads() > 0;
        if whole_blocks {
            let shape = crate::ops::BlockShape {
                batch: b,
                seq: t,
                heads: self.config.num_attention_heads,
                kv_heads: self.config.num_kv_heads(),
                head_dim: self.config.head_dim(),
                eps: self.config.rms_norm_eps as f32,
                cos: ctx.cos.flatten_all()?.to_vec1::<f32>()?.into(),
                sin: ctx.sin.flatten_all()?.to_vec1::<f32>()?.into(),
                mask: ctx.mask.flatten_all()?.to_vec1::<f32>()?.into(),
            };
            for (layer, block) in self.layers.iter().enumerate() {
                let tensors = block.tensors(&pass);
                let weights = tensors.view(&pass, layer);
                x = crate::ops::decoder_block(&x, &weights, &shape)?;
            }
        }
        for (layer, (block, kv)) in self.layers.iter().zip(cache.kv.iter_mut()).enumerate() {
            if whole_blocks {
                break;
            }
            let at = (&pass, layer);
            x = if fused {
                block.forward_fused(&x, b, t, &self.config, &ctx, kv, at)?
            } else {
                block.forward(&x, b, t, &self.config, &ctx, kv, at)?
            };
        }
        let eps = self.config.rms_norm_eps;
        let x = if fused {
            crate::ops::rms_norm(&x, &w(&self.norm), eps as f32)?
        } else {
            rms_norm(&x, &w(&self.norm), eps, grad)?
        };
        Ok(x.reshape((b, t, self.config.hidden_size))?)
    }

    /// A decoding copy of the model whose weight matrices (the seven projections of every
    /// block and the LM head, the tied embedding's copy included) are rounded to `bf16`
    /// (nearest, ties to even), converted once here; the embedding lookup, the norms and
    /// any biases stay shared with `self` in `f32`. [`crate::ops::linear`] reads the `bf16`
    /// matrices in its skinny kernel. `None` where that kernel does not run: off the CPU,
    /// weights not in `f32`, [`Kernels::Reference`], or unmerged LoRA adapters.
    ///
    /// The copy does not follow later updates of `self`'s weights; it lives for one
    /// [`generate`](Self::generate) call.
    pub(crate) fn bf16_decoder(&self) -> Result<Option<Llama>> {
        if !(self.device.is_cpu()
            && self.dtype == DType::F32
            && self.kernels != Kernels::Reference
            && !self.has_adapters())
        {
            return Ok(None);
        }
        let conv = |v: &Var| -> Result<Var> {
            use half::slice::HalfFloatSliceExt;
            let t = v.as_tensor();
            let bits = crate::ops::with_f32(t, "bf16_decoder", |src| {
                let mut dst = vec![half::bf16::ZERO; src.len()];
                crate::ops::to_bf16(src, dst.reinterpret_cast_mut());
                Ok(dst)
            })?;
            Ok(Var::from_vec(bits, t.shape(), &self.device)?)
        };
        let mut m = self.clone();
        for block in &mut m.layers {
            for l in block.projections_mut() {
                l.weight = conv(&l.weight)?;
            }
        }
        m.lm_head = Some(conv(self.lm_head.as_ref().unwrap_or(&self.embed_tokens))?);
        Ok(Some(m))
    }

    /// Logits `(.., V)` from hidden states `(.., hidden)`.
    pub fn logits(&self, hidden: &Tensor, grad: Grad) -> Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let head = self.pass(grad).base(head);
        let dims = hidden.dims().to_vec();
        let hsz = *dims.last().unwrap_or(&0);
        let x = hidden.reshape(((), hsz))?;
        let y = match self.kernels {
            Kernels::Fused | Kernels::FusedOps => crate::ops::linear(&x, &head)?,
            Kernels::Reference => x.matmul(&head.t()?)?,
        };
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = self.config.vocab_size;
        }
        Ok(y.reshape(out)?)
    }

    /// RoPE tables and attention mask for `t` new columns after the cached ones; updates the
    /// cache's `real` columns and positions.
    fn attn_ctx(
        &self,
        b: usize,
        t: usize,
        real: &[bool],
        cache: &mut KvCache,
        grad: Grad,
    ) -> Result<AttnCtx> {
        let hd = self.config.head_dim();
        let half = hd / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| self.config.rope_theta.powf(-((2 * i) as f64) / hd as f64))
            .collect();
        let past = cache.len();
        let tk = past + t;
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        let mut mask = vec![f32::NEG_INFINITY; b * t * tk];
        for row in 0..b {
            let new_real = &real[row * t..(row + 1) * t];
            cache.real[row].extend_from_slice(new_real);
            let row_real = &cache.real[row];
            let mut pos = cache.next_pos[row];
            for (i, &r) in new_real.iter().enumerate() {
                for f in &inv_freq {
                    let angle = pos as f64 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
                if r {
                    pos += 1;
                }
                let q = past + i;
                let m = &mut mask[(row * t + i) * tk..(row * t + i + 1) * tk];
                for (j, slot) in m.iter_mut().enumerate().take(q + 1) {
                    // A padding query attends to itself only, which keeps its softmax finite.
                    if row_real[j] || j == q {
                        *slot = 0.0;
                    }
                }
            }
            cache.next_pos[row] = pos;
        }
        let dev = &self.device;
        let dt = self.dtype;
        let cos = Tensor::from_vec(cos, (b, t, half), dev)?.to_dtype(dt)?;
        let sin = Tensor::from_vec(sin, (b, t, half), dev)?.to_dtype(dt)?;
        let (cos, sin) = match (self.kernels, grad) {
            (Kernels::Fused | Kernels::FusedOps, _) | (Kernels::Reference, Grad::Detached) => {
                (cos, sin)
            }
            // Full-width tables for `x·cos + swap_halves(x)·sin` with the sign folded into sin.
            (Kernels::Reference, Grad::Track) => (
                Tensor::cat(&[&cos, &cos], D::Minus1)?.unsqueeze(1)?,
                Tensor::cat(&[&sin.neg()?, &sin], D::Minus1)?.unsqueeze(1)?,
            ),
        };
        let mask = match self.kernels {
            Kernels::Fused | Kernels::FusedOps => Tensor::from_vec(mask, (b, t, tk), dev)?,
            Kernels::Reference => Tensor::from_vec(mask, (b, 1, t, tk), dev)?,
        }
        .to_dtype(dt)?;
        Ok(AttnCtx { cos, sin, mask })
    }
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        b: usize,
        t: usize,
        cfg: &LlamaConfig,
        ctx: &AttnCtx,
        kv: &mut Option<(Tensor, Tensor)>,
        (pass, layer): (&Pass, usize),
    ) -> Result<Tensor> {
        let grad = pass.grad;
        let lin =
            |l: &Linear, x: &Tensor, module: usize| l.forward(x, pass, pass.dropout(layer, module));
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let rep = nh / nkv;
        let eps = cfg.rms_norm_eps;
        let h = rms_norm(x, &pass.base(&self.input_layernorm), eps, grad)?;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(lin(&self.q_proj, &h, 0)?, nh)?;
        let k = heads(lin(&self.k_proj, &h, 1)?, nkv)?;
        let v = heads(lin(&self.v_proj, &h, 2)?, nkv)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let q = (rope(&q, ctx, grad)? * scale)?;
        let k = rope(&k, ctx, grad)?;
        let (k, v) = match kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *kv = Some((k.clone(), v.clone()));
        let tk = k.dim(2)?;
        // Grouped-query attention without repeating K/V: the `rep` query heads that share a
        // K/V head are stacked along the time axis.
        let qg = q.reshape((b, nkv, rep * t, hd))?;
        let scores = qg.matmul(&k.t()?)?.reshape((b, nh, t, tk))?;
        let scores = scores.broadcast_add(&ctx.mask)?;
        let probs = match grad {
            Grad::Track => candle_nn::ops::softmax(&scores, D::Minus1)?,
            Grad::Detached => candle_nn::ops::softmax_last_dim(&scores)?,
        };
        let attn = probs.reshape((b, nkv, rep * t, tk))?.matmul(&v)?;
        let attn = attn
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b * t, nh * hd))?;
        let x = (x + lin(&self.o_proj, &attn, 3)?)?;
        let h = rms_norm(&x, &pass.base(&self.post_attention_layernorm), eps, grad)?;
        let gate = lin(&self.gate_proj, &h, 4)?.silu()?;
        let up = lin(&self.up_proj, &h, 5)?;
        let y = lin(&self.down_proj, &(gate * up)?, 6)?;
        Ok((x + y)?)
    }
}

/// One block's weights as tensors for a pass (attached where they train, detached where
/// frozen), for [`crate::ops::decoder_block`].
struct BlockTensors {
    input_norm: Tensor,
    proj: [(Tensor, Option<Tensor>); 7],
    post_norm: Tensor,
    lora: [Option<(Tensor, Tensor)>; 7],
}

impl BlockTensors {
    fn view(&self, pass: &Pass, layer: usize) -> crate::ops::BlockWeights<'_> {
        let p = &self.proj;
        let lin = |j: usize| (&p[j].0, p[j].1.as_ref());
        let mut lora = [None; 7];
        for (j, (slot, ab)) in lora.iter_mut().zip(&self.lora).enumerate() {
            *slot = ab.as_ref().map(|(a, b)| crate::ops::BlockLora {
                a,
                b,
                scale: pass.scale as f32,
                dropout: pass.dropout(layer, j),
            });
        }
        crate::ops::BlockWeights {
            input_norm: &self.input_norm,
            q: lin(0),
            k: lin(1),
            v: lin(2),
            o: &p[3].0,
            post_norm: &self.post_norm,
            gate: &p[4].0,
            up: &p[5].0,
            down: &p[6].0,
            lora,
        }
    }
}

impl Block {
    fn tensors(&self, pass: &Pass) -> BlockTensors {
        let proj = self
            .projections()
            .map(|l| (pass.base(&l.weight), l.bias.as_ref().map(|b| pass.base(b))));
        let lora = self.projections().map(|l| {
            l.adapter
                .as_ref()
                .map(|ad| (pass.adapter(&ad.a), pass.adapter(&ad.b)))
        });
        BlockTensors {
            input_norm: pass.base(&self.input_layernorm),
            proj,
            post_norm: pass.base(&self.post_attention_layernorm),
            lora,
        }
    }

    /// [`Block::forward`] with the fused kernels of [`crate::ops`] (one graph node per op;
    /// `q`, `k`, `v` stay in `(B, T, heads, head_dim)` layout, no transposes).
    #[allow(clippy::too_many_arguments)]
    fn forward_fused(
        &self,
        x: &Tensor,
        b: usize,
        t: usize,
        cfg: &LlamaConfig,
        ctx: &AttnCtx,
        kv: &mut Option<(Tensor, Tensor)>,
        (pass, layer): (&Pass, usize),
    ) -> Result<Tensor> {
        use crate::ops;
        let lin = |l: &Linear, x: &Tensor, module: usize| {
            l.forward_fused(x, pass, pass.dropout(layer, module))
        };
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let eps = cfg.rms_norm_eps as f32;
        let h = ops::rms_norm(x, &pass.base(&self.input_layernorm), eps)?;
        let q = lin(&self.q_proj, &h, 0)?.reshape((b, t, nh, hd))?;
        let k = lin(&self.k_proj, &h, 1)?.reshape((b, t, nkv, hd))?;
        let v = lin(&self.v_proj, &h, 2)?.reshape((b, t, nkv, hd))?;
        let q = ops::rope(&q, &ctx.cos, &ctx.sin)?;
        let k = ops::rope(&k, &ctx.cos, &ctx.sin)?;
        let (k, v) = match kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
            None => (k, v),
        };
        *kv = Some((k.clone(), v.clone()));
        let scale = 1.0 / (hd as f64).sqrt();
        let attn = ops::attention(&q, &k, &v, &ctx.mask, scale)?.reshape((b * t, nh * hd))?;
        let x = (x + lin(&self.o_proj, &attn, 3)?)?;
        let h = ops::rms_norm(&x, &pass.base(&self.post_attention_layernorm), eps)?;
        let gate = lin(&self.gate_proj, &h, 4)?;
        let up = lin(&self.up_proj, &h, 5)?;
        let y = lin(&self.down_proj, &ops::swiglu(&gate, &up)?, 6)?;
        Ok((x + y)?)
    }
}

impl Linear {
    /// [`Linear::forward`] through [`crate::ops::linear`].
    fn forward_fused(&self, x: &Tensor, pass: &Pass, drop: Option<Dropout>) -> Result<Tensor> {
        let y = crate::ops::linear(x, &pass.base(&self.weight))?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&pass.base(b))?,
            None => y,
        };
        self.add_lora(x, y, pass, drop, true)
    }

    /// `x: (N, in)` → `(N, out)`.
    fn forward(&self, x: &Tensor, pass: &Pass, drop: Option<Dropout>) -> Result<Tensor> {
        let y = x.matmul(&pass.base(&self.weight).t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&pass.base(b))?,
            None => y,
        };
        self.add_lora(x, y, pass, drop, false)
    }

    /// `y + (α/r) · (drop(x) Aᵀ) Bᵀ` when the layer has an adapter, else `y`.
    fn add_lora(
        &self,
        x: &Tensor,
        y: Tensor,
        pass: &Pass,
        drop: Option<Dropout>,
        fused: bool,
    ) -> Result<Tensor> {
        let Some(ad) = &self.adapter else {
            return Ok(y);
        };
        let xd = match drop {
            Some(d) => d.apply_tensor(x)?,
            None => x.clone(),
        };
        let (a, b) = (pass.adapter(&ad.a), pass.adapter(&ad.b));
        let z = if fused {
            crate::ops::linear(&crate::ops::linear(&xd, &a)?, &b)?
        } else {
            xd.matmul(&a.t()?)?.matmul(&b.t()?)?
        };
        Ok((y + (z * pass.scale)?)?)
    }
}

/// How one forward call treats the weights.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pass {
    pub(crate) grad: Grad,
    /// The base weights get no gradient.
    frozen: bool,
    /// LoRA's `α / r` (unused without adapters).
    scale: f64,
    /// LoRA dropout of this call: `(p, seed)`, only when training with `p > 0`.
    dropout: Option<(f32, u64)>,
}

impl Pass {
    /// A base weight: attached only when training and not frozen.
    pub(crate) fn base(&self, v: &Var) -> Tensor {
        match (self.grad, self.frozen) {
            (Grad::Track, false) => v.as_tensor().clone(),
            _ => v.as_tensor().detach(),
        }
    }

    /// An adapter weight: attached when training.
    fn adapter(&self, v: &Var) -> Tensor {
        weight(v, self.grad)
    }

    /// The dropout of projection `module` (in [`crate::ops::PROJECTIONS`] order) of block
    /// `layer` in this call.
    fn dropout(&self, layer: usize, module: usize) -> Option<Dropout> {
        self.dropout.map(|(p, seed)| Dropout {
            p,
            seed: crate::ops::dropout::splitmix64(
                seed ^ crate::ops::dropout::splitmix64((layer * 8 + module + 1) as u64),
            ),
        })
    }
}

impl Llama {
    /// How a call with `grad` treats the weights (no dropout).
    pub(crate) fn pass(&self, grad: Grad) -> Pass {
        Pass {
            grad,
            frozen: self.frozen,
            scale: self.lora.as_ref().map_or(0.0, |l| l.config.scale()),
            dropout: None,
        }
    }

    /// [`pass`](Self::pass) for one forward through the blocks: draws this call's dropout
    /// seed when training a LoRA model with dropout.
    fn block_pass(&self, grad: Grad) -> Pass {
        let mut pass = self.pass(grad);
        if let Some(l) = &self.lora {
            if grad == Grad::Track && l.config.dropout > 0.0 {
                pass.dropout = Some((l.config.dropout as f32, l.next_call_seed()));
            }
        }
        pass
    }
}

/// A var as an attached (training) or detached (no-graph) tensor; both share storage.
fn weight(v: &Var, grad: Grad) -> Tensor {
    match grad {
        Grad::Track => v.as_tensor().clone(),
        Grad::Detached => v.as_tensor().detach(),
    }
}

/// RMSNorm over the last dim: `x / sqrt(mean(x²) + eps) · w`.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, grad: Grad) -> Result<Tensor> {
    // candle's fused kernel has no f64 version.
    Ok(match grad {
        Grad::Detached if x.dtype() != DType::F64 => {
            candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?
        }
        _ => candle_nn::ops::rms_norm_slow(x, w, eps as f32)?,
    })
}

/// Rotate-half RoPE on `x: (B, heads, T, head_dim)` (contiguous) with per-row positions.
fn rope(x: &Tensor, ctx: &AttnCtx, grad: Grad) -> Result<Tensor> {
    Ok(match grad {
        Grad::Track => {
            let hd = x.dim(D::Minus1)?;
            let (x1, x2) = (
                x.narrow(D::Minus1, 0, hd / 2)?,
                x.narrow(D::Minus1, hd / 2, hd / 2)?,
            );
            let swapped = Tensor::cat(&[&x2, &x1], D::Minus1)?;
            (x.broadcast_mul(&ctx.cos)? + swapped.broadcast_mul(&ctx.sin)?)?
        }
        Grad::Detached => candle_nn::rotary_emb::rope(x, &ctx.cos, &ctx.sin)?,
    })
}

/// Host-side `real` flags from an optional `(B, T)` attention mask.
pub(crate) fn real_from_mask(ids: &Tensor, mask: Option<&Tensor>) -> Result<Vec<bool>> {
    let (b, t) = ids.dims2()?;
    match mask {
        None => Ok(vec![true; b * t]),
        Some(m) => {
            if m.dims() != [b, t] {
                return Err(Error::ShapeMismatch {
                    what: "attention_mask",
                    expected: vec![b, t],
                    got: m.dims().to_vec(),
                });
            }
            let v = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(v.into_iter().map(|x| x != 0.0).collect())
        }
    }
}

/// `(name, shape)` of every weight the config needs, in [`Llama::named_vars`] order.
pub(crate) fn tensor_specs(c: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let q = c.num_attention_heads * c.head_dim();
    let kv = c.num_kv_heads() * c.head_dim();
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        for (name, o, inp) in [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h)] {
            out.push((format!("{p}.self_attn.{name}.weight"), vec![o, inp]));
            if c.has_qkv_bias() {
                out.push((format!("{p}.self_attn.{name}.bias"), vec![o]));
            }
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![f, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, f]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// `n` draws from `N(0, std²)` (Box–Muller on `rng`'s uniforms).
fn normal_vec(n: usize, std: f64, rng: &mut StdRng) -> Vec<f64> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = std::f64::consts::TAU * u2;
        out.push(std * r * a.cos());
        out.push(std * r * a.sin());
    }
    out.truncate(n);
    out
}
