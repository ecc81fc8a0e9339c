//! The CTR workload, read top-down: click logs come from `shoal-data` (CSV, libffm,
//! libsvm, synthetic logs from a planted model) as hashed 64-bit keys; the models
//! ([`model`]: LR, FM, DeepFM, Wide & Deep on host kernels over gathered sparse rows and
//! a flat dense buffer); the trainer ([`trainer`]: rows created on first touch in a
//! sparse table, Adagrad/FTRL/... on the rows and Adam on the MLP, held-out AUC and log
//! loss, exact resume, scoring saved models); the job of several processes with the
//! rows on parameter servers ([`job`]); the progress display ([`progress`]); and the
//! `ctr-scale` benchmark's hooks ([`bench`]).

pub mod bench;
pub mod error;
pub mod job;
pub mod model;
pub mod progress;
pub mod trainer;

pub use error::{Error, Result};
pub use job::CtrJob;
pub use model::{CtrConfig, CtrKind, CtrModel};
pub use trainer::{CtrEvent, CtrPredictor, CtrTrainConfig, CtrTrainer};
