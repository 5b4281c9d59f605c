//! [`TextReward`]: a reward function over text for a language-model policy.
//!
//! An [`LmPolicy`]'s prompts and completions are token ids; most rewards are about text.
//! [`TextReward`] decodes both with the policy's tokenizer and hands the text to a closure,
//! so a reward is written as TRL's are, over strings:
//!
//! - the **completion** is decoded without special tokens (TRL decodes `completions` with
//!   `skip_special_tokens=True`): a completion ending in `<|im_end|>` is its text alone;
//! - the **prompt** is decoded with its special tokens: the exact text the model was
//!   prompted with, chat template included (TRL hands a standard-format reward the prompt
//!   string it tokenised). Its decoding is cached across the `G` completions of a prompt.

use super::policy::LmPolicy;
use super::tokenizer::{self, Tokenizer};
use crate::{Error, GroupKey, Result, RewardFn};

/// A [`RewardFn`] over token ids that scores the decoded text with
/// `f(prompt: &str, completion: &str, group: &GroupKey) -> f32`.
///
/// ```
/// use pgrpo::lm::{LmPolicy, TextReward};
/// use pgrpo::{GroupKey, RewardFn};
/// # fn run(policy: &LmPolicy) -> pgrpo::Result<()> {
/// // 1 when the answer mentions jazz.
/// let mut reward = TextReward::new(policy, |_prompt: &str, completion: &str, _g: &GroupKey| {
///     completion.to_lowercase().contains("jazz") as u8 as f32
/// })?
/// .with_name("jazz");
/// let prompt = policy.chat_prompt("Recommend some music.")?;
/// let completion = policy.encode("Try jazz.<|im_end|>")?;
/// assert_eq!(reward.score(&prompt, &completion, &GroupKey::from("all"))?, 1.0);
/// # Ok(())
/// # }
/// ```
pub struct TextReward<F> {
    tokenizer: Tokenizer,
    f: F,
    name: String,
    last_prompt: Option<(Vec<u32>, String)>,
}

impl<F> TextReward<F>
where
    F: FnMut(&str, &str, &GroupKey) -> f32,
{
    /// A text reward decoding with `policy`'s tokenizer (a clone of it: the reward does not
    /// borrow the policy). Named `"reward"` until [`with_name`](Self::with_name).
    ///
    /// # Errors
    /// [`Error::Tokenizer`] when the policy has no tokenizer.
    pub fn new(policy: &LmPolicy, f: F) -> Result<Self> {
        let tokenizer = policy
            .tokenizer()
            .ok_or_else(|| Error::Tokenizer("TextReward needs a policy with a tokenizer".into()))?
            .clone();
        Ok(Self::from_tokenizer(tokenizer, f))
    }

    /// A text reward decoding with `tokenizer`.
    pub fn from_tokenizer(tokenizer: Tokenizer, f: F) -> Self {
        Self {
            tokenizer,
            f,
            name: "reward".into(),
            last_prompt: None,
        }
    }

    /// Sets the name used in metrics (`rewards/<name>`).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

impl<F> RewardFn<Vec<u32>, Vec<u32>> for TextReward<F>
where
    F: FnMut(&str, &str, &GroupKey) -> f32,
{
    fn score(&mut self, prompt: &Vec<u32>, completion: &Vec<u32>, group: &GroupKey) -> Result<f32> {
        let c = tokenizer::decode(&self.tokenizer, completion, true)?;
        if !matches!(&self.last_prompt, Some((ids, _)) if ids == prompt) {
            let text = tokenizer::decode(&self.tokenizer, prompt, false)?;
            self.last_prompt = Some((prompt.clone(), text));
        }
        let p = self.last_prompt.as_ref().map_or("", |(_, t)| t.as_str());
        Ok((self.f)(p, &c, group))
    }

    fn name(&self) -> &str {
        &self.name
    }
}
