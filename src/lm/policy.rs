//! [`LmPolicy`]: a [`Llama`] (plus its tokenizer) as a [`Policy`] over token sequences.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::StdRng;

use super::chat::{ChatMessage, TokenizerConfig};
use super::hf::TOKENIZER_FILE;
use super::model::{Grad, Kernels, Llama};
use super::sampling::{DecodePrecision, SamplingConfig};
use super::tokenizer::{self, Tokenizer};
use crate::{Error, Policy, Result, TokenLogProbs};

impl Llama {
    /// Per-token log-probs of `completions[i]` after `prompts[i]`, in the model's dtype.
    ///
    /// Each row is laid out as `[pad…, prompt, completion, pad…]`: prompts left-padded to the
    /// longest prompt `P`, completions right-padded to the longest completion `C`, so the
    /// completion columns line up. One forward over the first `P + C − 1` columns; the vocab
    /// projection runs only on the `C` positions that predict completion tokens:
    ///
    /// ```text
    /// logp[i, t] = log_softmax(logits[i, P − 1 + t])[completion[i][t]]      (B, C)
    /// mask[i, t] = 1 if t < len(completion[i]) else 0                         (B, C)
    /// entropy[i, t] = −Σ_v p_v log p_v  of the same distribution (detached)  (B, C)
    /// ```
    ///
    /// With [`Grad::Track`] `logp` is differentiable w.r.t. every var. Prompts must be
    /// non-empty; when every completion is empty the result has one masked column.
    ///
    /// This scores the model's own distribution (temperature 1); see
    /// [`token_log_probs_at`](Self::token_log_probs_at) for a sampling temperature.
    pub fn token_log_probs(
        &self,
        prompts: &[&[u32]],
        completions: &[&[u32]],
        grad: Grad,
        with_entropy: bool,
    ) -> Result<TokenLogProbs> {
        self.token_log_probs_at(prompts, completions, grad, with_entropy, 1.0)
    }

    /// [`token_log_probs`](Self::token_log_probs) under the tempered distribution
    /// `softmax(logits / temperature)` the sampler draws from (see [`SamplingConfig`]):
    ///
    /// ```text
    /// logp[i, t]    = log_softmax(logits[i, P − 1 + t] / T)[completion[i][t]]
    /// entropy[i, t] = −Σ_v p_v log p_v  with  p = softmax(logits[i, P − 1 + t] / T)
    /// ```
    ///
    /// as TRL's `_get_per_token_logps_and_entropies` (`logits.div_(temperature)`) computes
    /// them; every kernel path ([`Kernels`], [`Grad`]) gives the same numbers to float
    /// rounding, and `T = 1` is exactly [`token_log_probs`](Self::token_log_probs).
    /// `temperature` must be finite and `> 0` ([`Error::InvalidConfig`] otherwise).
    pub fn token_log_probs_at(
        &self,
        prompts: &[&[u32]],
        completions: &[&[u32]],
        grad: Grad,
        with_entropy: bool,
        temperature: f64,
    ) -> Result<TokenLogProbs> {
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(Error::InvalidConfig {
                field: "temperature",
                reason: format!("scoring needs a finite temperature > 0, got {temperature}"),
            });
        }
        if prompts.len() != completions.len() {
            return Err(Error::LengthMismatch {
                what: "completions",
                got: completions.len(),
                against: "prompts",
                expected: prompts.len(),
            });
        }
        if prompts.is_empty() {
            return Err(Error::Empty("prompts"));
        }
        if grad == Grad::Detached && self.has_adapters() {
            // LoRA without a graph: merged weights, one GEMM per projection.
            return self.merged_shared()?.token_log_probs_at(
                prompts,
                completions,
                grad,
                with_entropy,
                temperature,
            );
        }
        self.check_ids("prompts", prompts)?;
        let vocab = self.config().vocab_size;
        for (row, c) in completions.iter().enumerate() {
            if let Some(&bad) = c.iter().find(|&&t| t as usize >= vocab) {
                return Err(Error::IndexOutOfRange {
                    what: "completions",
                    row,
                    value: bad as usize,
                    bound: vocab,
                    of: "tokens in the vocabulary",
                });
            }
        }
        let dev = self.device().clone();
        let b = prompts.len();
        let p = prompts.iter().map(|q| q.len()).max().unwrap_or(0);
        let c = completions.iter().map(|q| q.len()).max().unwrap_or(0);
        if c == 0 {
            let z = Tensor::zeros((b, 1), self.dtype(), &dev)?;
            return Ok(TokenLogProbs {
                logp: z.clone(),
                mask: z.clone(),
                entropy: with_entropy.then_some(z),
            });
        }
        let t = p + c - 1;
        let mut ids = vec![0u32; b * t];
        let mut real = vec![false; b * t];
        let mut targets = vec![0u32; b * c];
        let mut mask = vec![0f32; b * c];
        for row in 0..b {
            let (q, a) = (prompts[row], completions[row]);
            let start = row * t + p - q.len();
            ids[start..start + q.len()].copy_from_slice(q);
            real[start..start + q.len()].fill(true);
            // The last completion token is predicted but never fed.
            let fed = a.len().min(c - 1);
            ids[row * t + p..row * t + p + fed].copy_from_slice(&a[..fed]);
            real[row * t + p..row * t + p + fed].fill(true);
            targets[row * c..row * c + a.len()].copy_from_slice(a);
            mask[row * c..row * c + a.len()].fill(1.0);
        }
        let ids = Tensor::from_vec(ids, (b, t), &dev)?;
        let h = self.hidden_states(&ids, &real, None, grad)?;
        let h = h.narrow(1, p - 1, c)?;
        let logits = self.logits(&h, grad)?; // (B, C, V)
        let (logp, entropy) = match self.kernels() {
            Kernels::Fused | Kernels::FusedOps => {
                let idx = Tensor::from_vec(targets, (b, c), &dev)?;
                let logp = crate::ops::log_softmax_gather_at(&logits, &idx, temperature)?;
                let entropy = with_entropy
                    .then(|| crate::ops::entropy_last_dim_at(&logits, temperature))
                    .transpose()?;
                (logp, entropy)
            }
            Kernels::Reference => {
                let logits = if temperature == 1.0 {
                    logits
                } else {
                    (logits / temperature)?
                };
                let logp_all = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
                let idx = Tensor::from_vec(targets, (b, c, 1), &dev)?;
                let logp = logp_all.gather(&idx, 2)?.squeeze(2)?;
                let entropy = if with_entropy {
                    let lp = logp_all.detach();
                    Some((lp.exp()? * &lp)?.sum(D::Minus1)?.neg()?)
                } else {
                    None
                };
                (logp, entropy)
            }
        };
        let mask = Tensor::from_vec(mask, (b, c), &dev)?.to_dtype(self.dtype())?;
        Ok(TokenLogProbs {
            logp,
            mask,
            entropy,
        })
    }
}

/// A causal language model as a [`Policy`]: prompts and completions are token-id sequences.
///
/// - [`Policy::sample`]: batched KV-cache sampling under [`SamplingConfig`];
/// - [`Policy::log_probs`]: differentiable `(B, C)` completion log-probs (see
///   [`Llama::token_log_probs_at`]), `f32`, with mask and detached entropy, under the
///   distribution the sampler draws from before truncation, `softmax(logits / T)` at the
///   sampling temperature `T` (`T = 1` for greedy), as TRL scores them; top-k, top-p, min-p
///   and the repetition penalty are not applied (see [`sampling`](super::sampling) for why);
/// - [`Policy::log_probs_detached`]: the same without a graph, with fused kernels;
/// - [`Policy::sample_with_log_probs`]: the completions and the sampler's log-probs of them
///   (the same numbers up to rounding), so `num_iterations > 1` needs no second pass;
/// - [`Policy::is_truncated`]: the completion ends without a stop token (cut by
///   `max_new_tokens`); [`Policy::max_completion_len`]: `max_new_tokens`.
///
/// `Clone` shares the model's vars; [`Policy::snapshot`] deep-copies them.
///
/// **LoRA** ([`LmPolicy::with_lora`]): [`Policy::vars`] are the adapters only, so the
/// trainer's optimizer and checkpoints hold only adapters; [`Policy::snapshot`] (the KL
/// reference) is the base model with adapters off, sharing the frozen weights (no copy);
/// [`LmPolicy::save_hf_dir`] writes the merged model and [`LmPolicy::save_adapter`] the
/// adapters alone (PEFT format).
///
/// ```
/// use candle_core::{DType, Device};
/// use pgrpo::lm::{Llama, LlamaConfig, LmPolicy, SamplingConfig};
/// use pgrpo::Policy;
/// use rand::{rngs::StdRng, SeedableRng};
///
/// let config = LlamaConfig {
///     hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4,
///     num_key_value_heads: Some(2), vocab_size: 40, eos_token_id: None, ..Default::default()
/// };
/// let model = Llama::new(config, &mut StdRng::seed_from_u64(0), &Device::Cpu, DType::F32)?;
/// let policy = LmPolicy::new(model, None)
///     .with_sampling(SamplingConfig { max_new_tokens: 5, ..Default::default() })?;
/// let prompts = vec![vec![1, 2, 3], vec![4]];
/// let completions = policy.sample(&prompts, 2, &mut StdRng::seed_from_u64(1))?;
/// assert_eq!(completions.len(), 4);
/// let rows: Vec<&Vec<u32>> = prompts.iter().flat_map(|p| [p, p]).collect();
/// let lp = policy.log_probs(&rows, &completions)?;
/// assert_eq!(lp.logp.dims(), &[4, 5]);
/// # Ok::<(), pgrpo::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct LmPolicy {
    model: Llama,
    tokenizer: Option<Tokenizer>,
    tokenizer_config: TokenizerConfig,
    sampling: SamplingConfig,
    entropy: bool,
    sampler_log_probs: bool,
    /// [`Llama::base_sha256`], computed on first use (the base weights of a LoRA policy are
    /// frozen, and adapters do not enter it).
    base_sha256: std::sync::OnceLock<String>,
}

impl LmPolicy {
    /// Wraps a model (and optionally its tokenizer) with default sampling. Special tokens
    /// come from the model config's ids, and prompts are ChatML until
    /// [`with_tokenizer_config`](Self::with_tokenizer_config) gives a chat template.
    pub fn new(model: Llama, tokenizer: Option<Tokenizer>) -> Self {
        Self {
            tokenizer_config: TokenizerConfig::from_model(model.config(), tokenizer.as_ref()),
            model,
            tokenizer,
            sampling: SamplingConfig::default(),
            entropy: true,
            sampler_log_probs: true,
            base_sha256: std::sync::OnceLock::new(),
        }
    }

    /// Loads an HF checkpoint directory (`config.json`, safetensors, optional
    /// `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja`) as `f32` on
    /// `device`.
    pub fn from_hf_dir(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let model = Llama::from_hf_dir(dir, device, DType::F32)?;
        let tok_path = dir.join(TOKENIZER_FILE);
        let tokenizer = if tok_path.exists() {
            Some(tokenizer::load_tokenizer_json(&tok_path)?)
        } else {
            None
        };
        let mut policy = Self::new(model, tokenizer);
        if let Some(cfg) = TokenizerConfig::from_hf_dir(dir)? {
            policy.tokenizer_config = cfg;
        }
        Ok(policy)
    }

    /// Loads a GGUF checkpoint (dequantised to `f32` on `device`), the tokenizer in its
    /// metadata, if any, and its special tokens and chat template
    /// ([`TokenizerConfig::from_gguf`]).
    pub fn from_gguf(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let mut file = super::gguf::GgufFile::open(path.as_ref())?;
        let config = file.config()?;
        let tokenizer = tokenizer::tokenizer_from_gguf(file.content())?;
        let tok_config = tokenizer
            .as_ref()
            .map(|t| TokenizerConfig::from_gguf(file.content(), t));
        let tensors = file.hf_tensors(&config)?;
        let model = Llama::from_tensors(config, tensors, device, DType::F32, path.as_ref())?;
        let mut policy = Self::new(model, tokenizer);
        if let Some(cfg) = tok_config {
            policy.tokenizer_config = cfg;
        }
        Ok(policy)
    }

    /// Writes an HF checkpoint directory that [`from_hf_dir`](Self::from_hf_dir),
    /// `transformers` and TRL read: `config.json`, `generation_config.json`,
    /// `model.safetensors`, and with a tokenizer `tokenizer.json` and
    /// `tokenizer_config.json` (special tokens and the chat template,
    /// [`TokenizerConfig::to_json`]). Each file is written atomically. A LoRA policy writes
    /// its merged weights `W + (α/r)·B A`: a plain model.
    pub fn save_hf_dir(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        if self.model.has_adapters() {
            self.model.merged_shared()?.save_hf_dir(dir)?;
        } else {
            self.model.save_hf_dir(dir)?;
        }
        if let Some(tok) = &self.tokenizer {
            tokenizer::save_tokenizer_json(tok, dir.join(TOKENIZER_FILE))?;
            self.tokenizer_config.write(dir)?;
        }
        Ok(())
    }

    /// Special tokens and chat template.
    pub fn tokenizer_config(&self) -> &TokenizerConfig {
        &self.tokenizer_config
    }

    /// Replaces the special tokens and chat template.
    pub fn with_tokenizer_config(mut self, config: TokenizerConfig) -> Self {
        self.tokenizer_config = config;
        self
    }

    /// The policy with fresh LoRA adapters over its frozen model (see
    /// [`Llama::with_lora`]).
    pub fn with_lora(mut self, config: super::LoraConfig, rng: &mut StdRng) -> Result<Self> {
        self.model = self.model.with_lora(config, rng)?;
        Ok(self)
    }

    /// The policy with the PEFT adapters in `dir` installed over its model (see
    /// [`Llama::with_adapter`]; a wrong base is an [`Error::AdapterBase`]).
    pub fn with_adapter(mut self, dir: impl AsRef<Path>) -> Result<Self> {
        self.model = self.model.with_adapter(dir)?;
        Ok(self)
    }

    /// Writes the LoRA adapters alone in PEFT's format (see [`Llama::save_adapter`]).
    pub fn save_adapter(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.model.save_adapter(dir)
    }

    /// Replaces the sampling settings (validated).
    pub fn with_sampling(mut self, sampling: SamplingConfig) -> Result<Self> {
        self.set_sampling(sampling)?;
        Ok(self)
    }

    /// Replaces the sampling settings (validated).
    pub fn set_sampling(&mut self, sampling: SamplingConfig) -> Result<()> {
        sampling.validate()?;
        self.sampling = sampling;
        Ok(())
    }

    /// Whether [`Policy::log_probs`] also returns per-token entropy (default `true`; it
    /// costs one extra pass over the `(B, C, V)` log-probs).
    pub fn with_entropy(mut self, entropy: bool) -> Self {
        self.entropy = entropy;
        self
    }

    /// Whether [`Policy::sample_with_log_probs`] hands back the sampler's log-probs (default
    /// `true`; always off under [`DecodePrecision::Bf16`] decoding). With `false` it
    /// returns none, and a trainer with `num_iterations > 1` scores
    /// the old log-probs with [`Policy::log_probs_detached`] (a second forward pass). The
    /// two differ only by the rounding of the KV-cache decode against the full forward, as
    /// much as the training and the detached paths differ from each other (measured on
    /// SmolLM2-135M by `examples/sampler_log_probs.rs`; see the README).
    pub fn with_sampler_log_probs(mut self, on: bool) -> Self {
        self.sampler_log_probs = on;
        self
    }

    /// The sampling settings.
    pub fn sampling(&self) -> &SamplingConfig {
        &self.sampling
    }

    /// The model.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The tokenizer, if one was loaded or given.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    fn tok(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| Error::Tokenizer("this policy has no tokenizer".into()))
    }

    /// Token ids of `text` (no BOS/EOS added; special tokens in the text are recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        tokenizer::encode(self.tok()?, text)
    }

    /// Text of `ids`, without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        tokenizer::decode(self.tok()?, ids, true)
    }

    /// Token ids of a one-turn prompt for `user`, ending where the assistant's answer
    /// begins: [`chat_prompt_messages`](Self::chat_prompt_messages) with one user message.
    /// With SmolLM2's template this includes its default system message.
    pub fn chat_prompt(&self, user: &str) -> Result<Vec<u32>> {
        self.chat_prompt_messages(&[ChatMessage::user(user)])
    }

    /// Token ids of `messages` under the model's chat template (ChatML when it has none)
    /// with the generation prompt added, as `tokenizer.apply_chat_template(messages,
    /// tokenize=True, add_generation_prompt=True)` gives them in `transformers`.
    pub fn chat_prompt_messages(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.tokenizer_config.apply_chat_template(messages, true)?;
        self.encode(&text)
    }

    fn score(
        &self,
        prompts: &[&Vec<u32>],
        completions: &[Vec<u32>],
        grad: Grad,
    ) -> Result<TokenLogProbs> {
        let p: Vec<&[u32]> = prompts.iter().map(|v| v.as_slice()).collect();
        let c: Vec<&[u32]> = completions.iter().map(Vec::as_slice).collect();
        let temperature = self.sampling.scoring_temperature();
        let lp = self
            .model
            .token_log_probs_at(&p, &c, grad, self.entropy, temperature)?;
        if self.model.dtype() == DType::F32 {
            return Ok(lp);
        }
        Ok(TokenLogProbs {
            logp: lp.logp.to_dtype(DType::F32)?,
            mask: lp.mask.to_dtype(DType::F32)?,
            entropy: lp.entropy.map(|e| e.to_dtype(DType::F32)).transpose()?,
        })
    }
}

impl Policy for LmPolicy {
    type Prompt = Vec<u32>;
    type Completion = Vec<u32>;

    fn device(&self) -> &Device {
        self.model.device()
    }

    fn sample(&self, prompts: &[Vec<u32>], n: usize, rng: &mut StdRng) -> Result<Vec<Vec<u32>>> {
        let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        self.model.generate(&p, n, &self.sampling, rng)
    }

    /// The completions and their log-probs from the sampler
    /// ([`Llama::generate_with_log_probs`]): `(B, C)` `f32`, right-padded like
    /// [`log_probs_detached`](Policy::log_probs_detached), no entropy. `None` for no rows,
    /// when [`with_sampler_log_probs(false)`](LmPolicy::with_sampler_log_probs) turned
    /// them off, or when the sampler decodes with `bf16` weights
    /// ([`DecodePrecision::Bf16`]): those log-probs are the
    /// bf16 decode's, not the `f32` policy's, so a trainer that needs old log-probs
    /// recomputes them in `f32`.
    fn sample_with_log_probs(
        &self,
        prompts: &[Vec<u32>],
        n: usize,
        rng: &mut StdRng,
    ) -> Result<(Vec<Vec<u32>>, Option<TokenLogProbs>)> {
        if !self.sampler_log_probs || self.sampling.decode_weights != DecodePrecision::F32 {
            return Ok((self.sample(prompts, n, rng)?, None));
        }
        let p: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let (outs, logp) = self
            .model
            .generate_with_log_probs(&p, n, &self.sampling, rng)?;
        if outs.is_empty() {
            return Ok((outs, None));
        }
        let (b, c) = (
            outs.len(),
            outs.iter().map(Vec::len).max().unwrap_or(0).max(1),
        );
        let mut lp = vec![0f32; b * c];
        let mut mask = vec![0f32; b * c];
        for (row, l) in logp.iter().enumerate() {
            lp[row * c..row * c + l.len()].copy_from_slice(l);
            mask[row * c..row * c + l.len()].fill(1.0);
        }
        let dev = self.device();
        let lp = TokenLogProbs {
            logp: Tensor::from_vec(lp, (b, c), dev)?,
            mask: Tensor::from_vec(mask, (b, c), dev)?,
            entropy: None,
        };
        Ok((outs, Some(lp)))
    }

    /// `true` when `completion` does not end with a stop token ([`SamplingConfig`]'s
    /// `stop_tokens`, else the model's EOS ids), as TRL's `mask_truncated_completions`
    /// decides (its last token is neither EOS nor padding). A completion from this policy's
    /// sampler can only lack one when `max_new_tokens` cut it.
    fn is_truncated(&self, completion: &Vec<u32>) -> bool {
        let Some(last) = completion.last() else {
            return true;
        };
        match &self.sampling.stop_tokens {
            Some(stop) => !stop.contains(last),
            None => !self.model.config().eos_token_ids().contains(last),
        }
    }

    /// `max_new_tokens` of the [`SamplingConfig`].
    fn max_completion_len(&self) -> Option<usize> {
        Some(self.sampling.max_new_tokens)
    }

    fn log_probs(&self, prompts: &[&Vec<u32>], completions: &[Vec<u32>]) -> Result<TokenLogProbs> {
        self.score(prompts, completions, Grad::Track)
    }

    fn log_probs_detached(
        &self,
        prompts: &[&Vec<u32>],
        completions: &[Vec<u32>],
    ) -> Result<TokenLogProbs> {
        self.score(prompts, completions, Grad::Detached)
    }

    /// Every weight, or only the LoRA adapters of a LoRA policy ([`Llama::trainable_vars`]).
    fn vars(&self) -> Vec<Var> {
        self.model.trainable_vars()
    }

    /// A deep copy; for a LoRA (frozen-base) policy, the base model with adapters off,
    /// sharing the frozen weights and with no vars ([`Llama::without_adapters`]).
    fn snapshot(&self) -> Result<Self> {
        let model = if self.model.is_frozen() {
            self.model.without_adapters()
        } else {
            self.model.snapshot()?
        };
        Ok(Self {
            model,
            tokenizer: self.tokenizer.clone(),
            tokenizer_config: self.tokenizer_config.clone(),
            sampling: self.sampling.clone(),
            entropy: self.entropy,
            sampler_log_probs: self.sampler_log_probs,
            base_sha256: self.base_sha256.clone(),
        })
    }

    /// A LoRA policy's adapters are relative to its base weights: `{"lora_base_sha256": …}`
    /// ([`Llama::base_sha256`], computed once). `None` for a fully trained model, whose
    /// checkpoint holds every weight.
    fn checkpoint_identity(&self) -> Result<Option<serde_json::Value>> {
        if !self.model.has_adapters() {
            return Ok(None);
        }
        let sha = match self.base_sha256.get() {
            Some(s) => s.clone(),
            None => {
                let s = self.model.base_sha256()?;
                self.base_sha256.get_or_init(|| s).clone()
            }
        };
        Ok(Some(serde_json::json!({ "lora_base_sha256": sha })))
    }
}
