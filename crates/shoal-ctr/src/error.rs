//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong building, training, saving or distributing a CTR model.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A bad configuration value.
    #[error("config: {0}")]
    Config(String),
    /// A model configuration value is unusable.
    #[error("invalid model setting {field}: {why}")]
    Setting { field: &'static str, why: String },
    /// A flat buffer or saved tensor does not match the model's parameters.
    #[error("parameter layout mismatch: {0}")]
    Layout(String),
    /// A saved model that cannot be loaded, and why.
    #[error("checkpoint {path}: {why}")]
    Checkpoint { path: PathBuf, why: String },
    #[error(transparent)]
    Data(#[from] shoal_data::Error),
    #[error(transparent)]
    Optim(#[from] shoal_optim::Error),
    /// The data plane (parameter servers) between processes.
    #[error("data plane: {0}")]
    Comm(#[from] shoal_comm::Error),
    /// The control plane (coordinator, membership, health).
    #[error("control plane: {0}")]
    Control(#[from] shoal_control::Error),
    /// The runtime: atomic files, the launcher, a process's role.
    #[error(transparent)]
    Runtime(#[from] shoal_runtime::Error),
    /// A process of a distributed job failed or the job could not be assembled.
    #[error("cluster: {0}")]
    Cluster(String),
    /// Training diverged (loss is not finite).
    #[error("training diverged at step {step}: loss is {loss}")]
    Diverged { step: u64, loss: f32 },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
