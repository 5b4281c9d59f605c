//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
//! arXiv:2106.09685) for [`Llama`]: frozen base weights, trainable low-rank adapters.
//!
//! Each targeted projection `W: (out, in)` gets `A: (r, in)` and `B: (out, r)`:
//!
//! ```text
//! y = x Wᵀ + (α / r) · (dropout(x) Aᵀ) Bᵀ          (training)
//! W_merged = W + (α / r) · B A                      (sampling, saving)
//! ```
//!
//! `A` starts Kaiming-uniform (`U(−1/√in, 1/√in)`, PyTorch's `kaiming_uniform_(a = √5)` as
//! PEFT uses it) and `B` at zero, so the adapted model starts exactly equal to the base.
//!
//! - **Training.** [`Llama::with_lora`] freezes the base: [`Llama::trainable_vars`] (and so
//!   [`LmPolicy`](super::LmPolicy)'s `Policy::vars`, the optimizer and trainer checkpoints)
//!   hold the adapters only. The fused training path keeps each decoder block one graph node
//!   ([`crate::ops::decoder_block`]) and runs the adapters there in low rank, so the base
//!   weights' gradient GEMMs (a third of a full fine-tuning step's FLOPs) are skipped
//!   instead of computed and thrown away; the frozen LM head / embedding get no gradient
//!   either.
//! - **Sampling and detached log-probs** run on merged weights, built once per call: the
//!   decoding loop is then exactly the plain model's.
//! - **The KL reference** is the base model, adapters off ([`Llama::without_adapters`]):
//!   same storage, no copy.
//! - **Saving.** [`Llama::merged`] / `LmPolicy::save_hf_dir` give a plain model;
//!   [`Llama::save_adapter`] / [`Llama::with_adapter`] read and write PEFT's adapter format
//!   (see [`peft`](super::peft)).
//!
//! Dropout (`p > 0`) applies on the training path only (as PEFT in `train()` mode), with a
//! counter-based mask ([`crate::ops::Dropout`]) drawn from a seed the model keeps: one fresh
//! seed per training forward, derived from the seed drawn at [`Llama::with_lora`] and a call
//! counter ([`Llama::lora_dropout_calls`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::model::Llama;
use crate::error::bail_config;
use crate::ops::dropout::splitmix64;
use crate::{Error, Result};

/// A projection of a Llama decoder block that LoRA can adapt (Hugging Face module names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    /// `self_attn.q_proj`.
    QProj,
    /// `self_attn.k_proj`.
    KProj,
    /// `self_attn.v_proj`.
    VProj,
    /// `self_attn.o_proj`.
    OProj,
    /// `mlp.gate_proj`.
    GateProj,
    /// `mlp.up_proj`.
    UpProj,
    /// `mlp.down_proj`.
    DownProj,
}

impl LoraTarget {
    /// All seven, in block order (PEFT's `"all-linear"` for a Llama, minus the LM head).
    pub const ALL: [LoraTarget; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// Position in [`LoraTarget::ALL`] (and [`crate::ops::PROJECTIONS`]).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The module name (`"q_proj"`, ...).
    pub fn name(self) -> &'static str {
        crate::ops::PROJECTIONS[self.index()]
    }

    /// The module path inside a block (`"self_attn.q_proj"`, `"mlp.up_proj"`, ...).
    pub fn path(self) -> String {
        let parent = if self.index() < 4 { "self_attn" } else { "mlp" };
        format!("{parent}.{}", self.name())
    }

    /// The target named `name` (`"q_proj"`, ...).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// LoRA hyper-parameters.
///
/// Defaults are PEFT's `LoraConfig` (peft 0.17, `src/peft/tuners/lora/config.py`): `r = 8`,
/// `lora_alpha = 8`, `lora_dropout = 0.0`, and for `target_modules = None` PEFT's choice for
/// Llama, Mistral and Qwen2 (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`):
/// `["q_proj", "v_proj"]`. Serialises with those field names mapped to `r`, `alpha`,
/// `dropout`, `target_modules`; unknown fields are rejected.
///
/// ```
/// use pgrpo::lm::{LoraConfig, LoraTarget};
/// let all = LoraConfig { r: 16, alpha: 32.0, target_modules: LoraTarget::ALL.to_vec(), ..Default::default() };
/// all.validate()?;
/// assert_eq!(all.scale(), 2.0);
/// let json: LoraConfig = serde_json::from_str(r#"{"r": 4, "target_modules": ["q_proj", "down_proj"]}"#)?;
/// assert_eq!(json.alpha, 8.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank `r` of each adapter (PEFT `r`, default 8). Must be at least 1.
    pub r: usize,
    /// Scaling numerator `α`: the update is `(α / r) · B A` (PEFT `lora_alpha`, default 8;
    /// Hu et al. 2021 §4.1). Must be finite.
    pub alpha: f64,
    /// Dropout probability on each adapter's input, training only (PEFT `lora_dropout`,
    /// default 0). In `[0, 1)`.
    pub dropout: f64,
    /// Projections to adapt in every block (PEFT `target_modules`, default q and v). Must be
    /// non-empty and without repeats.
    pub target_modules: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec![LoraTarget::QProj, LoraTarget::VProj],
        }
    }
}

impl LoraConfig {
    /// The factor `α / r` applied to `B A`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Checks the ranges ([`Error::InvalidConfig`] naming the field).
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            bail_config!("lora.r", "must be at least 1");
        }
        if !self.alpha.is_finite() {
            bail_config!("lora.alpha", "must be finite, got {}", self.alpha);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail_config!("lora.dropout", "must be in [0, 1), got {}", self.dropout);
        }
        if self.target_modules.is_empty() {
            bail_config!("lora.target_modules", "must name at least one projection");
        }
        let mut seen = self.target_modules.clone();
        seen.sort();
        seen.dedup();
        if seen.len() != self.target_modules.len() {
            bail_config!("lora.target_modules", "names a projection twice");
        }
        Ok(())
    }

    /// Whether projection `t` is adapted.
    pub fn targets(&self, t: LoraTarget) -> bool {
        self.target_modules.contains(&t)
    }
}

/// The two factors of one adapter.
#[derive(Debug, Clone)]
pub(crate) struct Adapter {
    /// `(r, in)`.
    pub(crate) a: Var,
    /// `(out, r)`.
    pub(crate) b: Var,
}

/// A model's LoRA settings and dropout stream (shared by clones).
#[derive(Debug, Clone)]
pub(crate) struct LoraState {
    pub(crate) config: LoraConfig,
    dropout_seed: u64,
    calls: Arc<AtomicU64>,
}

impl LoraState {
    fn new(config: LoraConfig, dropout_seed: u64) -> Self {
        Self {
            config,
            dropout_seed,
            calls: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The seed of the next training forward's dropout masks.
    pub(crate) fn next_call_seed(&self) -> u64 {
        let c = self.calls.fetch_add(1, Ordering::Relaxed);
        splitmix64(self.dropout_seed ^ splitmix64(c.wrapping_add(1)))
    }

    /// An independent copy (its own call counter, same position).
    pub(crate) fn copy(&self) -> Self {
        Self {
            config: self.config.clone(),
            dropout_seed: self.dropout_seed,
            calls: Arc::new(AtomicU64::new(self.calls.load(Ordering::Relaxed))),
        }
    }
}

impl Llama {
    /// Adds fresh LoRA adapters (`A` Kaiming-uniform from `rng`, `B = 0`) to the projections
    /// `config` targets and freezes every base weight. The result computes exactly what the
    /// base model computes until the adapters train. One `u64` more is drawn from `rng` for
    /// the dropout stream.
    ///
    /// Adapters take the model's dtype, which must be `f32` or `f64`.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use pgrpo::lm::{Llama, LlamaConfig, LoraConfig};
    /// use rand::{rngs::StdRng, SeedableRng};
    ///
    /// let config = LlamaConfig {
    ///     hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4,
    ///     num_key_value_heads: Some(2), vocab_size: 40, ..Default::default()
    /// };
    /// let mut rng = StdRng::seed_from_u64(0);
    /// let base = Llama::new(config, &mut rng, &Device::Cpu, DType::F32)?;
    /// let lora = base.clone().with_lora(LoraConfig::default(), &mut rng)?;
    /// // q and v of 2 blocks, A and B each: 8 trainable tensors; the base has 20 (frozen).
    /// assert_eq!(lora.trainable_vars().len(), 8);
    /// assert_eq!(base.trainable_vars().len(), 20);
    /// # Ok::<(), pgrpo::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] from [`LoraConfig::validate`]; [`Error::UnsupportedModel`]
    /// when the model already has adapters or is not `f32`/`f64`.
    pub fn with_lora(mut self, config: LoraConfig, rng: &mut StdRng) -> Result<Self> {
        config.validate()?;
        self.check_lora_dtype()?;
        for block in &mut self.layers {
            for (t, lin) in LoraTarget::ALL.into_iter().zip(block.projections_mut()) {
                if !config.targets(t) {
                    continue;
                }
                let (out, inp) = lin.weight.dims2()?;
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f64> = (0..config.r * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let dev = lin.weight.device().clone();
                let dt = lin.weight.dtype();
                let a = Tensor::from_vec(a, (config.r, inp), &dev)?.to_dtype(dt)?;
                lin.adapter = Some(Adapter {
                    a: Var::from_tensor(&a)?,
                    b: Var::zeros((out, config.r), dt, &dev)?,
                });
            }
        }
        let seed = rng.random::<u64>();
        self.lora = Some(LoraState::new(config, seed));
        self.frozen = true;
        Ok(self)
    }

    /// Installs adapters (`(A, B)` per block and target, block-major) under `config`.
    pub(crate) fn install_adapters(
        mut self,
        config: LoraConfig,
        mut factors: Vec<(Tensor, Tensor)>,
    ) -> Result<Self> {
        config.validate()?;
        self.check_lora_dtype()?;
        factors.reverse();
        for block in &mut self.layers {
            for (t, lin) in LoraTarget::ALL.into_iter().zip(block.projections_mut()) {
                if !config.targets(t) {
                    continue;
                }
                let Some((a, b)) = factors.pop() else {
                    return Err(Error::Empty("LoRA factors"));
                };
                let (dev, dt) = (lin.weight.device().clone(), lin.weight.dtype());
                lin.adapter = Some(Adapter {
                    a: Var::from_tensor(&a.to_device(&dev)?.to_dtype(dt)?)?,
                    b: Var::from_tensor(&b.to_device(&dev)?.to_dtype(dt)?)?,
                });
            }
        }
        self.lora = Some(LoraState::new(config, 0));
        self.frozen = true;
        Ok(self)
    }

    fn check_lora_dtype(&self) -> Result<()> {
        if self.lora.is_some() {
            return Err(Error::UnsupportedModel(
                "this model already has LoRA adapters".into(),
            ));
        }
        if !matches!(self.dtype(), DType::F32 | DType::F64) {
            return Err(Error::UnsupportedModel(format!(
                "LoRA on a {:?} model (use f32 or f64)",
                self.dtype()
            )));
        }
        Ok(())
    }

    /// The LoRA settings, when the model has adapters.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref().map(|l| &l.config)
    }

    /// Whether the model carries LoRA adapters.
    pub fn has_adapters(&self) -> bool {
        self.lora.is_some()
    }

    /// Whether the base weights are frozen (a LoRA model, or one from
    /// [`without_adapters`](Self::without_adapters)): they get no gradient and are not in
    /// [`trainable_vars`](Self::trainable_vars).
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// The adapters with PEFT's names minus its `base_model.model.` prefix
    /// (`model.layers.0.self_attn.q_proj.lora_A.weight`, then `lora_B`), block by block in
    /// [`LoraTarget::ALL`] order. Empty without adapters.
    pub fn named_adapter_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (i, block) in self.layers.iter().enumerate() {
            for (t, lin) in LoraTarget::ALL.into_iter().zip(block.projections()) {
                if let Some(ad) = &lin.adapter {
                    let p = format!("model.layers.{i}.{}", t.path());
                    out.push((format!("{p}.lora_A.weight"), ad.a.clone()));
                    out.push((format!("{p}.lora_B.weight"), ad.b.clone()));
                }
            }
        }
        out
    }

    /// What an optimizer should train: the adapters of a LoRA model
    /// ([`named_adapter_vars`](Self::named_adapter_vars) order), nothing for a frozen model
    /// without adapters, otherwise every weight ([`vars`](Self::vars)).
    pub fn trainable_vars(&self) -> Vec<Var> {
        if self.lora.is_some() {
            self.named_adapter_vars()
                .into_iter()
                .map(|(_, v)| v)
                .collect()
        } else if self.frozen {
            Vec::new()
        } else {
            self.vars()
        }
    }

    /// The base model: the same weight storage (no copy), adapters dropped, frozen (no
    /// trainable vars). For a LoRA model this is the KL reference ("adapters disabled").
    pub fn without_adapters(&self) -> Self {
        let mut base = self.clone();
        for block in &mut base.layers {
            for lin in block.projections_mut() {
                lin.adapter = None;
            }
        }
        base.lora = None;
        base.frozen = true;
        base
    }

    /// A plain model with the adapters merged, `W + (α/r)·B A`, and its own storage for
    /// every weight (trainable, not frozen; nothing shared with `self`). Without adapters, a
    /// deep copy. Save it with [`save_hf_dir`](Self::save_hf_dir).
    pub fn merged(&self) -> Result<Self> {
        let mut m = self.merged_shared()?.snapshot()?;
        m.frozen = false;
        Ok(m)
    }

    /// The adapters merged into new weight storage; the weights without an adapter are shared
    /// with `self`. Frozen. Used for sampling and detached log-probs (built once per call).
    pub(crate) fn merged_shared(&self) -> Result<Self> {
        let scale = self.lora.as_ref().map_or(0.0, |l| l.config.scale());
        let mut m = self.without_adapters();
        for (mb, sb) in m.layers.iter_mut().zip(&self.layers) {
            for (ml, sl) in mb.projections_mut().into_iter().zip(sb.projections()) {
                if let Some(ad) = &sl.adapter {
                    ml.weight = merge_weight(&sl.weight, &ad.a, &ad.b, scale)?;
                }
            }
        }
        Ok(m)
    }

    /// Number of training forwards that have drawn LoRA dropout masks so far (`None`
    /// without adapters). The masks of the next call depend on it; restore it with
    /// [`set_lora_dropout_calls`](Self::set_lora_dropout_calls) to resume a run with
    /// dropout bit for bit.
    pub fn lora_dropout_calls(&self) -> Option<u64> {
        self.lora.as_ref().map(|l| l.calls.load(Ordering::Relaxed))
    }

    /// Sets the dropout call counter (see [`lora_dropout_calls`](Self::lora_dropout_calls));
    /// no effect without adapters.
    pub fn set_lora_dropout_calls(&self, calls: u64) {
        if let Some(l) = &self.lora {
            l.calls.store(calls, Ordering::Relaxed);
        }
    }
}

/// `W + scale · B A` as a new var (`W: (out, in)`, `A: (r, in)`, `B: (out, r)`).
fn merge_weight(w: &Var, a: &Var, b: &Var, scale: f64) -> Result<Var> {
    let (w, a, b) = (
        w.as_tensor(),
        a.as_detached_tensor(),
        b.as_detached_tensor(),
    );
    let (out, inp) = w.dims2()?;
    let r = a.dim(0)?;
    if crate::ops::fusable(w) && crate::ops::fusable(&a) && crate::ops::fusable(&b) {
        // One copy of W, then the rank-r product added in place by gemm.
        let mut dst = w.flatten_all()?.to_vec1::<f32>()?;
        let a = a.flatten_all()?.to_vec1::<f32>()?;
        let bs: Vec<f32> = b
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| v * scale as f32)
            .collect();
        crate::ops::gemm(
            out,
            inp,
            r,
            &mut dst,
            inp,
            (&bs, r, 1),
            (&a, inp, 1),
            true,
            rayon::current_num_threads(),
        );
        return Ok(Var::from_vec(dst, (out, inp), w.device())?);
    }
    let delta = (b.matmul(&a)? * scale)?;
    Ok(Var::from_tensor(&(w.detach() + delta)?)?)
}
