//! The control plane of shoal: a gRPC coordinator that processes join (rendezvous: each
//! registers its role, host and data-plane address and gets its rank and the member
//! table), meet at named barriers, keep alive with heartbeats (a member silent for
//! longer than the timeout is declared failed and every other member is told), and
//! leave in order. Every call carries the job token; a wrong one is refused; with TLS
//! (feature `tls`) both sides are authenticated by the job CA. The data
//! plane is elsewhere (`shoal-comm`); this crate only decides who is who and who is
//! alive.

pub mod bench;
pub mod client;
pub mod error;
pub mod gate;
pub mod server;
pub mod tls;

/// Generated gRPC messages and service stubs.
pub mod proto {
    tonic::include_proto!("shoal.control.v1");
}

pub use client::{ControlClient, Joining, Registration};
pub use error::{Error, Result};
pub use server::{Coordinator, CoordinatorConfig};
pub use tls::TlsPem;
