//! Model compression on flat weight buffers, independent of the engine: magnitude
//! pruning with gradual (AGP) schedules and sparse CSR storage with its own kernel,
//! int8 per-output-channel quantization (its kernels in `shoal-kernels`), k-means weight sharing
//! with n-bit codes, SVD factorization of fully-connected layers, canonical Huffman
//! coding, and the compressed file that chains them.

pub mod error;
pub mod format;
pub mod huffman;
pub mod kmeans;
pub mod prune;
pub mod sparse;
pub mod svd;

pub use error::{Error, Result};
