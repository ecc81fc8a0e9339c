//! The CNN workload, read top-down: Fashion-MNIST (or any IDX image set) from
//! `shoal-data`; the VGG-style network ([`model`]: 3x3 convolutions by im2col, batch
//! norm, ReLU, max pooling, a fully-connected head, optional factorized layers, on host
//! kernels); the trainer ([`trainer`]); the compression pipeline and its inference
//! engine on sparse and int8 kernels ([`compress`]), ONNX in and out ([`onnx`]), the
//! compression report's chart ([`plot`]) and the progress display ([`progress`]).

pub mod compress;
pub mod error;
pub mod info;
pub mod model;
pub mod onnx;
pub mod plot;
pub mod progress;
pub mod trainer;

pub use error::{Error, Result};
pub use model::{Cnn, CnnConfig};
pub use trainer::{CnnEvent, CnnModel, CnnTrainConfig, CnnTrainer};
