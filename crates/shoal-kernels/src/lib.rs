//! Kernels for shoal's models on flat buffers, independent of any tensor engine, one
//! module per device: [`host`] (the CPU: portable code compiled for AVX-512, AVX2+FMA
//! and the baseline, the best chosen at run time, and int8 kernels on AVX-512 VNNI with
//! portable loops computing the same integers). A device sibling (`cuda`) would sit
//! beside `host` behind its cargo feature, held to the same tests.

pub mod error;
pub mod host;

pub use error::{Error, Result};
