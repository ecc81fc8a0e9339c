//! Point-to-point message passing between the ranks of a group.

use crate::Result;

/// Moves whole messages between this rank and its peers. Messages between one pair of
/// ranks arrive in the order they were sent. `send` may return before the peer has
/// received the message, but only as far as the transport buffers it: callers that send
/// and receive in turn (as the collectives do) keep each message small enough for that.
pub trait Transport: Send {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// How many bytes one `send` can hand off before the peer starts receiving (the
    /// collectives keep their messages within half of it, so that sending and
    /// receiving in turn can never deadlock).
    fn buffered_bytes(&self) -> usize;
    /// Sends `data` to `peer` as one message labelled `tag`.
    fn send(&mut self, peer: usize, tag: u32, data: &[u8]) -> Result<()>;
    /// Receives the next message from `peer` into `buf`. It must carry `tag` and exactly
    /// `buf.len()` bytes; anything else is an error naming the peer.
    fn recv(&mut self, peer: usize, tag: u32, buf: &mut [u8]) -> Result<()>;
    /// A transport with its own sum-allreduce over the whole group (MPI) runs it here;
    /// None: the collectives' own algorithms are used.
    fn allreduce_sum_native(&mut self, _data: &mut [f32]) -> Option<Result<()>> {
        None
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn size(&self) -> usize {
        (**self).size()
    }
    fn buffered_bytes(&self) -> usize {
        (**self).buffered_bytes()
    }
    fn send(&mut self, peer: usize, tag: u32, data: &[u8]) -> Result<()> {
        (**self).send(peer, tag, data)
    }
    fn recv(&mut self, peer: usize, tag: u32, buf: &mut [u8]) -> Result<()> {
        (**self).recv(peer, tag, buf)
    }
    fn allreduce_sum_native(&mut self, data: &mut [f32]) -> Option<Result<()>> {
        (**self).allreduce_sum_native(data)
    }
}
