//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong building, training, compressing, converting or saving
/// the CNN.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A bad configuration or setting.
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
    /// A compression technique or the compressed file.
    #[error(transparent)]
    Compress(#[from] shoal_compress::Error),
    /// An int8 kernel refused its inputs.
    #[error(transparent)]
    Kernels(#[from] shoal_kernels::Error),
    /// An ONNX file.
    #[error(transparent)]
    Onnx(#[from] shoal_onnx::Error),
    /// The runtime: atomic files.
    #[error(transparent)]
    Runtime(#[from] shoal_runtime::Error),
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
