//! Reward functions: score a completion for a prompt and its preference group.
//!
//! A [`RewardFn`] scores one row ([`score`](RewardFn::score)) or a whole batch at once
//! ([`score_batch`](RewardFn::score_batch), for reward models and LLM judges that batch
//! their calls; the trainer always calls the batch form). Several functions combine with
//! [`WeightedRewards`], whose separate scores ([`score_parts`](RewardFn::score_parts),
//! `(N, F)`) reach the advantage computation: the weighted sum, or GDPO's
//! normalise-then-sum, P-GRPO with a history per (group, function)
//! ([`RewardAggregation`](crate::advantage::RewardAggregation)).

use crate::{Error, GroupKey, Result};

/// One row to score: a prompt, one of its completions, and the prompt's preference group.
#[derive(Debug)]
pub struct RewardInput<'a, P, C> {
    /// The prompt.
    pub prompt: &'a P,
    /// The completion.
    pub completion: &'a C,
    /// The prompt's preference group.
    pub group: &'a GroupKey,
}

impl<P, C> Clone for RewardInput<'_, P, C> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P, C> Copy for RewardInput<'_, P, C> {}

/// The name and weight of one reward function of a [`RewardFn`] (see
/// [`RewardFn::parts`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RewardPart {
    /// The function's name (metrics `rewards/<name>/mean`; distinct within one `RewardFn`).
    pub name: String,
    /// Its weight in the combined reward `R = Σ_f w_f r_f` (TRL's `reward_weights`).
    pub weight: f32,
}

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

    /// A short name for metrics (`rewards/<name>/mean`, `rewards/<name>/std`).
    fn name(&self) -> &str {
        "reward"
    }

    /// The rewards of a batch of rows, in row order (`(N,)`): what the trainer calls, once
    /// per step with every row it sampled. Override it to score many rows in one call (a
    /// reward model's forward pass over a batch, one request to an LLM judge). The default
    /// calls [`score`](Self::score) row by row.
    ///
    /// ```
    /// use pgrpo::reward::RewardInput;
    /// use pgrpo::{GroupKey, RewardFn, Result};
    ///
    /// /// Counts its calls: a stand-in for a reward model that batches.
    /// struct Judge { calls: usize }
    ///
    /// impl RewardFn<String, String> for Judge {
    ///     fn score(&mut self, p: &String, c: &String, g: &GroupKey) -> Result<f32> {
    ///         let row = RewardInput { prompt: p, completion: c, group: g };
    ///         Ok(self.score_batch(&[row])?[0])
    ///     }
    ///     fn score_batch(&mut self, rows: &[RewardInput<'_, String, String>]) -> Result<Vec<f32>> {
    ///         self.calls += 1; // one model call for the whole batch
    ///         Ok(rows.iter().map(|r| r.completion.len() as f32).collect())
    ///     }
    /// }
    ///
    /// let (p, g) = ("q".to_string(), GroupKey::from("a"));
    /// let cs = ["ab".to_string(), "abc".to_string()];
    /// let rows: Vec<_> = cs.iter().map(|c| RewardInput { prompt: &p, completion: c, group: &g }).collect();
    /// let mut judge = Judge { calls: 0 };
    /// assert_eq!(judge.score_batch(&rows)?, [2.0, 3.0]);
    /// assert_eq!(judge.calls, 1);
    /// # Ok::<(), pgrpo::Error>(())
    /// ```
    ///
    /// # Errors
    /// The first error of [`score`](Self::score) (default), or the batch call's. Return
    /// exactly one reward per row: the trainer refuses another count
    /// ([`Error::LengthMismatch`]).
    fn score_batch(&mut self, rows: &[RewardInput<'_, P, C>]) -> Result<Vec<f32>> {
        rows.iter()
            .map(|r| self.score(r.prompt, r.completion, r.group))
            .collect()
    }

    /// The reward functions this one is made of, with their weights: `F` entries, in the
    /// order of [`score_parts`](Self::score_parts)'s columns. The default is this function
    /// alone, weight 1 ([`WeightedRewards`] lists its parts).
    fn parts(&self) -> Vec<RewardPart> {
        vec![RewardPart {
            name: self.name().to_owned(),
            weight: 1.0,
        }]
    }

    /// Each function's unweighted score of each row, `(N, F)` row-major (row `i`'s score
    /// from function `f` at `i * F + f`), `F = parts().len()`. The trainer calls this (the
    /// default is [`score_batch`](Self::score_batch), `F = 1`), combines the columns with
    /// the weights into the reward `R = Σ_f w_f r_f`, and, under
    /// [`RewardAggregation::NormalizeThenSum`](crate::advantage::RewardAggregation),
    /// normalises each column on its own.
    ///
    /// # Errors
    /// As [`score_batch`](Self::score_batch).
    fn score_parts(&mut self, rows: &[RewardInput<'_, P, C>]) -> Result<Vec<f32>> {
        self.score_batch(rows)
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

/// A weighted sum of several reward functions, `R = Σ_k w_k R_k` (TRL's `reward_functions`
/// with `reward_weights`). Its [`parts`](RewardFn::parts) and
/// [`score_parts`](RewardFn::score_parts) give the trainer each function's score, so that
/// `advantage.reward_aggregation` can normalise them separately and the metrics report
/// `rewards/<name>/mean` and `rewards/<name>/std` per function; each part is scored with its
/// own [`score_batch`](RewardFn::score_batch).
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

    /// The weighted sums of [`score_parts`](RewardFn::score_parts) (the same bits as
    /// [`score`](RewardFn::score) row by row).
    fn score_batch(&mut self, rows: &[RewardInput<'_, P, C>]) -> Result<Vec<f32>> {
        let scores = self.score_parts(rows)?;
        let f = self.parts.len().max(1);
        Ok(scores
            .chunks(f)
            .map(|row| {
                row.iter()
                    .zip(&self.parts)
                    .fold(0f32, |t, (&v, (_, w, _))| t + *w * v)
            })
            .collect())
    }

    fn parts(&self) -> Vec<RewardPart> {
        self.parts
            .iter()
            .map(|(name, weight, _)| RewardPart {
                name: name.clone(),
                weight: *weight,
            })
            .collect()
    }

    /// Each part's [`score_batch`](RewardFn::score_batch), interleaved into `(N, F)`.
    fn score_parts(&mut self, rows: &[RewardInput<'_, P, C>]) -> Result<Vec<f32>> {
        let (n, f) = (rows.len(), self.parts.len());
        let mut out = vec![0f32; n * f];
        for (j, (name, _, part)) in self.parts.iter_mut().enumerate() {
            let v = part.score_batch(rows)?;
            if v.len() != n {
                return Err(Error::Reward(format!(
                    "part `{name}` returned {} rewards for {n} rows",
                    v.len()
                )));
            }
            for (i, x) in v.into_iter().enumerate() {
                out[i * f + j] = x;
            }
        }
        if n > 0 {
            self.last = out[(n - 1) * f..].to_vec();
        }
        Ok(out)
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
