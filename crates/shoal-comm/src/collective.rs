//! Collectives on flat `f32` buffers over any [`Transport`]: ring allreduce
//! (reduce-scatter then allgather, each segment moved in pieces so that sending and
//! receiving alternate and the transport never has to buffer more than one piece per
//! direction), the two-level allreduce for ranks spread over several hosts (reduce-scatter
//! within each host, ring allreduce of each slice across hosts, allgather within each
//! host: only `2 (nodes-1) / nodes` of the buffer crosses the network per host instead
//! of `2 (n-1) / n` on a flat ring), ring allgather, pipelined broadcast, and a barrier.

use crate::frame::{f32_bytes, f32_bytes_mut};
use crate::transport::Transport;
use crate::{Error, Result};

/// Largest piece in bytes; transports that buffer less get pieces of half what they
/// buffer (64 KB over TCP). 256 KB pieces keep a piece in cache between its copy into a
/// shared-memory ring and the peer's copy out (measured on 2 ranks: 1 MB allreduce
/// 3.4 -> 4.0 GB/s and 16 MB 5.3 -> 5.7 GB/s against 4 MB pieces).
pub const DEFAULT_PIECE_BYTES: usize = 256 << 10;
/// Largest allreduce (in bytes) done by recursive doubling rather than the ring.
pub const SMALL_BYTES: usize = 16 * 1024;

/// Bounds of part `i` when `len` values are split into `n` contiguous parts whose sizes
/// differ by at most one (ring segments, parameter-server shard ranges).
pub fn split_range(len: usize, n: usize, i: usize) -> (usize, usize) {
    let base = len / n;
    let extra = len % n;
    let start = i * base + i.min(extra);
    (start, start + base + usize::from(i < extra))
}

/// A group of ranks running collectives over a transport. Each call must be made by
/// every rank, in the same order, with buffers of the same length.
pub struct Communicator<T: Transport> {
    t: T,
    piece: usize,
    scratch: Vec<f32>,
    /// Counts calls; sent as the message tag so that ranks running different
    /// collectives (a bug in the caller) fail loudly instead of mixing data.
    op: u32,
    /// Every rank, in order (the flat ring).
    all: Vec<usize>,
    /// Two-level layout, when the ranks span several hosts with as many ranks each:
    /// this host's ranks, and the ranks with this rank's place on every host.
    local: Vec<usize>,
    cross: Vec<usize>,
}

impl<T: Transport> Communicator<T> {
    pub fn new(t: T) -> Self {
        Self::with_piece_bytes(t, DEFAULT_PIECE_BYTES)
    }

    /// A communicator that moves data in pieces of at most `piece_bytes` (and at most
    /// half of what the transport buffers).
    pub fn with_piece_bytes(t: T, piece_bytes: usize) -> Self {
        let limit = (t.buffered_bytes() / 2).saturating_sub(64);
        let piece = (piece_bytes.min(limit) / 4).max(1);
        let all = (0..t.size()).collect();
        Self {
            t,
            piece,
            scratch: vec![0.0; piece],
            op: 0,
            all,
            local: Vec::new(),
            cross: Vec::new(),
        }
    }

    /// Declares on which host each rank runs (`host_of[rank]`, any labels). When the
    /// ranks span several hosts with the same number on each, large allreduces become
    /// two-level; otherwise they stay on the flat ring. Every rank must pass the same.
    pub fn set_hosts(&mut self, host_of: &[usize]) -> Result<()> {
        let n = self.size();
        if host_of.len() != n {
            return Err(Error::Mismatch(format!(
                "set_hosts: {} labels for {n} ranks",
                host_of.len()
            )));
        }
        let r = self.rank();
        let local: Vec<usize> = (0..n).filter(|&q| host_of[q] == host_of[r]).collect();
        let mut hosts: Vec<usize> = host_of.to_vec();
        hosts.sort_unstable();
        hosts.dedup();
        let even = hosts
            .iter()
            .all(|h| host_of.iter().filter(|x| *x == h).count() == local.len());
        self.local.clear();
        self.cross.clear();
        if hosts.len() > 1 && local.len() > 1 && even {
            let me = local.iter().position(|&q| q == r).unwrap_or(0);
            // The rank at position `me` on each host, hosts in order.
            for h in &hosts {
                let on_h: Vec<usize> = (0..n).filter(|&q| host_of[q] == *h).collect();
                self.cross.push(on_h[me]);
            }
            self.local = local;
        }
        Ok(())
    }

    pub fn rank(&self) -> usize {
        self.t.rank()
    }

    pub fn size(&self) -> usize {
        self.t.size()
    }

    pub fn transport(&mut self) -> &mut T {
        &mut self.t
    }

    fn next_tag(&mut self) -> u32 {
        self.op = self.op.wrapping_add(1);
        self.op
    }

    /// Sends `out` to `to` while receiving `inc.len()` values from `from`, piece by
    /// piece; `reduce` adds the received values into `inc`, otherwise they overwrite it.
    fn exchange(
        &mut self,
        to: usize,
        out: &[f32],
        from: usize,
        inc: &mut [f32],
        reduce: bool,
        tag: u32,
    ) -> Result<()> {
        let p = self.piece;
        let pieces = out.len().div_ceil(p).max(inc.len().div_ceil(p));
        for k in 0..pieces {
            let o = &out[(k * p).min(out.len())..((k + 1) * p).min(out.len())];
            if !o.is_empty() {
                self.t.send(to, tag, f32_bytes(o))?;
            }
            let lo = (k * p).min(inc.len());
            let hi = ((k + 1) * p).min(inc.len());
            if hi > lo {
                if reduce {
                    let s = &mut self.scratch[..hi - lo];
                    self.t.recv(from, tag, f32_bytes_mut(s))?;
                    for (d, v) in inc[lo..hi].iter_mut().zip(s.iter()) {
                        *d += v;
                    }
                } else {
                    self.t.recv(from, tag, f32_bytes_mut(&mut inc[lo..hi]))?;
                }
            }
        }
        Ok(())
    }

    /// Replaces `data` on every rank by the element-wise sum over all ranks (the same
    /// bits on every rank). A transport with its own allreduce (MPI) does it; otherwise
    /// messages up to [`SMALL_BYTES`] use recursive doubling
    /// (`log2 n` exchanges of the whole buffer: latency-bound sizes); larger ones the
    /// ring (`2 (n-1) / n` of the buffer crosses each link: bandwidth-bound sizes).
    pub fn allreduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        if let Some(r) = self.t.allreduce_sum_native(data) {
            return r;
        }
        let n = self.size();
        if n > 1 && !data.is_empty() && data.len() * 4 <= SMALL_BYTES.min(self.piece * 4) {
            return self.allreduce_doubling(data);
        }
        if !self.local.is_empty() {
            return self.allreduce_two_level(data);
        }
        self.allreduce_ring(data)
    }

    /// Reduce-scatter within each host, a ring allreduce of each slice among the ranks
    /// holding it on every host, allgather within each host (see
    /// [`Communicator::set_hosts`]; the flat ring when no layout is set).
    pub fn allreduce_two_level(&mut self, data: &mut [f32]) -> Result<()> {
        if self.local.is_empty() {
            return self.allreduce_ring(data);
        }
        let tag = self.next_tag();
        let local = std::mem::take(&mut self.local);
        let cross = std::mem::take(&mut self.cross);
        let r = self.rank();
        let g = local.len();
        let me = local.iter().position(|&q| q == r).unwrap_or(0);
        let res = self
            .ring(data, &local, me, true, false, tag)
            .and_then(|()| {
                // After the reduce-scatter this rank holds its host's sum of slice me+1.
                let (a, b) = split_range(data.len(), g, (me + 1) % g);
                let at = cross.iter().position(|&q| q == r).unwrap_or(0);
                self.ring(&mut data[a..b], &cross, at, true, true, tag)
            })
            .and_then(|()| self.ring(data, &local, me, false, true, tag));
        self.local = local;
        self.cross = cross;
        res
    }

    /// Recursive doubling. With `n` not a power of two, the ranks above the largest
    /// power of two `p` first fold their data into rank `r - p` and get the result back
    /// at the end.
    pub fn allreduce_doubling(&mut self, data: &mut [f32]) -> Result<()> {
        let n = self.size();
        let tag = self.next_tag();
        if n == 1 || data.is_empty() {
            return Ok(());
        }
        if data.len() > self.piece {
            return Err(Error::Mismatch(format!(
                "recursive doubling moves whole buffers; {} values exceed the piece of {}",
                data.len(),
                self.piece
            )));
        }
        let r = self.rank();
        let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
        let len = data.len();
        if r >= p {
            self.t.send(r - p, tag, f32_bytes(data))?;
            self.t.recv(r - p, tag, f32_bytes_mut(data))?;
            return Ok(());
        }
        if r + p < n {
            let s = &mut self.scratch[..len];
            self.t.recv(r + p, tag, f32_bytes_mut(s))?;
            for (d, v) in data.iter_mut().zip(s.iter()) {
                *d += v;
            }
        }
        let mut mask = 1;
        while mask < p {
            let partner = r ^ mask;
            self.t.send(partner, tag, f32_bytes(data))?;
            let s = &mut self.scratch[..len];
            self.t.recv(partner, tag, f32_bytes_mut(s))?;
            // Both partners add the same two values (IEEE addition is commutative), so
            // every rank ends with the same bits.
            for (d, v) in data.iter_mut().zip(s.iter()) {
                *d += v;
            }
            mask <<= 1;
        }
        if r + p < n {
            self.t.send(r + p, tag, f32_bytes(data))?;
        }
        Ok(())
    }

    /// The ring allreduce (reduce-scatter, then allgather), for any size.
    pub fn allreduce_ring(&mut self, data: &mut [f32]) -> Result<()> {
        let tag = self.next_tag();
        let all = std::mem::take(&mut self.all);
        let r = self.rank();
        let res = self.ring(data, &all, r, true, true, tag);
        self.all = all;
        res
    }

    /// The ring over `group` (ranks in ring order; this rank at `me`): the
    /// reduce-scatter (after which position `i` holds the group's sum of segment
    /// `i + 1`) and/or the allgather of those segments.
    fn ring(
        &mut self,
        data: &mut [f32],
        group: &[usize],
        me: usize,
        scatter: bool,
        gather: bool,
        tag: u32,
    ) -> Result<()> {
        let n = group.len();
        if n <= 1 || data.is_empty() {
            return Ok(());
        }
        let r = me;
        let (next, prev) = (group[(r + 1) % n], group[(r + n - 1) % n]);
        if scatter {
            for s in 0..n - 1 {
                let send_i = (r + n - s) % n;
                let recv_i = (r + 2 * n - s - 1) % n;
                let (a, b) = split_range(data.len(), n, send_i);
                let (c, d) = split_range(data.len(), n, recv_i);
                let (out, inc) = split_two(data, (a, b), (c, d));
                self.exchange(next, out, prev, inc, true, tag)?;
            }
        }
        if gather {
            for s in 0..n - 1 {
                let send_i = (r + 1 + n - s) % n;
                let recv_i = (r + n - s) % n;
                let (a, b) = split_range(data.len(), n, send_i);
                let (c, d) = split_range(data.len(), n, recv_i);
                let (out, inc) = split_two(data, (a, b), (c, d));
                self.exchange(next, out, prev, inc, false, tag)?;
            }
        }
        Ok(())
    }

    /// Concatenates every rank's `mine` (all the same length) into `out`, in rank order.
    pub fn allgather(&mut self, mine: &[f32], out: &mut [f32]) -> Result<()> {
        let n = self.size();
        let m = mine.len();
        if out.len() != n * m {
            return Err(Error::Mismatch(format!(
                "allgather: output holds {} values, expected {n} x {m}",
                out.len()
            )));
        }
        let tag = self.next_tag();
        let r = self.rank();
        out[r * m..(r + 1) * m].copy_from_slice(mine);
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        for s in 0..n.saturating_sub(1) {
            let send_i = (r + n - s) % n;
            let recv_i = (r + 2 * n - s - 1) % n;
            let (o, i) = split_two(
                out,
                (send_i * m, (send_i + 1) * m),
                (recv_i * m, (recv_i + 1) * m),
            );
            self.exchange(next, o, prev, i, false, tag)?;
        }
        Ok(())
    }

    /// Copies `data` from rank `root` to every rank, pipelined around the ring.
    pub fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()> {
        let n = self.size();
        if root >= n {
            return Err(Error::BadRank {
                peer: root,
                rank: self.rank(),
                size: n,
            });
        }
        let tag = self.next_tag();
        if n == 1 {
            return Ok(());
        }
        let r = self.rank();
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let p = self.piece;
        let len = data.len();
        for lo in (0..len).step_by(p) {
            let piece = &mut data[lo..(lo + p).min(len)];
            if r != root {
                self.t.recv(prev, tag, f32_bytes_mut(piece))?;
            }
            if next != root {
                self.t.send(next, tag, f32_bytes(piece))?;
            }
        }
        Ok(())
    }

    /// Returns when every rank has called it.
    pub fn barrier(&mut self) -> Result<()> {
        let mut one = [1.0f32];
        self.allreduce_sum(&mut one)?;
        if one[0] as usize != self.size() {
            return Err(Error::Mismatch(format!(
                "barrier: counted {} ranks, expected {}",
                one[0],
                self.size()
            )));
        }
        Ok(())
    }
}

/// Two disjoint ranges of one slice, the first immutable.
fn split_two(data: &mut [f32], a: (usize, usize), b: (usize, usize)) -> (&[f32], &mut [f32]) {
    if a.1 <= b.0 {
        let (x, y) = data.split_at_mut(b.0);
        (&x[a.0..a.1], &mut y[..b.1 - b.0])
    } else {
        let (x, y) = data.split_at_mut(a.0);
        (&y[..a.1 - a.0], &mut x[b.0..b.1])
    }
}

/// Many small gradients packed into one persistent buffer so that one collective
/// moves them all (Horovod's fusion buffer). Slots are fixed at creation.
#[derive(Debug, Clone)]
pub struct FusionBuffer {
    buf: Vec<f32>,
    slots: Vec<(usize, usize)>,
}

impl FusionBuffer {
    /// A buffer with one slot per entry of `sizes`.
    pub fn new(sizes: &[usize]) -> Self {
        let mut slots = Vec::with_capacity(sizes.len());
        let mut at = 0;
        for &n in sizes {
            slots.push((at, at + n));
            at += n;
        }
        Self {
            buf: vec![0.0; at],
            slots,
        }
    }

    /// Slot `i`, to fill before and read after the collective.
    pub fn slot_mut(&mut self, i: usize) -> &mut [f32] {
        let (a, b) = self.slots[i];
        &mut self.buf[a..b]
    }

    pub fn slot(&self, i: usize) -> &[f32] {
        let (a, b) = self.slots[i];
        &self.buf[a..b]
    }

    /// Sums every slot over all ranks in one allreduce; with `average`, divides by the
    /// number of ranks.
    pub fn allreduce<T: Transport>(
        &mut self,
        comm: &mut Communicator<T>,
        average: bool,
    ) -> Result<()> {
        comm.allreduce_sum(&mut self.buf)?;
        if average {
            let k = 1.0 / comm.size() as f32;
            self.buf.iter_mut().for_each(|x| *x *= k);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_the_buffer() {
        for len in [0, 1, 5, 7, 100] {
            for n in 1..6 {
                let mut next = 0;
                for i in 0..n {
                    let (a, b) = split_range(len, n, i);
                    assert_eq!(a, next);
                    assert!(b - a <= len / n + 1);
                    next = b;
                }
                assert_eq!(next, len);
            }
        }
    }
}
