//! What every workload's job needs and no workload owns: configuration overrides and
//! the shape of a distributed job ([`config`], [`dist`]), the compute device
//! ([`device`]), where input data is found from any directory ([`data`]), files a crash cannot leave
//! half-written and the run directory's checkpoints ([`store`]), the step progress bar
//! ([`progress`]), what `shoal info` says of a saved thing and the scores beside it
//! ([`info`]), the gradient exchange a worker's update loop plugs in ([`exchange`]), the
//! process group of a program that is not a shoal workload, such as a PyTorch script
//! ([`group`]),
//! the launcher and supervisor of a job's local processes ([`launch`]), the role a
//! process plays in a job and the [`role::JobKind`] trait the workload crates implement
//! ([`role`]), TensorBoard event files ([`tensorboard`]), a job's TLS certificates ([`tls`]), and the cost model that predicts
//! how a job scales ([`plan`]).

pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod exchange;
pub mod group;
pub mod info;
pub mod launch;
pub mod plan;
pub mod progress;
pub mod role;
pub mod store;
pub mod sys;
pub mod tensorboard;
pub mod timeline;
pub mod tls;

pub use error::{io_err, Error, Result};
