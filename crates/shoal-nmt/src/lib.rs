//! The NMT workload, read top-down: the model ([`model`]: embeddings, the stacked
//! GRU/LSTM encoder and decoder of [`rnn`], Luong or Bahdanau attention, the output
//! projection; [`fused`]: whole-sequence recurrences and the projection + loss as single
//! engine operations on the host kernels; [`decode`]: greedy and beam search;
//! [`params`]: the model's parameters as one flat buffer), its configuration
//! ([`config`]), the trainer ([`trainer`]: the update loop, validation, BLEU, exact
//! resume from [`checkpoint`]s), the job of several processes ([`job`]), the progress
//! display ([`progress`]) and the benchmarks' hooks ([`bench`]).
//!
//! The model is generic over the burn backend (the fused operations need
//! [`fused::FusedRnnBackend`]); [`Cpu`] and [`CpuTrain`] name the CPU backend.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod error;
pub mod fused;
pub mod info;
pub mod job;
pub mod model;
pub mod params;
pub mod progress;
pub mod rnn;
pub mod trainer;

pub use config::NmtTrainConfig;
pub use error::{Error, Result};
pub use model::{AttentionKind, NmtConfig, Seq2Seq};
pub use params::{FlatLayout, ParamSpec};
pub use rnn::{CellKind, RecurrentLayer};
pub use trainer::{Event, Learner, NmtTrainer, RunSummary, StopReason, Translator};

/// The default CPU backend (burn's `flex`).
pub type Cpu = burn::backend::Flex;
/// The default CPU backend with autodiff, for training.
pub type CpuTrain = burn::backend::Autodiff<Cpu>;
