//! The crate's error type.

use std::path::PathBuf;

/// What can go wrong in the runtime: files, checkpoints, configuration, the planes, and
/// the processes of a job.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A bad configuration key or value.
    #[error("config: {0}")]
    Config(String),
    /// A checkpoint (or a file written atomically) that cannot be written or read.
    #[error("checkpoint {path}: {why}")]
    Checkpoint { path: PathBuf, why: String },
    /// The data plane (allreduce or parameter server) between processes.
    #[error("data plane: {0}")]
    Comm(#[from] shoal_comm::Error),
    /// The control plane (coordinator, membership, health).
    #[error("control plane: {0}")]
    Control(#[from] shoal_control::Error),
    /// A process of a distributed job failed or the job could not be assembled.
    #[error("cluster: {0}")]
    Cluster(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Maps an I/O error on `path` to [`Error::Io`].
pub fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
