//! Reference [`Policy`](crate::Policy) implementations over discrete actions.
//!
//! - [`TabularPolicy`]: a softmax over actions with a shared logit vector plus one row of logits
//!   per context (e.g. per preference group), the contextual-bandit policy of the examples.
//! - [`MlpPolicy`]: a one-hidden-layer MLP from context features to action logits.
//!
//! Both are one-step policies: a completion is a single action, so log-probs are `(B, 1)`.
//! Both initialise from a seed and sample with the caller's `StdRng`: a seed fixes the run.

mod mlp;
mod tabular;

pub use mlp::MlpPolicy;
pub use tabular::TabularPolicy;

use candle_core::{Tensor, D};
use rand::{rngs::StdRng, Rng};

use crate::{Result, TokenLogProbs};

/// Draws `n` actions per row of `probs` `(B, A)` by inverse CDF with `rng` (row-major).
pub(crate) fn sample_rows(probs: &Tensor, n: usize, rng: &mut StdRng) -> Result<Vec<u32>> {
    let probs = probs.to_vec2::<f32>()?;
    let mut out = Vec::with_capacity(probs.len() * n);
    for row in &probs {
        for _ in 0..n {
            out.push(sample_categorical(row, rng.random::<f64>()));
        }
    }
    Ok(out)
}

/// The index `i` with `cdf[i-1] <= u < cdf[i]` (the last index if rounding leaves `u` above the
/// total).
pub(crate) fn sample_categorical(probs: &[f32], u: f64) -> u32 {
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    let target = u * total;
    let mut acc = 0.0;
    for (i, &p) in probs.iter().enumerate() {
        acc += p as f64;
        if target < acc {
            return i as u32;
        }
    }
    probs.len().saturating_sub(1) as u32
}

/// Log-probs `(B, 1)` of `actions` under `logits` `(B, A)`, with mask and entropy.
pub(crate) fn action_log_probs(logits: &Tensor, actions: &[u32]) -> Result<TokenLogProbs> {
    let (b, a) = logits.dims2()?;
    if actions.len() != b {
        return Err(crate::Error::LengthMismatch {
            what: "completions",
            got: actions.len(),
            against: "prompts",
            expected: b,
        });
    }
    if let Some(row) = actions.iter().position(|&x| x as usize >= a) {
        return Err(crate::Error::IndexOutOfRange {
            what: "completions",
            row,
            value: actions[row] as usize,
            bound: a,
            of: "actions",
        });
    }
    let logp_all = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let idx = Tensor::from_slice(actions, (b, 1), logits.device())?;
    let logp = logp_all.gather(&idx, 1)?;
    let lp = logp_all.detach();
    let entropy = lp.exp()?.mul(&lp)?.sum_keepdim(1)?.neg()?;
    Ok(TokenLogProbs {
        mask: logp.ones_like()?.detach(),
        logp,
        entropy: Some(entropy),
    })
}
