//! The crate's error type.

/// Everything that can go wrong compressing or reading a compressed model.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A compression setting that cannot be honoured (120% sparsity, 0 bits, ...).
    #[error("invalid setting {what}: {why}")]
    Setting { what: String, why: String },
    /// A compressed file that is truncated, corrupt or not one.
    #[error("compressed model: {0}")]
    Format(String),
    /// Shapes that do not fit.
    #[error("shape mismatch: {0}")]
    Shape(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn setting(what: &str, why: impl Into<String>) -> Error {
    Error::Setting {
        what: what.into(),
        why: why.into(),
    }
}
