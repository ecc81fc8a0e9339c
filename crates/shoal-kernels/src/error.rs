//! The crate's error type.

/// What a kernel refuses: inputs whose shapes do not fit it.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Shapes that do not fit.
    #[error("shape mismatch: {0}")]
    Shape(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
