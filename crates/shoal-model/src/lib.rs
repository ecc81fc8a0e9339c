//! The engine-facing layer of shoal: recurrent layers, the seq2seq NMT model, decoding,
//! the flat-buffer parameter/gradient adapter, and the fused operations ([`fused`], on
//! the host kernels in [`kernels`]) that make recurrent training fast on CPU.
//! Everything here is generic over the burn backend (fused operations need
//! [`fused::FusedRnnBackend`]); [`Cpu`] and [`CpuTrain`] name the default CPU backend.

pub mod cnn;
pub mod ctr;
pub mod decode;
pub mod error;
pub mod fused;
pub mod kernels;
pub mod nmt;
pub mod params;
pub mod rnn;

pub use error::{Error, Result};
pub use nmt::{AttentionKind, NmtConfig, Seq2Seq};
pub use params::{FlatLayout, ParamSpec};
pub use rnn::{CellKind, RecurrentLayer};

/// The default CPU backend (burn's `flex`).
pub type Cpu = burn::backend::Flex;
/// The default CPU backend with autodiff, for training.
pub type CpuTrain = burn::backend::Autodiff<Cpu>;
