//! A softmax policy over a table of logits: shared logits plus one row per context.

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::error::bail_config;
use crate::{Policy, Result, TokenLogProbs};

/// `π(a | c) = softmax(shared + table[c])_a` over `num_actions` actions.
///
/// The shared logits couple the contexts: a gradient from one context's samples moves every
/// context's policy, which is what lets a majority group pull a minority toward its preferred
/// action (the failure P-GRPO targets). With `shared = false` the contexts are independent.
///
/// Prompts are context ids (`u32 < num_contexts`); completions are action ids.
///
/// ```
/// use pgrpo::{models::TabularPolicy, Policy};
/// use candle_core::Device;
/// let p = TabularPolicy::new(3, 4, true, &Device::Cpu)?;
/// assert_eq!(p.probs()?[2], vec![0.25; 4]); // zero-initialised: uniform
/// assert_eq!(p.vars().len(), 2);
/// # Ok::<(), pgrpo::Error>(())
/// ```
#[derive(Debug)]
pub struct TabularPolicy {
    shared: Option<Var>,
    table: Var,
    device: Device,
}

impl TabularPolicy {
    /// A uniform policy (all logits zero).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) if a size is zero.
    pub fn new(
        num_contexts: usize,
        num_actions: usize,
        shared: bool,
        device: &Device,
    ) -> Result<Self> {
        Self::with_init(num_contexts, num_actions, shared, 0.0, 0, device)
    }

    /// Logits drawn from `N(0, init_std²)` with a seeded generator.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) if a size is zero or `init_std`
    /// is negative or not finite.
    pub fn with_init(
        num_contexts: usize,
        num_actions: usize,
        shared: bool,
        init_std: f32,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if num_contexts == 0 {
            bail_config!("num_contexts", "must be at least 1");
        }
        if num_actions == 0 {
            bail_config!("num_actions", "must be at least 1");
        }
        if !(init_std.is_finite() && init_std >= 0.0) {
            bail_config!("init_std", "must be finite and >= 0, got {init_std}");
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut draw = |len: usize| -> Result<Vec<f32>> {
            if init_std == 0.0 {
                return Ok(vec![0.0; len]);
            }
            let normal = Normal::new(0.0, init_std).map_err(|e| crate::Error::InvalidConfig {
                field: "init_std",
                reason: e.to_string(),
            })?;
            Ok((0..len).map(|_| normal.sample(&mut rng)).collect())
        };
        let table = Var::from_tensor(&Tensor::from_vec(
            draw(num_contexts * num_actions)?,
            (num_contexts, num_actions),
            device,
        )?)?;
        let shared = if shared {
            Some(Var::from_tensor(&Tensor::from_vec(
                draw(num_actions)?,
                num_actions,
                device,
            )?)?)
        } else {
            None
        };
        Ok(Self {
            shared,
            table,
            device: device.clone(),
        })
    }

    /// Number of contexts.
    pub fn num_contexts(&self) -> usize {
        self.table.dims()[0]
    }

    /// Number of actions.
    pub fn num_actions(&self) -> usize {
        self.table.dims()[1]
    }

    /// `(C, A)` logits of every context (detached).
    pub fn logits(&self) -> Result<Tensor> {
        let t = self.table.as_tensor().detach();
        Ok(match &self.shared {
            Some(s) => t.broadcast_add(&s.as_tensor().detach())?,
            None => t,
        })
    }

    /// Action probabilities of every context, `probs()[c][a] = π(a | c)`.
    pub fn probs(&self) -> Result<Vec<Vec<f32>>> {
        Ok(candle_nn::ops::softmax_last_dim(&self.logits()?)?.to_vec2::<f32>()?)
    }

    fn context_ids(&self, prompts: impl Iterator<Item = u32>) -> Result<Tensor> {
        let c = self.num_contexts();
        let ids: Vec<u32> = prompts.collect();
        if let Some(row) = ids.iter().position(|&p| p as usize >= c) {
            return Err(crate::Error::IndexOutOfRange {
                what: "prompts",
                row,
                value: ids[row] as usize,
                bound: c,
                of: "contexts",
            });
        }
        let n = ids.len();
        Ok(Tensor::from_vec(ids, n, &self.device)?)
    }

    fn row_logits(&self, ids: &Tensor, track: bool) -> Result<Tensor> {
        let t = if track {
            self.table.as_tensor().clone()
        } else {
            self.table.as_tensor().detach()
        };
        let rows = t.index_select(ids, 0)?;
        Ok(match &self.shared {
            Some(s) => {
                let s = if track {
                    s.as_tensor().clone()
                } else {
                    s.as_tensor().detach()
                };
                rows.broadcast_add(&s)?
            }
            None => rows,
        })
    }
}

impl Policy for TabularPolicy {
    type Prompt = u32;
    type Completion = u32;

    fn device(&self) -> &Device {
        &self.device
    }

    fn sample(&self, prompts: &[u32], n: usize, rng: &mut StdRng) -> Result<Vec<u32>> {
        let ids = self.context_ids(prompts.iter().copied())?;
        let probs =
            candle_nn::ops::softmax_last_dim(&self.row_logits(&ids, false)?.to_dtype(DType::F32)?)?;
        super::sample_rows(&probs, n, rng)
    }

    fn log_probs(&self, prompts: &[&u32], completions: &[u32]) -> Result<TokenLogProbs> {
        let ids = self.context_ids(prompts.iter().map(|p| **p))?;
        super::action_log_probs(&self.row_logits(&ids, true)?, completions)
    }

    fn log_probs_detached(&self, prompts: &[&u32], completions: &[u32]) -> Result<TokenLogProbs> {
        let ids = self.context_ids(prompts.iter().map(|p| **p))?;
        super::action_log_probs(&self.row_logits(&ids, false)?, completions)
    }

    fn vars(&self) -> Vec<Var> {
        self.shared
            .iter()
            .cloned()
            .chain([self.table.clone()])
            .collect()
    }

    fn snapshot(&self) -> Result<Self> {
        let copy = |v: &Var| -> Result<Var> { Ok(Var::from_tensor(&v.as_tensor().copy()?)?) };
        Ok(Self {
            shared: self.shared.as_ref().map(copy).transpose()?,
            table: copy(&self.table)?,
            device: self.device.clone(),
        })
    }
}
