//! Batched autoregressive sampling with a KV cache: temperature, top-k, top-p, stop tokens.

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::Rng;

use super::model::{Grad, Llama};
use crate::error::bail_config;
use crate::{Error, Result};

/// How completions are sampled.
///
/// ```
/// let greedy = pgrpo::lm::SamplingConfig { temperature: 0.0, max_new_tokens: 16, ..Default::default() };
/// greedy.validate()?;
/// # Ok::<(), pgrpo::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Maximum number of generated tokens per completion (the stop token included).
    pub max_new_tokens: usize,
    /// Softmax temperature: tokens are drawn from `softmax(logits / temperature)`.
    /// `0` means greedy (argmax, no randomness drawn).
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens before sampling; `0` keeps all.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability
    /// (after temperature and top-k) reaches `top_p`; `1.0` keeps all.
    pub top_p: f64,
    /// Tokens that end a completion (kept as its last token). `None`: the model config's
    /// `eos_token_id`s.
    pub stop_tokens: Option<Vec<u32>>,
}

impl Default for SamplingConfig {
    /// Plain sampling at temperature 1, up to 64 new tokens, stopping at the model's EOS.
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            stop_tokens: None,
        }
    }
}

impl SamplingConfig {
    /// Checks the ranges: `max_new_tokens ≥ 1`, `temperature ≥ 0` and finite,
    /// `top_p ∈ (0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            bail_config!("max_new_tokens", "must be at least 1");
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail_config!(
                "temperature",
                "must be finite and >= 0, got {}",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail_config!("top_p", "must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }
}

impl Llama {
    /// Samples `n` completions for every prompt (row-major: all of prompt 0's, then prompt
    /// 1's, ...), each a list of new token ids ending with a stop token or after
    /// `max_new_tokens`.
    ///
    /// Prompts are left-padded into one batch and prefilled once; the cache is then repeated
    /// `n` times and decoded one token per step, dropping rows as they finish. All randomness
    /// comes from `rng` (one uniform per row and step, in row order), so a seed fixes the
    /// result.
    pub fn generate(
        &self,
        prompts: &[&[u32]],
        n: usize,
        cfg: &SamplingConfig,
        rng: &mut StdRng,
    ) -> Result<Vec<Vec<u32>>> {
        cfg.validate()?;
        if prompts.is_empty() || n == 0 {
            return Ok(Vec::new());
        }
        if self.has_adapters() {
            // LoRA: merge once, then decode exactly as the plain model does.
            return self.merged_shared()?.generate(prompts, n, cfg, rng);
        }
        self.check_ids("prompts", prompts)?;
        let stop = cfg
            .stop_tokens
            .clone()
            .unwrap_or_else(|| self.config().eos_token_ids());
        let dev = self.device().clone();
        let p = prompts.len();
        let width = prompts.iter().map(|q| q.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; p * width];
        let mut real = vec![false; p * width];
        for (row, q) in prompts.iter().enumerate() {
            let start = row * width + width - q.len();
            ids[start..start + q.len()].copy_from_slice(q);
            real[start..start + q.len()].fill(true);
        }
        let ids = Tensor::from_vec(ids, (p, width), &dev)?;
        let mut cache = self.new_cache();
        let h = self.hidden_states(&ids, &real, Some(&mut cache), Grad::Detached)?;
        let mut last = h.narrow(1, width - 1, 1)?.squeeze(1)?.contiguous()?; // (P, H)
        if n > 1 {
            let rows: Vec<usize> = (0..p).flat_map(|i| std::iter::repeat_n(i, n)).collect();
            cache.select_rows(&rows)?;
            let idx = Tensor::from_vec(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                rows.len(),
                &dev,
            )?;
            last = last.index_select(&idx, 0)?;
        }
        let mut logits = self.logits(&last, Grad::Detached)?; // (B, V)
        let mut outs = vec![Vec::new(); p * n];
        let mut active: Vec<usize> = (0..p * n).collect();
        for step in 0..cfg.max_new_tokens {
            let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let mut keep = Vec::with_capacity(active.len());
            let mut next = Vec::with_capacity(active.len());
            for (r, &out) in active.iter().enumerate() {
                let tok = sample_token(&rows[r], cfg, rng)?;
                outs[out].push(tok);
                if !stop.contains(&tok) {
                    keep.push(r);
                    next.push(tok);
                }
            }
            if keep.is_empty() || step + 1 == cfg.max_new_tokens {
                break;
            }
            if keep.len() < active.len() {
                cache.select_rows(&keep)?;
                active = keep.iter().map(|&r| active[r]).collect();
            }
            let ids = Tensor::from_vec(next, (active.len(), 1), &dev)?;
            logits = self.forward_cached(&ids, None, &mut cache)?.squeeze(1)?;
        }
        Ok(outs)
    }

    /// Checks that every sequence is non-empty and inside the vocabulary.
    pub(crate) fn check_ids(&self, what: &'static str, seqs: &[&[u32]]) -> Result<()> {
        let vocab = self.config().vocab_size;
        for (row, s) in seqs.iter().enumerate() {
            if s.is_empty() {
                return Err(Error::Empty(what));
            }
            if let Some(&bad) = s.iter().find(|&&t| t as usize >= vocab) {
                return Err(Error::IndexOutOfRange {
                    what,
                    row,
                    value: bad as usize,
                    bound: vocab,
                    of: "tokens in the vocabulary",
                });
            }
        }
        Ok(())
    }
}

/// Draws one token from a row of logits under `cfg` (greedy when `temperature == 0`).
///
/// Candidates are the `top_k` largest logits (all when 0); probabilities are
/// `softmax(logits / temperature)` over them; top-p keeps the most likely prefix whose mass
/// reaches `top_p`. One uniform is drawn from `rng` unless greedy. Ties break towards the
/// lower token id. NaN logits count as impossible; a row with no possible token is an error.
pub fn sample_token(logits: &[f32], cfg: &SamplingConfig, rng: &mut StdRng) -> Result<u32> {
    let key = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    if cfg.temperature == 0.0 {
        let mut best = 0usize;
        for (i, &x) in logits.iter().enumerate() {
            if key(x) > key(logits[best]) {
                best = i;
            }
        }
        return Ok(best as u32);
    }
    // Descending by logit, ascending by id among equals.
    let by_logit = |a: &u32, b: &u32| {
        key(logits[*b as usize])
            .total_cmp(&key(logits[*a as usize]))
            .then(a.cmp(b))
    };
    let mut cand: Vec<u32> = (0..logits.len() as u32).collect();
    if cfg.top_k > 0 && cfg.top_k < cand.len() {
        cand.select_nth_unstable_by(cfg.top_k - 1, by_logit);
        cand.truncate(cfg.top_k);
    }
    let max = cand
        .iter()
        .map(|&i| key(logits[i as usize]))
        .fold(f32::NEG_INFINITY, f32::max);
    if max.is_infinite() {
        return Err(Error::Candle(candle_core::Error::Msg(format!(
            "cannot sample from logits whose maximum is {max}"
        ))));
    }
    let inv_t = 1.0 / cfg.temperature;
    if cfg.top_p < 1.0 {
        cand.sort_unstable_by(by_logit);
    } else {
        cand.sort_unstable();
    }
    let mut probs: Vec<f64> = cand
        .iter()
        .map(|&i| ((key(logits[i as usize]) - max) as f64 * inv_t).exp())
        .collect();
    if cfg.top_p < 1.0 {
        let total: f64 = probs.iter().sum();
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (j, q) in probs.iter().enumerate() {
            acc += q;
            if acc >= cfg.top_p * total {
                keep = j + 1;
                break;
            }
        }
        probs.truncate(keep);
        cand.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let u = rng.random::<f64>() * total;
    let mut acc = 0.0;
    for (j, q) in probs.iter().enumerate() {
        acc += q;
        if u < acc {
            return Ok(cand[j]);
        }
    }
    // Rounding left `u` at the very top: take the last candidate with mass.
    let j = probs.iter().rposition(|&q| q > 0.0).unwrap_or(0);
    Ok(cand[j])
}
