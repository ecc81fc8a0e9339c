//! The crate's error type.

/// Everything that can go wrong on the control plane.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The coordinator could not be reached or started.
    #[error("{what}: {why}")]
    Transport { what: String, why: String },
    /// The coordinator refused or failed a call (wrong token, timeout, failed peer).
    #[error("coordinator: {0}")]
    Status(String),
    /// A member of the job failed (stopped sending heartbeats).
    #[error("rank {rank} failed: {reason}")]
    PeerFailed { rank: u32, reason: String },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Status(format!("{:?}: {}", s.code(), s.message()))
    }
}
