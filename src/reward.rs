//! Reward functions: score a completion for a prompt and its preference group.

use crate::{Error, GroupKey, Result};

/// Scores one completion. `group` is the prompt's preference-group label, so one reward
/// function can serve every group (a persona's rules, a user cluster's taste).
///
/// Any closure `FnMut(&P, &C, &GroupKey) -> f32` is a reward function:
///
/// ```
/// use pgrpo::{GroupKey, RewardFn};
/// let mut r = |_p: &u32, c: &u32, g: &GroupKey| if *c == 1 && g == &GroupKey::from("a") { 1.0 } else { 0.0 };
/// assert_eq!(r.score(&0, &1, &"a".into())?, 1.0);
/// # Ok::<(), pgrpo::Error>(())
/// ```
///
/// A non-finite score is passed on as is: the advantage computation rejects it (or treats it
/// as missing, see [`NonFinitePolicy`](crate::advantage::NonFinitePolicy)). Return an error
/// ([`Error::Reward`]) for a failure that should stop training.
pub trait RewardFn<P, C> {
    /// The reward of `completion` for `prompt` in preference group `group`.
    fn score(&mut self, prompt: &P, completion: &C, group: &GroupKey) -> Result<f32>;

    /// A short name for metrics (`rewards/<name>`).
    fn name(&self) -> &str {
        "reward"
    }

    /// State to save in a checkpoint (`reward_state.json`) so that a resumed run scores
    /// exactly as an uninterrupted one would: e.g. a noise generator's seed and position.
    /// The default, `None`, means "no state": right for pure functions of their inputs.
    /// A closure that owns a generator has state it cannot report: wrap it in a struct that
    /// implements this (see [`BanditReward`](crate::tasks::bandit::BanditReward)).
    ///
    /// # Errors
    /// Whatever capturing the state can raise.
    fn state(&self) -> Result<Option<serde_json::Value>> {
        Ok(None)
    }

    /// Restores a state returned by [`state`](Self::state). Called once, before the first
    /// step of a resumed run, only when the checkpoint holds a reward state. The default
    /// refuses: a state was saved that this function cannot take back.
    ///
    /// # Errors
    /// [`Error::Reward`] when the state is not this function's or is invalid.
    fn restore(&mut self, state: serde_json::Value) -> Result<()> {
        let _ = state;
        Err(Error::Reward(format!(
            "the checkpoint holds a reward state but `{}` cannot restore one",
            self.name()
        )))
    }
}

impl<P, C, F> RewardFn<P, C> for F
where
    F: FnMut(&P, &C, &GroupKey) -> f32,
{
    fn score(&mut self, prompt: &P, completion: &C, group: &GroupKey) -> Result<f32> {
        Ok(self(prompt, completion, group))
    }
}

/// A weighted sum of several reward functions, `R = Σ_k w_k R_k` (TRL's `reward_weights`).
///
/// ```
/// use pgrpo::reward::WeightedRewards;
/// use pgrpo::{GroupKey, RewardFn};
/// let mut r = WeightedRewards::new()
///     .with("len", 0.5, |_p: &u32, c: &u32, _g: &GroupKey| *c as f32)
///     .with("one", 2.0, |_p: &u32, _c: &u32, _g: &GroupKey| 1.0);
/// assert_eq!(r.score(&0, &4, &0u32.into())?, 4.0);
/// # Ok::<(), pgrpo::Error>(())
/// ```
pub struct WeightedRewards<P, C> {
    parts: Vec<WeightedPart<P, C>>,
    last: Vec<f32>,
}

/// A named, weighted part of a [`WeightedRewards`].
type WeightedPart<P, C> = (String, f32, Box<dyn RewardFn<P, C>>);

impl<P, C> Default for WeightedRewards<P, C> {
    fn default() -> Self {
        Self {
            parts: Vec::new(),
            last: Vec::new(),
        }
    }
}

impl<P, C> WeightedRewards<P, C> {
    /// No parts yet (scores 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a part with a name and a weight.
    pub fn with(mut self, name: &str, weight: f32, f: impl RewardFn<P, C> + 'static) -> Self {
        self.parts.push((name.to_owned(), weight, Box::new(f)));
        self
    }

    /// The unweighted score of each part for the last completion scored.
    pub fn last_parts(&self) -> impl Iterator<Item = (&str, f32)> + '_ {
        self.parts
            .iter()
            .zip(&self.last)
            .map(|((n, _, _), &v)| (n.as_str(), v))
    }
}

impl<P, C> RewardFn<P, C> for WeightedRewards<P, C> {
    fn score(&mut self, prompt: &P, completion: &C, group: &GroupKey) -> Result<f32> {
        self.last.clear();
        let mut total = 0.0;
        for (_, w, f) in &mut self.parts {
            let v = f.score(prompt, completion, group)?;
            self.last.push(v);
            total += *w * v;
        }
        Ok(total)
    }

    fn name(&self) -> &str {
        "weighted"
    }

    /// `{"parts": [state or null, …]}`, one entry per part; `None` when no part has state.
    fn state(&self) -> Result<Option<serde_json::Value>> {
        let parts = self
            .parts
            .iter()
            .map(|(_, _, f)| Ok(f.state()?.unwrap_or(serde_json::Value::Null)))
            .collect::<Result<Vec<_>>>()?;
        if parts.iter().all(serde_json::Value::is_null) {
            return Ok(None);
        }
        Ok(Some(serde_json::json!({ "parts": parts })))
    }

    fn restore(&mut self, state: serde_json::Value) -> Result<()> {
        let parts = state
            .get("parts")
            .and_then(|p| p.as_array())
            .filter(|p| p.len() == self.parts.len())
            .ok_or_else(|| {
                Error::Reward(format!(
                    "weighted reward state must be {{\"parts\": [...]}} with {} entries",
                    self.parts.len()
                ))
            })?
            .clone();
        for ((name, _, f), s) in self.parts.iter_mut().zip(parts) {
            if !s.is_null() {
                f.restore(s)
                    .map_err(|e| Error::Reward(format!("part `{name}`: {e}")))?;
            }
        }
        Ok(())
    }
}
