//! Training for shoal: configuration, the single-process NMT training loop, atomic
//! checkpoints with exact resume, the progress display, and the training-throughput
//! benchmark.

pub mod bench;
pub mod checkpoint;
pub mod cluster;
pub mod cnn;
pub mod cnn_onnx;
pub mod compress;
pub mod config;
pub mod ctr;
pub mod error;
pub mod nmt;
pub mod plan;
pub mod plot;
pub mod progress;

pub use config::NmtTrainConfig;
pub use error::{Error, Result};
pub use nmt::{
    Event, Exchange, Learner, NmtTrainer, PhaseTimes, RunSummary, StopReason, Translator,
};
