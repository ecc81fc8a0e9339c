//! The crate's error type.

/// Everything that can go wrong moving bytes between ranks.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket operation failed; `what` says which, with the peer.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// A peer sent bytes that are not a valid frame (or not the expected one).
    #[error("bad frame from rank {peer}: {why}")]
    Frame { peer: usize, why: String },
    /// A peer closed its connection or its end of the channel.
    #[error("rank {peer} disconnected")]
    Disconnected { peer: usize },
    /// A rank outside the group, or the caller's own rank where a peer is needed.
    #[error("invalid peer rank {peer} (group of {size}, this is rank {rank})")]
    BadRank {
        peer: usize,
        rank: usize,
        size: usize,
    },
    /// Buffers whose sizes must agree do not, or a group-level condition failed.
    #[error("{0}")]
    Mismatch(String),
    /// TLS could not be set up or a handshake failed; `what` says which.
    #[error("{what}: {why}")]
    Tls { what: String, why: String },
    /// The optimizer on a parameter-server shard refused an update.
    #[error(transparent)]
    Optim(#[from] shoal_optim::Error),
}

impl Error {
    /// The same error naming `peer` where it names a rank: a conversation carried by a
    /// two-rank transport (a parameter-server link) reports the worker or shard, not
    /// the pair's rank 0 or 1.
    pub(crate) fn about(self, peer: usize) -> Self {
        match self {
            Error::Frame { why, .. } => Error::Frame { peer, why },
            Error::Disconnected { .. } => Error::Disconnected { peer },
            e => e,
        }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
