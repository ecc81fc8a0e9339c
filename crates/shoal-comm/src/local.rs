//! The in-process transport: ranks are threads of one process connected by channels.
//! It is the reference the other transports are tested against and needs no network.

use crate::transport::Transport;
use crate::{Error, Result};
use std::sync::mpsc::{channel, Receiver, Sender};

type Msg = (u32, Vec<u8>);

/// One rank's end of an in-process group.
pub struct LocalTransport {
    rank: usize,
    to: Vec<Option<Sender<Msg>>>,
    from: Vec<Option<Receiver<Msg>>>,
}

impl LocalTransport {
    /// A fully connected group of `n` ranks; hand element `i` to the thread of rank `i`.
    pub fn group(n: usize) -> Vec<LocalTransport> {
        let mut to: Vec<Vec<Option<Sender<Msg>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        let mut from: Vec<Vec<Option<Receiver<Msg>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        for (i, row) in to.iter_mut().enumerate() {
            for (j, slot) in row.iter_mut().enumerate() {
                if i != j {
                    let (s, r) = channel();
                    *slot = Some(s);
                    from[j][i] = Some(r);
                }
            }
        }
        to.into_iter()
            .zip(from)
            .enumerate()
            .map(|(rank, (to, from))| LocalTransport { rank, to, from })
            .collect()
    }

    fn check(&self, peer: usize) -> Result<()> {
        if peer >= self.to.len() || peer == self.rank {
            return Err(Error::BadRank {
                peer,
                rank: self.rank,
                size: self.to.len(),
            });
        }
        Ok(())
    }
}

impl Transport for LocalTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.to.len()
    }

    fn buffered_bytes(&self) -> usize {
        usize::MAX
    }

    fn send(&mut self, peer: usize, tag: u32, data: &[u8]) -> Result<()> {
        self.check(peer)?;
        let s = self.to[peer].as_ref().ok_or(Error::Disconnected { peer })?;
        s.send((tag, data.to_vec()))
            .map_err(|_| Error::Disconnected { peer })
    }

    fn recv(&mut self, peer: usize, tag: u32, buf: &mut [u8]) -> Result<()> {
        self.check(peer)?;
        let r = self.from[peer]
            .as_ref()
            .ok_or(Error::Disconnected { peer })?;
        let (t, data) = r.recv().map_err(|_| Error::Disconnected { peer })?;
        if t != tag || data.len() != buf.len() {
            return Err(Error::Frame {
                peer,
                why: format!(
                    "expected tag {tag} with {} bytes, got tag {t} with {} bytes",
                    buf.len(),
                    data.len()
                ),
            });
        }
        buf.copy_from_slice(&data);
        Ok(())
    }

    fn recv_any(&mut self, peer: usize, buf: &mut Vec<u8>, max: u64) -> Result<u32> {
        self.check(peer)?;
        let r = self.from[peer]
            .as_ref()
            .ok_or(Error::Disconnected { peer })?;
        let (t, data) = r.recv().map_err(|_| Error::Disconnected { peer })?;
        if data.len() as u64 > max {
            return Err(too_long(peer, data.len() as u64, max));
        }
        buf.clear();
        buf.extend_from_slice(&data);
        Ok(t)
    }
}

/// A message over the receiver's limit.
pub(crate) fn too_long(peer: usize, len: u64, max: u64) -> Error {
    Error::Frame {
        peer,
        why: format!("message of {len} bytes exceeds the limit of {max}"),
    }
}
