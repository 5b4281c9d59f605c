//! # pgrpo — Personalized Group Relative Policy Optimization on candle
//!
//! GRPO normalises each completion's reward against the other completions sampled for the same
//! prompt. P-GRPO (arXiv:2603.10009) labels every prompt with a preference group and
//! normalises against that group's reward history kept across training steps.

pub mod advantage;
pub mod bandit;
pub mod checkpoint;
mod config;
mod error;
mod group;
pub mod history;
pub mod metrics;
pub mod models;
pub mod objective;
pub mod optim;
pub mod policy;
mod reward;
mod trainer;

pub use advantage::{
    AdvantageConfig, AdvantageDiagnostics, Advantages, BatchDeltas, ColdStart, Estimator,
    GroupDiagnostics, NonFinitePolicy, PGrpoOptions, RolloutRewards, UpdateOrder,
};
pub use checkpoint::{Checkpoint, CheckpointOptions};
pub use config::TrainerConfig;
pub use error::{CheckpointProblem, Error, Result};
pub use group::GroupKey;
pub use history::{HistoryKind, RewardHistory, RunningMoments, Stats, Variance};
pub use metrics::StepMetrics;
pub use objective::{
    clipped_objective, KlEstimator, LossAggregation, ObjectiveConfig, ObjectiveInputs,
    ObjectiveMetrics, ObjectiveOutput, RatioLevel,
};
pub use optim::LrScheduler;
pub use policy::{Policy, TokenLogProbs};
pub use reward::{RewardFn, WeightedRewards};
pub use trainer::{step_rng, GroupedPrompt, Rollout, Trainer};
