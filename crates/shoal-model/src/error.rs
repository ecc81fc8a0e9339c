//! The crate's error type.

/// Everything that can go wrong building, running or (re)loading a model.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model configuration value is unusable.
    #[error("invalid model setting {field}: {why}")]
    Config { field: &'static str, why: String },
    /// A flat buffer or saved tensor does not match the model's parameters.
    #[error("parameter layout mismatch: {0}")]
    Layout(String),
    /// The engine refused an operation.
    #[error("tensor engine: {0}")]
    Engine(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
