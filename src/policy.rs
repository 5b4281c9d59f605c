//! The [`Policy`] trait: what the trainer needs from a model.
//!
//! A policy samples completions for prompts and scores given completions with per-token
//! log-probabilities. It knows nothing about rewards, advantages or optimizers.
//!
//! # Implementing `Policy` for your own model
//!
//! A one-step "completion" (a bandit arm) over a table of logits: the whole trait in ~40 lines.
//!
//! ```
//! use candle_core::{DType, Device, Tensor, Var, D};
//! use pgrpo::{Policy, Result, TokenLogProbs};
//! use rand::{rngs::StdRng, Rng, SeedableRng};
//!
//! /// Logits over 3 actions, one row per context.
//! struct Arms { logits: Var }
//!
//! impl Policy for Arms {
//!     type Prompt = u32;       // a context id
//!     type Completion = u32;   // an action id
//!
//!     fn device(&self) -> &Device { self.logits.device() }
//!
//!     fn sample(&self, prompts: &[u32], n: usize, rng: &mut StdRng) -> Result<Vec<u32>> {
//!         let probs = candle_nn::ops::softmax_last_dim(self.logits.as_tensor())?.to_vec2::<f32>()?;
//!         let mut out = Vec::with_capacity(prompts.len() * n);
//!         for &p in prompts {
//!             for _ in 0..n {
//!                 let u: f32 = rng.random();
//!                 let (mut acc, mut a) = (0.0, probs[p as usize].len() - 1);
//!                 for (i, q) in probs[p as usize].iter().enumerate() {
//!                     acc += q;
//!                     if u < acc { a = i; break; }
//!                 }
//!                 out.push(a as u32);
//!             }
//!         }
//!         Ok(out)
//!     }
//!
//!     fn log_probs(&self, prompts: &[&u32], completions: &[u32]) -> Result<TokenLogProbs> {
//!         let dev = self.device();
//!         let rows = Tensor::new(prompts.iter().map(|p| **p).collect::<Vec<_>>(), dev)?;
//!         let logp = candle_nn::ops::log_softmax(&self.logits.as_tensor().index_select(&rows, 0)?, D::Minus1)?;
//!         let idx = Tensor::new(completions, dev)?.unsqueeze(1)?;
//!         let logp = logp.gather(&idx, 1)?;                       // (B, 1)
//!         Ok(TokenLogProbs { mask: logp.ones_like()?, logp, entropy: None })
//!     }
//!
//!     fn vars(&self) -> Vec<Var> { vec![self.logits.clone()] }
//!
//!     fn snapshot(&self) -> Result<Self> {
//!         Ok(Arms { logits: Var::from_tensor(&self.logits.as_tensor().copy()?)? })
//!     }
//! }
//!
//! let policy = Arms { logits: Var::zeros((2, 3), DType::F32, &Device::Cpu)? };
//! let acts = policy.sample(&[0, 1], 4, &mut StdRng::seed_from_u64(0))?;
//! let lp = policy.log_probs(&[&0, &0, &0, &0, &1, &1, &1, &1], &acts)?;
//! assert_eq!(lp.logp.dims(), &[8, 1]);
//! # Ok::<(), pgrpo::Error>(())
//! ```

use candle_core::{Device, Tensor, Var};
use rand::rngs::StdRng;

use crate::Result;

/// Per-token log-probabilities of a batch of completions.
#[derive(Debug, Clone)]
pub struct TokenLogProbs {
    /// `(B, T)` `f32` log π(o_t | q, o_<t); differentiable w.r.t. the policy's vars when
    /// returned by [`Policy::log_probs`]. Padding positions may hold any finite value.
    pub logp: Tensor,
    /// `(B, T)` `f32`, 1 for completion tokens and 0 for padding.
    pub mask: Tensor,
    /// Optional `(B, T)` per-token entropy of the policy's distribution (detached), for the
    /// `entropy` metric.
    pub entropy: Option<Tensor>,
}

impl TokenLogProbs {
    /// A copy cut from the autograd graph.
    pub fn detach(&self) -> Self {
        Self {
            logp: self.logp.detach(),
            mask: self.mask.detach(),
            entropy: self.entropy.as_ref().map(Tensor::detach),
        }
    }
}

/// A stochastic policy over completions, trainable through its candle [`Var`]s.
///
/// Completions are returned and consumed **row-major**: for prompts `[p0, p1]` and `n = 2`,
/// `sample` returns `[c(p0), c(p0), c(p1), c(p1)]`.
pub trait Policy {
    /// What a completion is generated for (a context id, a token sequence, …).
    type Prompt;
    /// One sampled completion (an action, a token sequence, …).
    type Completion: Clone;

    /// The device the policy's tensors live on.
    fn device(&self) -> &Device;

    /// Samples `n` completions for every prompt (row-major), drawing all randomness from `rng`
    /// so that a seed fixes the result.
    fn sample(
        &self,
        prompts: &[Self::Prompt],
        n: usize,
        rng: &mut StdRng,
    ) -> Result<Vec<Self::Completion>>;

    /// Differentiable per-token log-probs of `completions[i]` given `prompts[i]`
    /// (`prompts.len() == completions.len() == B`).
    fn log_probs(
        &self,
        prompts: &[&Self::Prompt],
        completions: &[Self::Completion],
    ) -> Result<TokenLogProbs>;

    /// Log-probs without gradient (old and reference log-probs). The default detaches
    /// [`log_probs`](Self::log_probs); override it with a faster no-graph path.
    fn log_probs_detached(
        &self,
        prompts: &[&Self::Prompt],
        completions: &[Self::Completion],
    ) -> Result<TokenLogProbs> {
        Ok(self.log_probs(prompts, completions)?.detach())
    }

    /// [`sample`](Self::sample), plus the sampled completions' log-probs when the sampler
    /// has them at no extra cost: the same `(B, T)` `logp` and `mask` (no `entropy`) that
    /// [`log_probs_detached`](Self::log_probs_detached) would return for these completions
    /// given their prompts (row `i·n + j` is the `j`-th completion of `prompts[i]`), up to
    /// float rounding. The trainer uses them as the old log-probs of `num_iterations > 1`
    /// instead of a forward pass. The same seed must give the same completions as
    /// [`sample`](Self::sample).
    ///
    /// The default returns `(self.sample(..), None)`: the trainer then scores the
    /// completions itself.
    #[allow(clippy::type_complexity)]
    fn sample_with_log_probs(
        &self,
        prompts: &[Self::Prompt],
        n: usize,
        rng: &mut StdRng,
    ) -> Result<(Vec<Self::Completion>, Option<TokenLogProbs>)> {
        Ok((self.sample(prompts, n, rng)?, None))
    }

    /// Whether `completion` was cut by the generation budget
    /// ([`max_completion_len`](Self::max_completion_len)) instead of ending on its own (with
    /// an end-of-sequence token): TRL's `mask_truncated_completions` leaves such completions
    /// out of the loss. The default, `false`, suits policies whose completions cannot be cut.
    fn is_truncated(&self, completion: &Self::Completion) -> bool {
        let _ = completion;
        false
    }

    /// The generation budget: the most tokens a completion can have (TRL's
    /// `max_completion_length`; the constant of Dr. GRPO's loss normalisation). `None`
    /// (the default) when the policy has no such bound.
    fn max_completion_len(&self) -> Option<usize> {
        None
    }

    /// What the trainable [`vars`](Self::vars) are relative to, when they are not the whole
    /// model: trainer checkpoints record it (`policy.json`) and
    /// [`Trainer::resume`](crate::Trainer::resume) refuses a policy whose identity differs
    /// (typed [`Error::Checkpoint`](crate::Error::Checkpoint) naming the file), so that
    /// adapters are never resumed onto another base model. A LoRA
    /// `LmPolicy` returns its base weights' fingerprint. The default,
    /// `None`, records nothing (checkpoints that hold every weight need no identity).
    ///
    /// # Errors
    /// Whatever computing the identity fails with.
    fn checkpoint_identity(&self) -> Result<Option<serde_json::Value>> {
        Ok(None)
    }

    /// The trainable variables, in a fixed order.
    fn vars(&self) -> Vec<Var>;

    /// A frozen deep copy (own storage, not updated by the optimizer): the reference policy.
    fn snapshot(&self) -> Result<Self>
    where
        Self: Sized;
}
