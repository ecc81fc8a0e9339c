//! The crate's error type.

/// Everything that can go wrong in an optimizer update or a state restore.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two buffers that must have the same length do not.
    #[error("{what}: expected {expected} values, got {got}")]
    LengthMismatch {
        what: String,
        expected: usize,
        got: usize,
    },
    /// A configuration value is out of its valid range.
    #[error("invalid optimizer setting {field} = {value}: {why}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        why: &'static str,
    },
    /// Saved optimizer state does not match this optimizer.
    #[error("optimizer state: {0}")]
    State(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
