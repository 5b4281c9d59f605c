//! # pgrpo — Personalized Group Relative Policy Optimization on candle
//!
//! GRPO (DeepSeekMath) normalises each completion's reward against the other completions
//! sampled for the same prompt. P-GRPO (Wang et al., arXiv:2603.10009) labels every prompt with
//! a **preference group** (a persona, a user cluster, an age bracket) and normalises against
//! that group's reward history, kept across training steps, so that small or rare groups are
//! not drowned out by the majority. This crate implements both, and the GRPO variants people
//! use (Dr. GRPO, RLOO, DAPO's clip-higher and token-level loss, GSPO), on
//! [candle](https://github.com/huggingface/candle) tensors.
//!
//! # Quick start
//!
//! Train a two-group bandit policy with P-GRPO and log every step's metrics as JSON Lines:
//!
//! ```
//! use candle_core::Device;
//! use pgrpo::sink::{JsonlSink, MetricsSink};
//! use pgrpo::{models::TabularPolicy, Estimator, GroupKey, GroupedPrompt, Trainer, TrainerConfig};
//!
//! // A policy: anything that implements `pgrpo::Policy`. Here: context id -> one of 3 actions.
//! let policy = TabularPolicy::new(2, 3, true, &Device::Cpu)?;
//! // A reward function sees the prompt, the completion and the prompt's preference group:
//! // group "formal" (context 0) wants action 0, group "casual" (context 1) wants action 1.
//! let reward = |ctx: &u32, action: &u32, _group: &GroupKey| (*action == *ctx) as u8 as f32;
//! let mut cfg = TrainerConfig { num_generations: 4, learning_rate: 0.1, ..Default::default() };
//! cfg.advantage.estimator = Estimator::PGrpo; // the default; or Grpo, DrGrpo, Rloo, ...
//! let mut trainer = Trainer::new(policy, reward, cfg)?;
//!
//! let mut log = JsonlSink::new(Vec::new()); // or JsonlSink::create("runs/metrics.jsonl")?
//! let batch = [GroupedPrompt::new(0u32, "formal"), GroupedPrompt::new(1u32, "casual")];
//! for _ in 0..40 {
//!     let metrics = trainer.step(&batch)?;
//!     log.write_row(&[("estimator", "p_grpo")], &metrics)?;
//! }
//! // Each group has learned its own action, and its reward history holds 40 × 4 rewards.
//! let probs = trainer.policy().probs()?;
//! assert!(probs[0][0] > 0.6 && probs[1][1] > 0.6);
//! let casual = trainer.history().stats(&"casual".into()).unwrap();
//! assert_eq!(casual.n, 160);
//! assert_eq!(String::from_utf8(log.into_inner()?).unwrap().lines().count(), 40);
//! # Ok::<(), pgrpo::Error>(())
//! ```
//!
//! # Where things are
//!
//! The folders show the architecture; arrows point down (nothing in the core imports the
//! trainer, the language model, the tasks or a transport).
//!
//! | layer | module | what |
//! |---|---|---|
//! | core | [`advantage`] | rewards (+ history) → advantages: one small function per estimator, pure; your own rule through [`AdvantageEstimator`](advantage::AdvantageEstimator); several reward functions' scores |
//! | core | [`history`] | per-group reward statistics kept across steps ([`RewardHistory`]): the state P-GRPO adds |
//! | core | [`objective`] | the policy-gradient loss over `(B, T)` log-probs (PPO clip, CISPO, SAPO), written as in the papers |
//! | core | [`policy`], [`reward`] | the [`Policy`] trait a model implements; [`RewardFn`] (one row or a batch; weighted parts) |
//! | training | [`trainer`] | [`Trainer`]: one step = sample → reward → advantages → update → history |
//! | training | [`config`], [`optim`], [`rng`] | [`TrainerConfig`]; AdamW and schedules; each step's sampling generator |
//! | training | [`checkpoint`] | atomic, validated checkpoints (weights, optimizer, history, reward state) |
//! | training | [`metrics`], [`sink`] | [`StepMetrics`] and where they go (JSON Lines, CSV) |
//! | training | [`distributed`] | data-parallel training: [`Collective`](distributed::Collective), the protocol, MPI/NCCL |
//! | models | [`models`] | toy policies (tabular, MLP) for bandits and tests |
//! | models | `lm`, `ops` | a trainable Llama-family LM and its fused CPU kernels (feature `lm`, default) |
//! | tasks | [`tasks`] | the preference bandit and MovieLens next-genre task of the examples and tests |
//! | docs | [`trl`] | TRL `GRPOConfig` fields and their pgrpo equivalents, for people coming from Python |
//!
//! The crate root re-exports what a training loop needs; everything else is reached through
//! its module. [`candle_core`] and [`candle_nn`] are re-exported, so `pgrpo::candle_core::Device`
//! needs no candle entry in your own `Cargo.toml`.
//!
//! # Logging
//!
//! The library logs through [`tracing`](https://docs.rs/tracing) and is silent unless the
//! application installs a subscriber. [`Trainer::step`] emits one `DEBUG` event per step
//! (target `pgrpo::trainer`: step, reward, loss, grad norm); sinks warn about metrics they
//! drop. The examples install `tracing-subscriber` with `RUST_LOG` (e.g.
//! `RUST_LOG=pgrpo=debug`).
//!
//! # Cargo features
//!
//! - `lm` (default): `pgrpo::lm` — the trainable Llama-family language model,
//!   GGUF / Hugging Face loading, tokenizers, and the fused kernels of `ops`. Without it
//!   (`default-features = false`) the core builds without tokenizers, candle-transformers or
//!   half.
//! - `cuda`: passes `cuda` through to candle (needs nvcc and the CUDA libraries to build;
//!   `scripts/cuda-build.sh` installs them from PyPI's CUDA 13.0 wheels); tensors follow the
//!   policy's [`Device`](candle_core::Device).
//! - `metal`: passes `metal` through to candle (macOS only).
//! - `mpi`: `distributed::Mpi`, data-parallel training over MPI (needs an MPI library and
//!   libclang to build; CI builds and runs it with OpenMPI).
//! - `nccl`: `distributed::Nccl`, gradients between CUDA GPUs over NCCL, MPI for the rest
//!   (implies `mpi` and `cuda`).
//! - `fault-injection`: **testing only**. Compiles `checkpoint::fault`, which
//!   makes the file operations of a save fail on demand. This crate's tests turn it on
//!   through a dev-dependency on the crate itself; applications never need it.
//!
//! Only `lm` is on by default. This repository's CI runs on a Linux machine without a GPU: it
//! type-checks `nccl` (and so `cuda`) with a stand-in nvcc; `scripts/cuda-build.sh` builds and
//! links `cuda` (and `nccl`) for real, which takes too long for the default CI run
//! (`PGRPO_CI_CUDA=1` adds it). `metal` is not compiled.
//!
//! # Minimum supported Rust version
//!
//! The `rust-version` of `Cargo.toml` (1.89). Dependencies, with `Cargo.lock` as committed,
//! declare no higher version; see `scripts/check-msrv.py` for what that check proves.

#![deny(missing_docs)]

// The core algorithm: pure computation over rewards, statistics and log-probs.
pub mod advantage;
pub mod history;
pub mod objective;
pub mod policy;
pub mod reward;

// Training: the loop that composes the core, and what it needs around it.
pub mod checkpoint;
pub mod config;
pub mod distributed;
pub mod metrics;
pub mod optim;
pub mod rng;
pub mod sink;
pub mod trainer;

// Models and the experiment tasks of the examples and tests.
#[cfg(feature = "lm")]
pub mod lm;
pub mod models;
#[cfg(feature = "lm")]
pub mod ops;
pub mod tasks;
pub mod trl;

mod dispatch;
mod error;
mod group;
mod names;

/// The candle crates this one is built on, re-exported so that a user names `Device`,
/// `Tensor` or `Var` without pinning the same candle version in their own `Cargo.toml`.
pub use candle_core;
/// See [`candle_core`].
pub use candle_nn;

pub use advantage::{AdvantageConfig, Advantages, Estimator, RolloutRewards};
pub use config::TrainerConfig;
pub use error::{CheckpointProblem, Error, Result};
pub use group::GroupKey;
pub use history::{HistoryKind, RewardHistory};
pub use metrics::StepMetrics;
pub use objective::{
    clipped_objective, LossAggregation, ObjectiveConfig, ObjectiveInputs, ObjectiveOutput,
};
pub use policy::{Policy, TokenLogProbs};
pub use reward::RewardFn;
pub use trainer::{GroupedPrompt, Rollout, Trainer};
