//! Batched autoregressive sampling with a KV cache: temperature, top-k, top-p, min-p,
//! repetition penalty, stop tokens; and the log-probs of the sampled tokens.
//!
//! # What is sampled, and what is scored
//!
//! A token is drawn, as `transformers`' `generate` draws it, from the model's logits `x`
//! after, in this order:
//!
//! 1. **repetition penalty** `r` (CTRL, Keskar et al. 2019; transformers'
//!    `RepetitionPenaltyLogitsProcessor`): for every token already in the prompt or the
//!    completion so far, `x ← x / r` if `x > 0`, else `x ← x · r`;
//! 2. **temperature** `T`: `softmax(x / T)` (`T = 0`: greedy argmax of the penalised logits);
//! 3. **top-k**, **top-p** and **min-p** (transformers' `MinPLogitsWarper`: drop the tokens
//!    whose probability is below `min_p` times the most likely token's) truncate the
//!    support; the draw is from the renormalised remainder.
//!
//! The policy's log-probs ([`LmPolicy`](super::LmPolicy)'s `log_probs`, `log_probs_detached`,
//! and the sampler's own, [`Llama::generate_with_log_probs`]) are those of the **tempered
//! model distribution** `log_softmax(x / T)` of step 2 with the raw logits, without the
//! penalty and without the truncation of step 3, as TRL scores them
//! (`_get_per_token_logps_and_entropies` divides by `temperature` and ignores `top_k`,
//! `top_p`, `min_p` and `repetition_penalty`). Why not the truncated distribution: its
//! support depends on the weights, so after an update a sampled token can fall outside it
//! (log-prob `−∞`, an infinite ratio) and the reference model's support differs from the
//! policy's (an infinite KL); the tempered distribution is smooth in the weights and gives
//! every token a finite log-prob. The price is that with truncation or a penalty the
//! "old" log-prob is not exactly the probability the token was drawn with; the clipped
//! ratio keeps the update bounded regardless. With `T = 0` (greedy) scoring uses `T = 1`.

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::model::{Grad, Llama};
use crate::error::bail_config;
use crate::{Error, Result};

/// How completions are sampled (TRL's `GRPOConfig` generation fields; transformers'
/// `GenerationConfig` semantics).
///
/// ```
/// let greedy = pgrpo::lm::SamplingConfig { temperature: 0.0, max_new_tokens: 16, ..Default::default() };
/// greedy.validate()?;
/// # Ok::<(), pgrpo::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    /// Maximum number of generated tokens per completion (the stop token included); the
    /// generation budget ([`Policy::max_completion_len`](crate::Policy::max_completion_len)).
    /// Default 64 (TRL's `max_completion_length` defaults to 256).
    pub max_new_tokens: usize,
    /// Softmax temperature: tokens are drawn from `softmax(logits / temperature)`, and
    /// log-probs are scored under the same distribution. `0` means greedy (argmax, no
    /// randomness drawn; scored at temperature 1). Default 1.0 (TRL's `temperature`).
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens before sampling; `0` keeps all. Default 0
    /// (TRL's `top_k`, whose `None`/0 disables it). Not applied when scoring.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability
    /// (after temperature and top-k) reaches `top_p`; `1.0` keeps all. Default 1.0 (TRL's
    /// `top_p`). Not applied when scoring.
    pub top_p: f64,
    /// Min-p sampling: keep only the tokens whose probability (after temperature) is at
    /// least `min_p` times the most likely token's; `0` keeps all. In `[0, 1]`. Default 0
    /// (TRL's `min_p`, whose `None` disables it; transformers' `MinPLogitsWarper`). Not
    /// applied when scoring.
    pub min_p: f64,
    /// Repetition penalty `r > 0` on the raw logits of every token already present in the
    /// prompt or the completion so far: positive logits are divided by `r`, negative ones
    /// multiplied by it (`r > 1` discourages repeats). `1.0` disables it. Default 1.0 (TRL's
    /// `repetition_penalty`; transformers' `RepetitionPenaltyLogitsProcessor`). Not applied
    /// when scoring.
    pub repetition_penalty: f64,
    /// Tokens that end a completion (kept as its last token). `None`: the model config's
    /// `eos_token_id`s. A completion that does not end with one was cut by
    /// `max_new_tokens` ([`Policy::is_truncated`](crate::Policy::is_truncated)).
    /// Default `None`.
    pub stop_tokens: Option<Vec<u32>>,
    /// Precision of the weight matrices read by the decode steps (opt-in `bf16`, see
    /// [`DecodePrecision`]). Default [`DecodePrecision::F32`]: the model's own weights, bit
    /// for bit the same tokens and log-probs as without this field.
    pub decode_weights: DecodePrecision,
}

/// Precision of the weight matrices read while decoding ([`SamplingConfig::decode_weights`]).
///
/// Decoding a few rows is a matrix-vector product per weight matrix, bound by reading the
/// weights from memory; `bf16` halves those bytes. With [`Bf16`](Self::Bf16),
/// [`Llama::generate`] rounds the projections and the LM head to `bf16` once per call
/// (nearest, ties to even; a pass over the weights, split over the cores) and every decode
/// step with at most 16 rows reads them in `bf16`, widened to `f32` per 16-lane tile inside
/// the skinny kernel, accumulating in `f32`. What stays `f32`: the prompt prefill (many rows,
/// compute-bound `gemm`, which `bf16` storage would not speed up), and so the first token;
/// steps with more than 16 rows (compute-bound too: they run `gemm` on the `f32` weights);
/// activations, the KV cache, the norms, the logits and the sampling itself.
///
/// **The choice for the update.** Tokens drawn under `Bf16` come from a slightly different
/// distribution than the `f32` policy's (logits differ by the bf16 rounding of the weights,
/// about 2⁻⁸ relative per weight), so their log-probs under the bf16 decode are not the
/// policy's. [`LmPolicy`](super::LmPolicy) therefore reports **no** sampler log-probs under
/// `Bf16` (`sample_with_log_probs` returns `None`): a trainer that needs old log-probs
/// (several optimizer updates per generation) recomputes them in `f32` with the policy's
/// own forward, and with one update per generation none are needed (old = detached
/// current). The tokens under a seed differ from [`F32`](Self::F32)'s once a rounding
/// difference flips a draw; [`Llama::generate_with_log_probs`] still returns the bf16
/// decode's own log-probs.
///
/// Applies on the CPU to `f32` models with the fused kernels ([`Kernels::Fused`] or
/// [`Kernels::FusedOps`]); elsewhere decoding reads the model's own weights. Serialised as
/// `"f32"` / `"bf16"`.
///
/// [`Kernels::Fused`]: super::Kernels::Fused
/// [`Kernels::FusedOps`]: super::Kernels::FusedOps
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecodePrecision {
    /// The model's own weights (default).
    #[default]
    F32,
    /// Weight matrices rounded to `bf16` once per `generate` call.
    Bf16,
}

impl Default for SamplingConfig {
    /// Plain sampling at temperature 1, up to 64 new tokens, stopping at the model's EOS.
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            stop_tokens: None,
            decode_weights: DecodePrecision::F32,
        }
    }
}

impl SamplingConfig {
    /// Checks the ranges: `max_new_tokens ≥ 1`, `temperature ≥ 0` and finite,
    /// `top_p ∈ (0, 1]`, `min_p ∈ [0, 1]`, `repetition_penalty > 0` and finite.
    /// (`decode_weights` has no invalid value; deserialising rejects unknown names.)
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
        if !(0.0..=1.0).contains(&self.min_p) {
            bail_config!("min_p", "must be in [0, 1], got {}", self.min_p);
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            bail_config!(
                "repetition_penalty",
                "must be finite and > 0 (1 disables it), got {}",
                self.repetition_penalty
            );
        }
        Ok(())
    }

    /// The temperature log-probs are scored at: `temperature`, or 1 for greedy
    /// (`temperature == 0`).
    pub fn scoring_temperature(&self) -> f64 {
        if self.temperature > 0.0 {
            self.temperature
        } else {
            1.0
        }
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
    /// result. With [`DecodePrecision::Bf16`] the decode steps of at most 16 rows read the
    /// weight matrices in `bf16` (converted once per call; see [`DecodePrecision`]).
    pub fn generate(
        &self,
        prompts: &[&[u32]],
        n: usize,
        cfg: &SamplingConfig,
        rng: &mut StdRng,
    ) -> Result<Vec<Vec<u32>>> {
        Ok(self.decode(prompts, n, cfg, rng, false)?.0)
    }

    /// [`generate`](Self::generate) (the same completions for the same seed), plus each
    /// sampled token's log-prob under the tempered model distribution,
    /// `log_softmax(logits / T)[token]` with `T` =
    /// [`scoring_temperature`](SamplingConfig::scoring_temperature), computed in `f32` from
    /// the very logits the token was drawn from (see the [module docs](self) for why the
    /// penalty and the truncation are left out). `log_probs[i].len() == completions[i].len()`.
    ///
    /// These equal [`token_log_probs_at`](Self::token_log_probs_at) of the same completions
    /// up to the rounding difference between the KV-cache decode and the full forward.
    #[allow(clippy::type_complexity)]
    pub fn generate_with_log_probs(
        &self,
        prompts: &[&[u32]],
        n: usize,
        cfg: &SamplingConfig,
        rng: &mut StdRng,
    ) -> Result<(Vec<Vec<u32>>, Vec<Vec<f32>>)> {
        let (outs, logp) = self.decode(prompts, n, cfg, rng, true)?;
        let logp = logp.unwrap_or_else(|| vec![Vec::new(); outs.len()]);
        Ok((outs, logp))
    }

    /// The decode loop of [`generate`](Self::generate); with `with_log_probs`, also the
    /// sampled tokens' log-probs.
    #[allow(clippy::type_complexity)]
    fn decode(
        &self,
        prompts: &[&[u32]],
        n: usize,
        cfg: &SamplingConfig,
        rng: &mut StdRng,
        with_log_probs: bool,
    ) -> Result<(Vec<Vec<u32>>, Option<Vec<Vec<f32>>>)> {
        cfg.validate()?;
        if prompts.is_empty() || n == 0 {
            return Ok((Vec::new(), with_log_probs.then(Vec::new)));
        }
        if self.has_adapters() {
            // LoRA: merge once, then decode exactly as the plain model does.
            return self
                .merged_shared()?
                .decode(prompts, n, cfg, rng, with_log_probs);
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
        let mut logps = vec![Vec::new(); if with_log_probs { p * n } else { 0 }];
        // The tokens seen by each row (prompt and completion so far), for the penalty.
        let mut seen: Vec<Seen> = if cfg.repetition_penalty != 1.0 {
            (0..p * n).map(|row| Seen::new(prompts[row / n])).collect()
        } else {
            Vec::new()
        };
        let inv_t =
            (cfg.scoring_temperature() != 1.0).then(|| (1.0 / cfg.scoring_temperature()) as f32);
        let mut active: Vec<usize> = (0..p * n).collect();
        // The bf16 copy of the weights, made at the first step that reads it.
        let mut bf16_model: Option<Option<Llama>> = None;
        for step in 0..cfg.max_new_tokens {
            let mut rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let mut keep = Vec::with_capacity(active.len());
            let mut next = Vec::with_capacity(active.len());
            for (r, &out) in active.iter().enumerate() {
                let row = &mut rows[r];
                // Scored on the raw logits (before the penalty), as `token_log_probs_at`.
                let lse = with_log_probs.then(|| crate::ops::row_log_sum_exp(row, inv_t));
                let mut raw = None;
                if let Some(s) = seen.get(out) {
                    if with_log_probs {
                        raw = Some(row.clone());
                    }
                    penalise(row, &s.0, cfg.repetition_penalty as f32);
                }
                let tok = sample_token(row, cfg, rng)?;
                if let Some(lse) = lse {
                    let x = raw.as_ref().unwrap_or(row)[tok as usize];
                    logps[out].push(crate::ops::row_log_prob(x, inv_t, lse));
                }
                if let Some(s) = seen.get_mut(out) {
                    s.insert(tok);
                }
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
            let bf16 = cfg.decode_weights == DecodePrecision::Bf16
                && active.len() <= crate::ops::SKINNY_ROWS;
            if bf16 && bf16_model.is_none() {
                bf16_model = Some(self.bf16_decoder()?);
            }
            let model = match (bf16, &bf16_model) {
                (true, Some(Some(m))) => m,
                _ => self,
            };
            logits = model.forward_cached(&ids, None, &mut cache)?.squeeze(1)?;
        }
        Ok((outs, with_log_probs.then_some(logps)))
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
/// reaches `top_p`; min-p then keeps the candidates with `p ≥ min_p · p_max`, i.e.
/// `exp((x − x_max) / T) ≥ min_p` (the most likely token always stays). One uniform is drawn
/// from `rng` unless greedy. Ties break towards the lower token id. NaN logits count as
/// impossible; a row with no possible token is an error.
///
/// The repetition penalty needs the row's history and is not applied here: `generate`
/// applies it to the logits first.
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
    if cfg.min_p > 0.0 {
        // Weights are relative to the most likely candidate (weight e^0 = 1).
        let mut j = 0;
        for i in 0..probs.len() {
            if probs[i] >= cfg.min_p {
                probs[j] = probs[i];
                cand[j] = cand[i];
                j += 1;
            }
        }
        probs.truncate(j);
        cand.truncate(j);
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

/// transformers' `RepetitionPenaltyLogitsProcessor` on one row: for every token in `seen`,
/// `x ← x / r` if `x > 0`, else `x ← x · r` (in `f32`, as transformers computes it).
fn penalise(row: &mut [f32], seen: &[u32], r: f32) {
    for &t in seen {
        if let Some(x) = row.get_mut(t as usize) {
            *x = if *x < 0.0 { *x * r } else { *x / r };
        }
    }
}

/// The distinct tokens of a row's prompt and completion so far, sorted.
struct Seen(Vec<u32>);

impl Seen {
    fn new(prompt: &[u32]) -> Self {
        let mut v = prompt.to_vec();
        v.sort_unstable();
        v.dedup();
        Seen(v)
    }

    fn insert(&mut self, t: u32) {
        if let Err(at) = self.0.binary_search(&t) {
            self.0.insert(at, t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn cfg(temperature: f64) -> SamplingConfig {
        SamplingConfig {
            temperature,
            ..Default::default()
        }
    }

    /// transformers' rule, by hand: 2 / 1.5, −1 · 1.5, 0 / 1.5 = 0; unseen tokens untouched.
    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let mut row = [2.0f32, -1.0, 0.0, 3.0, -4.0];
        penalise(&mut row, &Seen::new(&[1, 0, 2, 1]).0, 1.5);
        assert_eq!(row, [2.0 / 1.5, -1.5, 0.0, 3.0, -4.0]);
        let mut s = Seen::new(&[4, 2, 4]);
        s.insert(3);
        s.insert(2);
        assert_eq!(s.0, [2, 3, 4]);
    }

    /// Logits ln(0.5), ln(0.3), ln(0.15), ln(0.05) at T = 1: p / p_max = 1, 0.6, 0.3, 0.1.
    /// min_p = 0.25 keeps tokens 0–2 (0.1 < 0.25), min_p = 0.7 token 0 only. The kept set is
    /// checked by drawing many times: every kept token appears, no dropped one does, and the
    /// frequencies follow the renormalised probabilities.
    #[test]
    fn min_p_keeps_the_tokens_above_min_p_times_the_top_probability() {
        let logits: Vec<f32> = [0.5f64, 0.3, 0.15, 0.05]
            .iter()
            .map(|p| p.ln() as f32)
            .collect();
        let draws = |min_p: f64, temperature: f64| {
            let c = SamplingConfig {
                min_p,
                ..cfg(temperature)
            };
            let mut rng = StdRng::seed_from_u64(3);
            let mut counts = [0usize; 4];
            for _ in 0..20_000 {
                counts[sample_token(&logits, &c, &mut rng).unwrap() as usize] += 1;
            }
            counts
        };
        let c = draws(0.25, 1.0);
        assert_eq!(c[3], 0, "{c:?}");
        // Renormalised over {0, 1, 2}: 0.5 / 0.95 ≈ 0.526, 0.3 / 0.95 ≈ 0.316, 0.158.
        for (k, want) in [(0, 0.5 / 0.95), (1, 0.3 / 0.95), (2, 0.15 / 0.95)] {
            let got = c[k] as f64 / 20_000.0;
            assert!((got - want).abs() < 0.015, "token {k}: {got} vs {want}");
        }
        assert_eq!(draws(0.7, 1.0), [20_000, 0, 0, 0]);
        // At T = 2 the ratios are square roots: 1, 0.775, 0.548, 0.316; min_p = 0.5 keeps 0–2.
        let c = draws(0.5, 2.0);
        assert!(c[0] > 0 && c[1] > 0 && c[2] > 0 && c[3] == 0, "{c:?}");
        // min_p = 0 and min_p = 1e-9 (keeps everything) draw the same tokens as before.
        assert_eq!(draws(0.0, 1.0), draws(1e-9, 1.0));
    }

    #[test]
    fn validation_names_the_field() {
        let bad = [
            SamplingConfig {
                min_p: 1.5,
                ..Default::default()
            },
            SamplingConfig {
                min_p: -0.1,
                ..Default::default()
            },
            SamplingConfig {
                min_p: f64::NAN,
                ..Default::default()
            },
            SamplingConfig {
                repetition_penalty: 0.0,
                ..Default::default()
            },
            SamplingConfig {
                repetition_penalty: f64::INFINITY,
                ..Default::default()
            },
        ];
        let fields = [
            "min_p",
            "min_p",
            "min_p",
            "repetition_penalty",
            "repetition_penalty",
        ];
        for (c, f) in bad.iter().zip(fields) {
            match c.validate() {
                Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, f),
                other => panic!("{c:?}: {other:?}"),
            }
        }
        SamplingConfig {
            min_p: 1.0,
            repetition_penalty: 0.5,
            ..Default::default()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn serde_uses_defaults_and_rejects_unknown_fields() {
        let c: SamplingConfig = serde_json::from_str(r#"{"min_p": 0.1}"#).unwrap();
        assert_eq!(
            c,
            SamplingConfig {
                min_p: 0.1,
                ..Default::default()
            }
        );
        assert!(serde_json::from_str::<SamplingConfig>(r#"{"top_q": 0.1}"#).is_err());
    }

    /// A small model with O(1) random weights (so rounding them to bf16 shows in the
    /// logits).
    fn random_model(kernels: super::super::Kernels) -> Llama {
        use candle_core::{Device, Tensor};
        let config = super::super::LlamaConfig {
            hidden_size: 64,
            intermediate_size: 160,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            vocab_size: 300,
            tie_word_embeddings: true,
            ..Default::default()
        };
        let mut rng = StdRng::seed_from_u64(7);
        let model = Llama::new(config, &mut rng, &Device::Cpu, DType::F32)
            .unwrap()
            .with_kernels(kernels);
        for (name, var) in model.named_vars() {
            let dims = var.dims().to_vec();
            let n: usize = dims.iter().product();
            let a = if name.ends_with("norm.weight") {
                continue;
            } else {
                2.0 / (dims[dims.len() - 1] as f32).sqrt()
            };
            let data: Vec<f32> = (0..n).map(|_| rng.random_range(-a..a)).collect();
            var.set(&Tensor::from_vec(data, dims, &Device::Cpu).unwrap())
                .unwrap();
        }
        model
    }

    /// One decode step (5 rows after a shared prefill) with the bf16 copy against the f32
    /// model: logits within 2 % of their range (bf16 keeps 8 significant bits), and not
    /// equal (the bf16 weights are really read). The copy leaves the model untouched.
    #[test]
    fn bf16_decode_step_matches_f32_within_bf16_rounding() {
        use candle_core::{Device, Tensor};
        for kernels in [
            super::super::Kernels::Fused,
            super::super::Kernels::FusedOps,
        ] {
            let model = random_model(kernels);
            let before = model.tensors();
            let bf16 = model
                .bf16_decoder()
                .unwrap()
                .expect("applies on the CPU in f32");
            let mut cache = model.new_cache();
            let prompt = Tensor::new(&[[5u32, 9, 17, 30, 2]], &Device::Cpu).unwrap();
            model.forward_cached(&prompt, None, &mut cache).unwrap();
            cache.select_rows(&[0; 5]).unwrap();
            let step = Tensor::new(&[[1u32], [7], [250], [42], [99]], &Device::Cpu).unwrap();
            let logits = |m: &Llama| {
                let mut c = cache.clone();
                m.forward_cached(&step, None, &mut c)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let (f, b) = (logits(&model), logits(&bf16));
            let range = f.iter().fold(0f32, |m, x| m.max(x.abs()));
            let worst = f
                .iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(range > 1.0, "{range}");
            assert!(worst < 2e-2 * range, "{kernels:?}: {worst} of {range}");
            assert!(
                worst > 1e-5 * range,
                "{kernels:?}: bf16 weights not read ({worst})"
            );
            for (name, t) in model.tensors() {
                let same = (t - &before[&name])
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap();
                assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0, "{name}");
            }
        }
        // Where the skinny kernel does not run, there is no bf16 copy.
        let reference = random_model(super::super::Kernels::Reference);
        assert!(reference.bf16_decoder().unwrap().is_none());
    }

    #[test]
    fn decode_weights_round_trip_and_default_to_f32() {
        let c = SamplingConfig {
            decode_weights: DecodePrecision::Bf16,
            ..Default::default()
        };
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""decode_weights":"bf16""#), "{json}");
        assert_eq!(serde_json::from_str::<SamplingConfig>(&json).unwrap(), c);
        c.validate().unwrap();
        // A config written before the field existed loads with f32.
        let old: SamplingConfig = serde_json::from_str(r#"{"max_new_tokens": 8}"#).unwrap();
        assert_eq!(old.decode_weights, DecodePrecision::F32);
        assert_eq!(
            SamplingConfig::default().decode_weights,
            DecodePrecision::F32
        );
        let f32: SamplingConfig = serde_json::from_str(r#"{"decode_weights": "f32"}"#).unwrap();
        assert_eq!(f32, SamplingConfig::default());
        for bad in [
            r#"{"decode_weights": "fp8"}"#,
            r#"{"decode_weights": "BF16"}"#,
        ] {
            assert!(
                serde_json::from_str::<SamplingConfig>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn scoring_temperature_is_one_for_greedy() {
        assert_eq!(cfg(0.0).scoring_temperature(), 1.0);
        assert_eq!(cfg(0.7).scoring_temperature(), 0.7);
    }
}
