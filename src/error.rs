//! The crate's error type.
//!
//! Every fallible public function returns [`Result`]. Variants name what was wrong (which row,
//! which field, which file) so that a bad input can be fixed without reading the source.

use std::path::PathBuf;

/// Everything that can go wrong in `pgrpo`.
///
/// The enum is `#[non_exhaustive]`: new variants may be added in minor releases.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A reward (or another per-row input) was NaN or infinite under the default
    /// [`NonFinitePolicy::Error`](crate::advantage::NonFinitePolicy::Error).
    ///
    /// ```text
    /// reward at row 3 is not finite (NaN); use NonFinitePolicy::Missing to skip such rows
    /// ```
    #[error("reward at row {row} is not finite ({value}); use NonFinitePolicy::Missing to skip such rows")]
    NonFiniteReward {
        /// Index of the offending row in the batch.
        row: usize,
        /// The value found there.
        value: f32,
    },

    /// Two inputs that must have the same length do not.
    ///
    /// ```text
    /// length mismatch: `prompt_ids` has 7 entries but `rewards` has 8
    /// ```
    #[error("length mismatch: `{what}` has {got} entries but `{against}` has {expected}")]
    LengthMismatch {
        /// The input whose length is wrong.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The input it was compared with.
        against: &'static str,
        /// That input's length.
        expected: usize,
    },

    /// An input that must not be empty was empty.
    ///
    /// ```text
    /// `batch` is empty
    /// ```
    #[error("`{0}` is empty")]
    Empty(&'static str),

    /// An index (a row's prompt id or group id) points outside its table.
    ///
    /// ```text
    /// `group_ids[5]` = 9 is out of range (there are 3 groups)
    /// ```
    #[error("`{what}[{row}]` = {value} is out of range (there are {bound} {of})")]
    IndexOutOfRange {
        /// The input holding the index.
        what: &'static str,
        /// Row of the offending entry.
        row: usize,
        /// The index found.
        value: usize,
        /// Number of valid entries.
        bound: usize,
        /// What is being indexed ("groups", "prompts").
        of: &'static str,
    },

    /// A prompt has too few completions for an estimator that needs a per-prompt spread.
    ///
    /// ```text
    /// prompt 4 has 1 usable completion(s) but the grpo estimator needs at least 2
    /// ```
    #[error("prompt {prompt} has {count} usable completion(s) but the {estimator} estimator needs at least 2")]
    TooFewCompletions {
        /// The prompt index.
        prompt: usize,
        /// How many (finite) completions it has.
        count: usize,
        /// The estimator's name.
        estimator: &'static str,
    },

    /// A configuration value is invalid; `field` names it.
    ///
    /// ```text
    /// invalid config `eps_low`: must be in [0, 1), got 1.5
    /// ```
    #[error("invalid config `{field}`: {reason}")]
    InvalidConfig {
        /// The field, e.g. `eps_low` or `history.half_life`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// Two tensors that must agree in shape do not.
    ///
    /// ```text
    /// shape mismatch for `prompt features`: expected [4], got [3]
    /// ```
    #[error("shape mismatch for `{what}`: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// The tensor whose shape is wrong.
        what: &'static str,
        /// Expected dims.
        expected: Vec<usize>,
        /// Actual dims.
        got: Vec<usize>,
    },

    /// An input tensor has the right shape but values outside its domain (a negative or NaN
    /// mask weight, a NaN entropy, an entropy that carries no gradient where one is needed).
    /// Data, not configuration: [`InvalidConfig`](Self::InvalidConfig) is for config fields.
    ///
    /// ```text
    /// invalid input `mask`: 2 entries are negative or not finite (smallest -1); the mask holds 1 for completion tokens, 0 for padding, or non-negative token weights
    /// ```
    #[error("invalid input `{what}`: {reason}")]
    InvalidInput {
        /// The input, e.g. `mask` or `entropy`.
        what: &'static str,
        /// What is wrong with its values.
        reason: String,
    },

    /// Reward-history state (JSON, merge partner) is malformed or inconsistent.
    ///
    /// ```text
    /// invalid reward history: group "formal": mean is not finite
    /// ```
    #[error("invalid reward history: {}{reason}", group.as_ref().map(|g| format!("group {g:?}: ")).unwrap_or_default())]
    InvalidHistory {
        /// The group whose statistics are wrong, when the problem is one group's.
        group: Option<String>,
        /// What is wrong.
        reason: String,
    },

    /// A serialized format has a version this build cannot read.
    ///
    /// ```text
    /// unsupported reward history format version 7 (this build reads up to 1)
    /// ```
    #[error("unsupported {what} format version {found} (this build reads up to {supported})")]
    UnsupportedVersion {
        /// Which format.
        what: &'static str,
        /// The version in the file.
        found: u32,
        /// The newest version this build understands.
        supported: u32,
    },

    /// The gradient norm was NaN or infinite; the update was skipped and the parameters are
    /// unchanged.
    ///
    /// ```text
    /// gradient norm is not finite (NaN); update skipped, parameters unchanged
    /// ```
    #[error("gradient norm is not finite ({norm}); update skipped, parameters unchanged")]
    NonFiniteGradient {
        /// The norm found.
        norm: f64,
    },

    /// An advantage estimator of the user's
    /// ([`AdvantageEstimator`](crate::advantage::AdvantageEstimator)) failed, or returned a
    /// wrong number of advantages or a non-finite one.
    ///
    /// ```text
    /// advantage estimator `median_baseline`: returned NaN at row 3
    /// ```
    #[error("advantage estimator `{name}`: {reason}")]
    Estimator {
        /// The estimator's [`name`](crate::advantage::AdvantageEstimator::name).
        name: String,
        /// What went wrong.
        reason: String,
    },

    /// A reward function failed (or could not save or restore its state).
    ///
    /// ```text
    /// reward function failed: judge timed out after 30 s
    /// ```
    #[error("reward function failed: {0}")]
    Reward(String),

    /// Data-parallel training failed: a collective operation failed, another rank failed
    /// (every rank stops together, this error names the rank), or the ranks disagree on
    /// something that must be the same everywhere (the batch, the config, the state).
    /// See [`distributed`](crate::distributed).
    ///
    /// ```text
    /// distributed: rank 1 failed during the rollout: reward function failed: judge timed out
    /// ```
    #[error("distributed: {reason}")]
    Distributed {
        /// The rank the failure is about (the one that failed, sent a malformed message or
        /// disagrees with rank 0; the first of several), when there is one.
        rank: Option<usize>,
        /// What went wrong.
        reason: String,
    },

    /// A model file is missing, malformed or does not match its config.
    ///
    /// ```text
    /// models/tiny/config.json: missing field `hidden_size`
    /// ```
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A line of a data file (e.g. MovieLens `ratings.dat`) is malformed; `line` is 1-based.
    ///
    /// ```text
    /// ml-1m/ratings.dat:17: expected 4 `::`-separated fields (UserID::MovieID::Rating::Timestamp), found 3
    /// ```
    #[error("{}:{line}: {reason}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },

    /// A checkpoint tensor's shape does not match the model config.
    ///
    /// ```text
    /// models/tiny/model.safetensors: tensor `model.layers.0.mlp.up_proj.weight` has shape [32, 16], the config needs [64, 16]
    /// ```
    #[error("{path}: tensor `{name}` has shape {got:?}, the config needs {expected:?}")]
    TensorShape {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor's (Hugging Face) name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
    },

    /// A LoRA adapter was saved for other base weights than those of the model it is
    /// loaded onto (see `lm::Llama::with_adapter`); both
    /// fingerprints are `lm::Llama::base_sha256` values.
    ///
    /// ```text
    /// runs/a/adapter/adapter_model.safetensors: this adapter was trained on base weights with sha256 9f86d0…, the model's base weights hash to 2c26b4…; load the base it was trained on
    /// ```
    #[error("{path}: this adapter was trained on base weights with sha256 {expected}, the model's base weights hash to {found}; load the base it was trained on", path = path.display())]
    AdapterBase {
        /// The adapter weights file.
        path: PathBuf,
        /// The fingerprint recorded in the adapter.
        expected: String,
        /// The fingerprint of the model's base weights.
        found: String,
    },

    /// The model architecture or a feature of the checkpoint is not supported.
    ///
    /// ```text
    /// unsupported model: architecture "mamba" (this build knows llama)
    /// ```
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),

    /// An error from candle (tensor shape/dtype/device problems, kernels).
    ///
    /// ```text
    /// shape mismatch in matmul, lhs: [2, 3], rhs: [4, 5]
    /// ```
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// JSON (de)serialization failed (outside a checkpoint, whose errors name the file).
    ///
    /// ```text
    /// unknown field `lr`, expected one of `num_generations`, … at line 1 column 5
    /// ```
    #[error(transparent)]
    Json(#[from] serde_json::Error),

    /// An I/O error (outside a checkpoint, whose errors name the file).
    ///
    /// ```text
    /// No such file or directory (os error 2)
    /// ```
    #[error(transparent)]
    Io(#[from] std::io::Error),

    /// An optimizer's state does not fit the optimizer it is imported into.
    ///
    /// ```text
    /// optimizer state does not fit: var 1: first moment is F32 [4, 8], the variable is F32 [4, 4]
    /// ```
    #[error("optimizer state does not fit: {0}")]
    OptimizerState(String),

    /// A checkpoint file (or directory) is missing, damaged, from a newer version, or does
    /// not fit the policy/optimizer it is loaded into. `path` is the file; `problem` says
    /// what is wrong (see [`CheckpointProblem`] for one message per case).
    ///
    /// ```text
    /// runs/a/checkpoint-000000040/model.safetensors: checksum mismatch: the manifest says sha256 9f86d0…, the file hashes to 2c26b4…
    /// ```
    #[error("{path}: {problem}", path = path.display())]
    Checkpoint {
        /// The file (or directory) concerned.
        path: PathBuf,
        /// What is wrong with it.
        problem: CheckpointProblem,
    },

    /// A chat template failed to parse or render (or raised an error itself, e.g. for a
    /// role sequence it does not accept).
    ///
    /// ```text
    /// chat template: invalid operation: the template raised: Conversation roles must alternate user/assistant/user/assistant/...
    /// ```
    #[error("chat template: {0}")]
    ChatTemplate(String),

    /// A tokenizer error.
    ///
    /// ```text
    /// tokenizer: token id 60000 is outside the vocabulary (49152)
    /// ```
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// What is wrong with a checkpoint file: the `problem` of [`Error::Checkpoint`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointProblem {
    /// The file or directory does not exist.
    ///
    /// ```text
    /// missing (the manifest lists it)
    /// ```
    #[error("missing ({0})")]
    Missing(&'static str),
    /// The file's length differs from the manifest's: truncated or appended to.
    ///
    /// ```text
    /// truncated or overwritten: 812 bytes, the manifest says 4096
    /// ```
    #[error("truncated or overwritten: {found} bytes, the manifest says {expected}")]
    Size {
        /// Length recorded in the manifest.
        expected: u64,
        /// Length on disk.
        found: u64,
    },
    /// The file's SHA-256 differs from the manifest's: it was corrupted or replaced.
    ///
    /// ```text
    /// checksum mismatch: the manifest says sha256 9f86d0…, the file hashes to 2c26b4…
    /// ```
    #[error("checksum mismatch: the manifest says sha256 {expected}, the file hashes to {found}")]
    Checksum {
        /// Hex digest recorded in the manifest.
        expected: String,
        /// Hex digest of the file.
        found: String,
    },
    /// The checkpoint (or a file in it) was written by a newer format version.
    ///
    /// ```text
    /// format version 9 is newer than this build reads (up to 1)
    /// ```
    #[error("format version {found} is newer than this build reads (up to {supported})")]
    Version {
        /// Version in the file.
        found: u32,
        /// Newest version this build reads.
        supported: u32,
    },
    /// The file does not parse (JSON, safetensors header, wrong format name).
    ///
    /// ```text
    /// malformed: EOF while parsing an object at line 3 column 0
    /// ```
    #[error("malformed: {0}")]
    Malformed(String),
    /// The file parses but does not fit what it is loaded into (tensor count, name, dtype or
    /// shape against the policy's vars or the optimizer).
    ///
    /// ```text
    /// does not fit: tensor `var.00001` is F32 [3, 4], the policy's var 1 is F32 [4, 4]
    /// ```
    #[error("does not fit: {0}")]
    Mismatch(String),
    /// The file parses but holds invalid values (negative or non-finite statistics, an
    /// invalid config, a reward state the reward function rejects).
    ///
    /// ```text
    /// invalid: invalid reward history: group "formal": m2 must be finite and >= 0, got -1
    /// ```
    #[error("invalid: {0}")]
    Invalid(String),
    /// The checkpoint is not exact: it was saved with an optimizer that cannot export its
    /// state.
    ///
    /// ```text
    /// inexact: saved without optimizer state (the optimizer could not export it); call Checkpoint::with_fresh_optimizer to resume with fresh moments
    /// ```
    #[error("inexact: {0}")]
    Inexact(&'static str),
    /// Reading or writing failed.
    ///
    /// ```text
    /// i/o error: No space left on device (os error 28)
    /// ```
    #[error("i/o error: {0}")]
    Io(#[source] std::io::Error),
    /// Saving: a tensor has a dtype checkpoints do not store (they store f32, f64, f16, bf16,
    /// u8, u32, i16, i32 and i64). Nothing was written. (Loading reports such a tensor in a
    /// file as [`Malformed`](Self::Malformed).)
    ///
    /// ```text
    /// tensor `var.00002` is F8E4M3; checkpoints store f32, f64, f16, bf16, u8, u32, i16, i32 and i64 tensors
    /// ```
    #[error("tensor `{tensor}` is {dtype:?}; checkpoints store f32, f64, f16, bf16, u8, u32, i16, i32 and i64 tensors")]
    UnsupportedDType {
        /// The tensor's name in the file (`var.NNNNN`, or the optimizer's name for it).
        tensor: String,
        /// Its dtype.
        dtype: candle_core::DType,
    },
    /// Saving: the safetensors encoder rejected the tensors (e.g. a header over its size
    /// limit). Nothing was written. (Loading reports a file the safetensors parser rejects
    /// as [`Malformed`](Self::Malformed).)
    ///
    /// ```text
    /// safetensors: header too large
    /// ```
    #[error("safetensors: {0}")]
    Safetensors(#[source] safetensors::SafeTensorError),
}

/// `Result<T, pgrpo::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

/// Returns early with an [`Error::InvalidConfig`].
macro_rules! bail_config {
    ($field:expr, $($arg:tt)*) => {
        return Err($crate::Error::InvalidConfig { field: $field, reason: format!($($arg)*) })
    };
}
pub(crate) use bail_config;

impl Error {
    /// [`Error::Distributed`] about no rank in particular.
    pub(crate) fn distributed(reason: impl Into<String>) -> Self {
        Error::Distributed {
            rank: None,
            reason: reason.into(),
        }
    }

    /// [`Error::Distributed`] about rank `rank`.
    pub(crate) fn distributed_rank(rank: usize, reason: impl Into<String>) -> Self {
        Error::Distributed {
            rank: Some(rank),
            reason: reason.into(),
        }
    }

    /// [`Error::InvalidHistory`] about the store as a whole.
    pub(crate) fn invalid_history(reason: impl Into<String>) -> Self {
        Error::InvalidHistory {
            group: None,
            reason: reason.into(),
        }
    }
}
