//! The TCP transport: one connection per pair of ranks. Rank `i` accepts connections
//! from the ranks above it and connects to the ranks below it; each connection opens
//! with a `Hello` frame carrying the sender's rank and the job token, and a connection
//! that presents a wrong token, an unknown rank or a malformed frame is refused. Sends
//! write the header and the caller's buffer with vectored writes (no copy, no
//! allocation); receives read straight into the caller's buffer. With
//! [`TcpOptions::tls`] every connection runs a mutually authenticated TLS handshake
//! before its hello (see [`crate::tls`]).

use crate::frame::{read_exact, read_header, write_frame, Kind, DEFAULT_MAX_PAYLOAD};
use crate::tls::{Socket, Tls};
use crate::transport::Transport;
use crate::{Error, Result};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connection settings.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// Shared secret every connection must present.
    pub token: String,
    /// How long to keep trying to reach peers that are not listening yet.
    pub connect_timeout: Duration,
    /// Largest payload accepted in one frame.
    pub max_payload: u64,
    /// A receive or a send that waits longer than this fails (None: wait for ever).
    pub io_timeout: Option<Duration>,
    /// TLS on every connection (None: plain TCP).
    pub tls: Option<Arc<Tls>>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            token: String::new(),
            connect_timeout: Duration::from_secs(30),
            max_payload: DEFAULT_MAX_PAYLOAD,
            io_timeout: None,
            tls: None,
        }
    }
}

/// How long an accepted connection has to present its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(3);

/// Most connections that may wait for their hello at once on a listener.
const MAX_PENDING: usize = 256;

/// What a connection said when it arrived: its hello's payload (the sender's rank and
/// the token), or why it is not one.
struct Hello {
    from: SocketAddr,
    said: Result<(Socket, Vec<u8>)>,
}

/// Runs the TLS handshake (with `tls`) and reads the hello of a connection just
/// accepted, within `timeout`.
fn read_hello(s: TcpStream, from: SocketAddr, timeout: Duration, tls: Option<&Tls>) -> Hello {
    let said = (|| -> Result<(Socket, Vec<u8>)> {
        s.set_nonblocking(false)
            .and_then(|_| s.set_nodelay(true))
            .and_then(|_| s.set_read_timeout(Some(timeout)))
            .map_err(io(format!("configuring the connection from {from}")))?;
        let mut s = match tls {
            Some(t) => t.accept(s, timeout)?,
            None => Socket::Plain(s),
        };
        let h = read_header(&mut s, usize::MAX, 1024)?;
        if h.kind != Kind::Hello || h.len < 8 {
            return Err(Error::Frame {
                peer: usize::MAX,
                why: "connection did not open with a hello".into(),
            });
        }
        let mut p = vec![0u8; h.len as usize];
        read_exact(&mut s, &mut p, usize::MAX)?;
        Ok((s, p))
    })();
    Hello { from, said }
}

/// One rank's connections to all its peers.
pub struct TcpTransport {
    rank: usize,
    peers: Vec<Option<Socket>>,
    max_payload: u64,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

fn hello_payload(rank: usize, token: &str) -> Vec<u8> {
    let mut p = (rank as u64).to_le_bytes().to_vec();
    p.extend_from_slice(token.as_bytes());
    p
}

impl TcpTransport {
    /// Joins the group: `listener` is this rank's bound listener (at `addrs[rank]`),
    /// `addrs` every rank's address. Returns when connected to every peer.
    pub fn connect(
        rank: usize,
        addrs: &[SocketAddr],
        listener: TcpListener,
        opts: &TcpOptions,
    ) -> Result<Self> {
        if opts.token.is_empty() {
            return Err(Error::Mismatch(
                "the job token is empty: every connection must present one".into(),
            ));
        }
        let n = addrs.len();
        if rank >= n {
            return Err(Error::BadRank {
                peer: rank,
                rank,
                size: n,
            });
        }
        let mut peers: Vec<Option<Socket>> = (0..n).map(|_| None).collect();
        let deadline = Instant::now() + opts.connect_timeout;
        // Connect to every lower rank (retrying while it starts), and introduce ourselves.
        for (peer, addr) in addrs.iter().enumerate().take(rank) {
            let s = loop {
                match TcpStream::connect_timeout(addr, Duration::from_millis(500)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        return Err(Error::Io {
                            what: format!("connecting to rank {peer} at {addr}"),
                            source: e,
                        })
                    }
                }
            };
            s.set_nodelay(true)
                .map_err(io(format!("configuring the connection to rank {peer}")))?;
            let mut s = match &opts.tls {
                Some(t) => t.connect(s, opts.connect_timeout.max(HELLO_TIMEOUT))?,
                None => Socket::Plain(s),
            };
            let payload = hello_payload(rank, &opts.token);
            write_frame(&mut s, Kind::Hello, 0, &[&payload], peer)?;
            peers[peer] = Some(s);
        }
        // Accept every higher rank; check who it is and its token. Hellos are read by
        // a thread per connection (each within HELLO_TIMEOUT), so a stranger that
        // connects and says nothing delays no real peer; at most MAX_PENDING
        // connections wait for their hello at once, more wait in the backlog.
        listener
            .set_nonblocking(true)
            .map_err(io("configuring the listener".into()))?;
        let hello_timeout = HELLO_TIMEOUT.min(opts.connect_timeout);
        let (tx, rx) = std::sync::mpsc::channel::<Hello>();
        let pending = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut missing = n - rank - 1;
        while missing > 0 {
            use std::sync::atomic::Ordering::SeqCst;
            // With MAX_PENDING hellos outstanding, newer connections wait in the
            // kernel's backlog (not dropped: a real peer among them is taken as soon as
            // a stranger's deadline frees a place).
            let mut accepted = false;
            if pending.load(SeqCst) < MAX_PENDING {
                match listener.accept() {
                    Ok((s, from)) => {
                        pending.fetch_add(1, SeqCst);
                        let (tx, pending) = (tx.clone(), pending.clone());
                        let tls = opts.tls.clone();
                        std::thread::spawn(move || {
                            let h = read_hello(s, from, hello_timeout, tls.as_deref());
                            pending.fetch_sub(1, SeqCst);
                            let _ = tx.send(h);
                        });
                        accepted = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        return Err(Error::Io {
                            what: format!("rank {rank} accepting peers"),
                            source: e,
                        })
                    }
                }
            }
            let arrived = match accepted {
                true => rx.try_recv().ok(),
                false => rx.recv_timeout(Duration::from_millis(2)).ok(),
            };
            let Some(Hello { from, said }) = arrived else {
                continue;
            };
            // A connection that fails its handshake is dropped; the group waits on.
            let who = said.and_then(|(stream, p)| {
                let mut r = [0u8; 8];
                r.copy_from_slice(&p[..8]);
                let peer = u64::from_le_bytes(r) as usize;
                if !crate::frame::same_token(&p[8..], opts.token.as_bytes()) {
                    return Err(Error::Frame {
                        peer,
                        why: "wrong job token".into(),
                    });
                }
                if peer <= rank || peer >= n || peers[peer].is_some() {
                    return Err(Error::BadRank {
                        peer,
                        rank,
                        size: n,
                    });
                }
                Ok((peer, stream))
            });
            match who {
                Ok((peer, stream)) => {
                    peers[peer] = Some(stream);
                    missing -= 1;
                }
                Err(e) => {
                    eprintln!("shoal-comm: rank {rank} refused a connection from {from}: {e}");
                }
            }
        }
        listener
            .set_nonblocking(false)
            .map_err(io("configuring the listener".into()))?;
        for s in peers.iter().flatten() {
            s.tcp()
                .set_read_timeout(opts.io_timeout)
                .and_then(|_| s.tcp().set_write_timeout(opts.io_timeout))
                .map_err(io("configuring a connection".into()))?;
        }
        Ok(Self {
            rank,
            peers,
            max_payload: opts.max_payload,
        })
    }

    /// A group of two over one connection already made (and authenticated) by the
    /// caller: this side is `rank` (0 or 1), the connection leads to the other.
    pub fn pair(stream: Socket, rank: usize, max_payload: u64) -> Result<Self> {
        if rank > 1 {
            return Err(Error::BadRank {
                peer: rank,
                rank,
                size: 2,
            });
        }
        let _ = stream.tcp().set_nodelay(true);
        let mut peers = vec![None, None];
        peers[1 - rank] = Some(stream);
        Ok(Self {
            rank,
            peers,
            max_payload,
        })
    }

    fn stream(&mut self, peer: usize) -> Result<&mut Socket> {
        let (rank, size) = (self.rank, self.peers.len());
        self.peers
            .get_mut(peer)
            .and_then(|s| s.as_mut())
            .ok_or(Error::BadRank { peer, rank, size })
    }
}

impl Transport for TcpTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.peers.len()
    }

    fn buffered_bytes(&self) -> usize {
        // Linux's default receive buffer on loopback and LANs is at least 128 KiB.
        128 * 1024
    }

    fn send(&mut self, peer: usize, tag: u32, data: &[u8]) -> Result<()> {
        let s = self.stream(peer)?;
        write_frame(s, Kind::Data, tag, &[data], peer)
    }

    fn recv(&mut self, peer: usize, tag: u32, buf: &mut [u8]) -> Result<()> {
        let max = self.max_payload;
        let s = self.stream(peer)?;
        let h = read_header(s, peer, max)?;
        if h.kind != Kind::Data || h.tag != tag || h.len != buf.len() as u64 {
            return Err(Error::Frame {
                peer,
                why: format!(
                    "expected data tag {tag} with {} bytes, got {:?} tag {} with {} bytes",
                    buf.len(),
                    h.kind,
                    h.tag,
                    h.len
                ),
            });
        }
        read_exact(s, buf, peer)
    }

    fn send_parts(&mut self, peer: usize, tag: u32, parts: &[&[u8]]) -> Result<()> {
        let s = self.stream(peer)?;
        write_frame(s, Kind::Data, tag, parts, peer)
    }

    fn recv_any(&mut self, peer: usize, buf: &mut Vec<u8>, max: u64) -> Result<u32> {
        let max = max.min(self.max_payload);
        let s = self.stream(peer)?;
        let h = read_header(s, peer, max)?;
        if h.kind != Kind::Data {
            return Err(Error::Frame {
                peer,
                why: format!("expected a data frame, got {:?}", h.kind),
            });
        }
        buf.clear();
        buf.resize(h.len as usize, 0);
        read_exact(s, buf, peer)?;
        Ok(h.tag)
    }
}
