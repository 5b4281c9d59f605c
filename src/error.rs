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
    /// [`NonFinitePolicy::Error`](crate::NonFinitePolicy::Error).
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
    #[error("shape mismatch for `{what}`: expected {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// The tensor whose shape is wrong.
        what: &'static str,
        /// Expected dims.
        expected: Vec<usize>,
        /// Actual dims.
        got: Vec<usize>,
    },

    /// Reward-history state (JSON, merge partner) is malformed or inconsistent.
    ///
    /// ```text
    /// invalid reward history: group "formal": mean is not finite
    /// ```
    #[error("invalid reward history: {0}")]
    InvalidHistory(String),

    /// A serialized format has a version this build cannot read.
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

    /// A reward function failed.
    #[error("reward function failed: {0}")]
    Reward(String),

    /// A model or checkpoint file is missing, malformed or does not match its config.
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

    /// The model architecture or a feature of the checkpoint is not supported.
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),

    /// An error from candle (tensor shape/dtype/device problems, kernels).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// JSON (de)serialization failed.
    #[error(transparent)]
    Json(#[from] serde_json::Error),

    /// An I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),

    /// A tokenizer error.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
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
