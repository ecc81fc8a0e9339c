//! The data plane of shoal: point-to-point transports that move framed byte messages
//! between ranks, and collectives built on them that work on flat `f32` buffers. It
//! knows nothing of the tensor engine (the engine adapter flattens gradients into the
//! buffers), so it can be tested alone and serve any framework.
//!
//! | module | owns |
//! |---|---|
//! | [`frame`] | the wire header: magic, version, kind, tag, bounded length |
//! | [`transport`] | the [`Transport`] trait; [`local`] (threads, the reference), [`shm`] (processes on one host), [`tcp`], and `mpi` (feature `mpi`: ranks of an `mpirun` job, MPI's own allreduce) |
//! | [`tls`] | TLS on the TCP plane and PS links (feature `tls`), per-job certificates |
//! | [`ps`] | parameter-server shards and their client |
//! | [`collective`] | allreduce (ring for large, recursive doubling for small messages), broadcast, allgather, barrier, the fusion buffer |

pub mod bench;
pub mod collective;
pub mod error;
pub mod frame;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod ps;
pub mod shm;
pub mod tcp;
pub mod tls;
pub mod transport;

pub use collective::{Communicator, FusionBuffer};
pub use error::{Error, Result};
pub use transport::Transport;
