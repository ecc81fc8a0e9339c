//! Optimizers, gradient clipping and learning-rate schedules over flat `f32` buffers.
//!
//! This crate knows nothing of the tensor engine: parameters and gradients are plain
//! slices, so the same code updates a model in one process, on a parameter-server shard,
//! or after an allreduce. Optimizer state is a set of named flat buffers plus a step
//! counter, which checkpoints save and restore exactly.

pub mod clip;
pub mod error;
pub mod hash;
mod key_index;
pub mod optimizer;
pub mod schedule;
pub mod sparse;

pub use clip::{clip_coefficient, clip_grad_norm, global_norm};
pub use error::{Error, Result};
pub use optimizer::{Optimizer, OptimizerConfig, OptimizerKind};
pub use schedule::{LrSchedule, ScheduleKind};
pub use sparse::{SparseRule, SparseTable};
