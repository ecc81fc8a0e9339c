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
    /// Sends one message gathered from `parts` laid back to back. The default copies
    /// them into one buffer; the socket and shared-memory transports write them as
    /// they are.
    fn send_parts(&mut self, peer: usize, tag: u32, parts: &[&[u8]]) -> Result<()> {
        match parts {
            [one] => self.send(peer, tag, one),
            _ => self.send(peer, tag, &parts.concat()),
        }
    }
    /// Receives the next message from `peer` whatever its tag and length, into `buf`
    /// (resized to the message, its capacity kept from one call to the next), and
    /// returns its tag: for conversations whose messages vary in size (the parameter
    /// server's). A message longer than `max` bytes is an error naming the peer, found
    /// before anything is allocated for it.
    fn recv_any(&mut self, peer: usize, buf: &mut Vec<u8>, max: u64) -> Result<u32>;
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
    fn send_parts(&mut self, peer: usize, tag: u32, parts: &[&[u8]]) -> Result<()> {
        (**self).send_parts(peer, tag, parts)
    }
    fn recv_any(&mut self, peer: usize, buf: &mut Vec<u8>, max: u64) -> Result<u32> {
        (**self).recv_any(peer, buf, max)
    }
    fn allreduce_sum_native(&mut self, data: &mut [f32]) -> Option<Result<()>> {
        (**self).allreduce_sum_native(data)
    }
}
