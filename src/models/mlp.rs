//! A one-hidden-layer MLP policy from context features to action logits.

use candle_core::{Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::error::bail_config;
use crate::{Error, Policy, Result, TokenLogProbs};

/// `π(· | x) = softmax(W₂ tanh(W₁ x + b₁) + b₂)` for a feature vector `x` of length
/// `num_features`.
///
/// Weights are initialised uniformly in `±1/sqrt(fan_in)` from a seeded generator (the usual
/// PyTorch `Linear` range). The output layer is scaled down by 0.1 so the initial policy is
/// close to uniform while every weight still receives a gradient.
/// Prompts are feature vectors; completions are action ids.
///
/// ```
/// use pgrpo::{models::MlpPolicy, Policy};
/// use candle_core::Device;
/// use rand::{rngs::StdRng, SeedableRng};
/// let p = MlpPolicy::new(4, 16, 3, 0, &Device::Cpu)?;
/// let acts = p.sample(&[vec![1.0, 0.0, 0.0, 0.0]], 5, &mut StdRng::seed_from_u64(1))?;
/// assert_eq!(acts.len(), 5);
/// assert_eq!(p.vars().len(), 4);
/// # Ok::<(), pgrpo::Error>(())
/// ```
#[derive(Debug)]
pub struct MlpPolicy {
    w1: Var,
    b1: Var,
    w2: Var,
    b2: Var,
    device: Device,
}

impl MlpPolicy {
    /// A seeded MLP with `hidden` tanh units.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if a size is zero.
    pub fn new(
        num_features: usize,
        hidden: usize,
        num_actions: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        for (field, v) in [
            ("num_features", num_features),
            ("hidden", hidden),
            ("num_actions", num_actions),
        ] {
            if v == 0 {
                bail_config!(field, "must be at least 1");
            }
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut uniform = |len: usize, fan_in: usize| -> Vec<f32> {
            let bound = 1.0 / (fan_in as f32).sqrt();
            (0..len).map(|_| rng.random_range(-bound..bound)).collect()
        };
        let var = |v: Vec<f32>, shape: &[usize]| -> Result<Var> {
            Ok(Var::from_tensor(&Tensor::from_vec(v, shape, device)?)?)
        };
        Ok(Self {
            w1: var(
                uniform(hidden * num_features, num_features),
                &[num_features, hidden],
            )?,
            b1: var(uniform(hidden, num_features), &[hidden])?,
            w2: var(
                uniform(hidden * num_actions, hidden)
                    .iter()
                    .map(|w| 0.1 * w)
                    .collect(),
                &[hidden, num_actions],
            )?,
            b2: var(vec![0.0; num_actions], &[num_actions])?,
            device: device.clone(),
        })
    }

    /// Feature width.
    pub fn num_features(&self) -> usize {
        self.w1.dims()[0]
    }

    /// Number of actions.
    pub fn num_actions(&self) -> usize {
        self.w2.dims()[1]
    }

    fn features(&self, prompts: &[&Vec<f32>]) -> Result<Tensor> {
        let f = self.num_features();
        let mut flat = Vec::with_capacity(prompts.len() * f);
        for (row, p) in prompts.iter().enumerate() {
            if p.len() != f {
                return Err(Error::ShapeMismatch {
                    what: "prompt features",
                    expected: vec![f],
                    got: vec![p.len()],
                });
            }
            if let Some(v) = p.iter().find(|v| !v.is_finite()) {
                return Err(Error::InvalidConfig {
                    field: "prompts",
                    reason: format!("feature vector of row {row} holds a non-finite value {v}"),
                });
            }
            flat.extend_from_slice(p);
        }
        Ok(Tensor::from_vec(flat, (prompts.len(), f), &self.device)?)
    }

    /// `(B, A)` logits; `track = false` builds them from detached weights (no graph).
    pub fn logits(&self, prompts: &[&Vec<f32>], track: bool) -> Result<Tensor> {
        let x = self.features(prompts)?;
        let t = |v: &Var| {
            if track {
                v.as_tensor().clone()
            } else {
                v.as_tensor().detach()
            }
        };
        let h = x
            .matmul(&t(&self.w1))?
            .broadcast_add(&t(&self.b1))?
            .tanh()?;
        Ok(h.matmul(&t(&self.w2))?.broadcast_add(&t(&self.b2))?)
    }
}

impl Policy for MlpPolicy {
    type Prompt = Vec<f32>;
    type Completion = u32;

    fn device(&self) -> &Device {
        &self.device
    }

    fn sample(&self, prompts: &[Vec<f32>], n: usize, rng: &mut StdRng) -> Result<Vec<u32>> {
        let refs: Vec<&Vec<f32>> = prompts.iter().collect();
        let probs = candle_nn::ops::softmax_last_dim(&self.logits(&refs, false)?)?;
        super::sample_rows(&probs, n, rng)
    }

    fn log_probs(&self, prompts: &[&Vec<f32>], completions: &[u32]) -> Result<TokenLogProbs> {
        super::action_log_probs(&self.logits(prompts, true)?, completions)
    }

    fn log_probs_detached(
        &self,
        prompts: &[&Vec<f32>],
        completions: &[u32],
    ) -> Result<TokenLogProbs> {
        super::action_log_probs(&self.logits(prompts, false)?, completions)
    }

    fn vars(&self) -> Vec<Var> {
        vec![
            self.w1.clone(),
            self.b1.clone(),
            self.w2.clone(),
            self.b2.clone(),
        ]
    }

    fn snapshot(&self) -> Result<Self> {
        let copy = |v: &Var| -> Result<Var> { Ok(Var::from_tensor(&v.as_tensor().copy()?)?) };
        Ok(Self {
            w1: copy(&self.w1)?,
            b1: copy(&self.b1)?,
            w2: copy(&self.w2)?,
            b2: copy(&self.b2)?,
            device: self.device.clone(),
        })
    }
}
