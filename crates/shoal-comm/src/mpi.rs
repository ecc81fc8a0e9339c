//! The MPI transport (cargo feature `mpi`): the processes of an `mpirun` job, each a rank
//! of `MPI_COMM_WORLD`, over the system's MPI (Debian's OpenMPI). Point-to-point sends
//! are buffered (`MPI_Bsend` into a buffer attached at start, so a send returns once
//! copied, as the collectives expect), receives check the message size before taking
//! it, and MPI's own `MPI_Allreduce` serves [`Communicator::allreduce_sum`].
//!
//! [`Communicator::allreduce_sum`]: crate::Communicator::allreduce_sum

use crate::transport::Transport;
use crate::{Error, Result};
use mpi::point_to_point::{Destination, Source};
use mpi::topology::{Communicator as _, SimpleCommunicator};
use mpi::traits::Equivalence;

/// MPI tags are only guaranteed up to 32767.
const TAG_MOD: u32 = 32768;

/// This process's place in `MPI_COMM_WORLD`.
pub struct MpiTransport {
    // Declared first so the world handle drops before MPI is finalised.
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    buffered: usize,
    send_copy: Vec<f32>,
    _universe: mpi::environment::Universe,
}

// SAFETY: MPI is initialised with `Threading::Serialized` and every call goes through
// `&mut self`, so calls are never concurrent; moving the handle to another thread is
// what the serialized level allows.
unsafe impl Send for MpiTransport {}

impl MpiTransport {
    /// Initialises MPI (once per process) and attaches `bsend_bytes` of send buffer.
    pub fn init(bsend_bytes: usize) -> Result<Self> {
        let (mut universe, level) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| Error::Mismatch("MPI is already initialised in this process".into()))?;
        if level < mpi::Threading::Serialized {
            return Err(Error::Mismatch(format!(
                "this MPI offers threading level {level:?}; shoal needs Serialized"
            )));
        }
        universe.set_buffer_size(bsend_bytes);
        let world = universe.world();
        Ok(Self {
            rank: world.rank() as usize,
            size: world.size() as usize,
            world,
            // MPI_BSEND_OVERHEAD is under 100 bytes; leave room for a few.
            buffered: bsend_bytes.saturating_sub(1024),
            send_copy: Vec::new(),
            _universe: universe,
        })
    }

    fn check_peer(&self, peer: usize) -> Result<()> {
        if peer >= self.size || peer == self.rank {
            return Err(Error::BadRank {
                peer,
                rank: self.rank,
                size: self.size,
            });
        }
        Ok(())
    }
}

impl Transport for MpiTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    fn send(&mut self, peer: usize, tag: u32, data: &[u8]) -> Result<()> {
        self.check_peer(peer)?;
        if data.len() > self.buffered {
            return Err(Error::Mismatch(format!(
                "MPI send of {} bytes exceeds the {}-byte send buffer",
                data.len(),
                self.buffered
            )));
        }
        self.world
            .process_at_rank(peer as i32)
            .buffered_send_with_tag(data, (tag % TAG_MOD) as i32);
        Ok(())
    }

    fn recv(&mut self, peer: usize, tag: u32, buf: &mut [u8]) -> Result<()> {
        self.check_peer(peer)?;
        let (msg, status) = self
            .world
            .process_at_rank(peer as i32)
            .matched_probe_with_tag((tag % TAG_MOD) as i32);
        let n = status.count(u8::equivalent_datatype()) as usize;
        if n != buf.len() {
            // Take the message off the queue anyway, then refuse it.
            let mut sink = vec![0u8; n];
            msg.matched_receive_into(&mut sink[..]);
            return Err(Error::Frame {
                peer,
                why: format!("expected {} bytes, got {n}", buf.len()),
            });
        }
        msg.matched_receive_into(buf);
        Ok(())
    }

    fn recv_any(&mut self, peer: usize, buf: &mut Vec<u8>, max: u64) -> Result<u32> {
        self.check_peer(peer)?;
        let (msg, status) = self.world.process_at_rank(peer as i32).matched_probe();
        let n = status.count(u8::equivalent_datatype()) as usize;
        if n as u64 > max {
            let mut sink = vec![0u8; n];
            msg.matched_receive_into(&mut sink[..]);
            return Err(crate::local::too_long(peer, n as u64, max));
        }
        buf.clear();
        buf.resize(n, 0);
        msg.matched_receive_into(&mut buf[..]);
        Ok(status.tag() as u32)
    }

    fn allreduce_sum_native(&mut self, data: &mut [f32]) -> Option<Result<()>> {
        use mpi::collective::{CommunicatorCollectives, SystemOperation};
        self.send_copy.clear();
        self.send_copy.extend_from_slice(data);
        self.world
            .all_reduce_into(&self.send_copy[..], data, SystemOperation::sum());
        Some(Ok(()))
    }
}
