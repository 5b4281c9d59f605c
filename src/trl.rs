//! From TRL to pgrpo: which [`TrainerConfig`](crate::TrainerConfig) field corresponds to each
//! field of TRL's `GRPOConfig`. The same page is `docs/trl-mapping.md` in the repository.
#![doc = include_str!("../docs/trl-mapping.md")]
