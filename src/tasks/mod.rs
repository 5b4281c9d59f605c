//! The experiment tasks of the examples and tests: small, seeded environments where GRPO-style
//! normalisation meets users who want different things. They are not part of the algorithm;
//! nothing in the core imports them.
//!
//! - [`bandit`]: a contextual bandit with imbalanced preference groups and per-group reward
//!   scales ([`PreferenceBandit`](bandit::PreferenceBandit)), the setting of `grpo_vs_pgrpo`;
//! - [`movielens`]: next-genre recommendation on MovieLens-1M (or its generated sample), users
//!   grouped by age, gender or occupation.

pub mod bandit;
pub mod movielens;
