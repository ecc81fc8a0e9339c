//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong turning a job into cluster objects or talking to the
/// cluster.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job spec is malformed or asks for something impossible.
    #[error("job spec: {0}")]
    Spec(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The Kubernetes API refused or failed a call.
    #[error("kubernetes: {0}")]
    Api(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
