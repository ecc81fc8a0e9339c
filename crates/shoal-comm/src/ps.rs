//! The parameter server: `M` shards, each owning a contiguous range of the flat dense
//! parameter buffer (ranges balanced by size) and the sparse rows whose key hashes to
//! it (created on first touch). Workers push gradients and pull parameters over any
//! [`Transport`]: each worker–shard conversation is a group of two ranks (TCP
//! connections accepted on the shard's port; shared-memory ring pairs, [`shm_link`],
//! between processes of one host; in-process pairs in tests), its messages of any
//! length ([`Transport::recv_any`]). In sync mode a shard sums the pushes of all `N` workers for a step, applies
//! its optimizer once, then serves the pulls for that step; in async mode it applies
//! each push on arrival, and a pull may run ahead of the applied updates by at most
//! `max_staleness` steps. Optimizer state lives on the server (`shoal-optim`).
//!
//! A worker that disconnects before saying goodbye fails the shard: every other
//! worker's next pull returns an error naming it instead of waiting for ever.

use crate::frame::{f32_bytes, u64_bytes, DEFAULT_MAX_PAYLOAD};
use crate::tcp::TcpTransport;
use crate::tls::{Socket, Tls};
use crate::{Error, Result, Transport};
use shoal_optim::{Optimizer, OptimizerConfig, SparseRule, SparseTable};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const OP_HELLO: u32 = 1;
const OP_INIT: u32 = 2;
const OP_PUSH: u32 = 3;
const OP_PULL: u32 = 4;
const OP_PULL_SPARSE: u32 = 5;
const OP_BYE: u32 = 6;
const OP_STATE: u32 = 7;
const OP_INIT_STATE: u32 = 8;
const OP_SPARSE_STATE: u32 = 9;
const OP_SPARSE_RESTORE: u32 = 10;
const OP_PEEK_SPARSE: u32 = 11;
const OP_OK: u32 = 100;
const OP_ERR: u32 = 101;

/// How a shard applies pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsMode {
    /// Sum the pushes of every worker for a step, then apply once.
    Sync,
    /// Apply each push on arrival; a pull for step `s` waits until at least
    /// `s - max_staleness` updates have been applied (None: never waits).
    Async { max_staleness: Option<u64> },
}

/// One shard's settings.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    pub workers: usize,
    pub mode: PsMode,
    pub optimizer: OptimizerConfig,
    /// Learning rate of pushes that carry none (see [`PsClient::push_weighted`]).
    pub lr: f32,
    /// Divide summed gradients by the number of workers (mean rather than sum).
    pub average: bool,
    /// Width of a sparse row (0: no sparse table).
    pub sparse_dim: usize,
    /// How sparse rows are updated (None: the dense optimizer's sparse counterpart).
    pub sparse_rule: Option<SparseRule>,
    /// Sparse rows' learning rate (None: the push's).
    pub sparse_lr: Option<f32>,
    /// New sparse rows start uniform in +-scale, from a hash of (seed, key).
    pub sparse_init: (f32, u64),
    /// Eviction of cold rows: every this many shard updates, the rows not updated in the
    /// last this many are removed (a key seen again starts afresh); 0: off.
    pub sparse_evict_idle: u64,
    pub token: String,
    /// How long a pull waits for the other workers before failing.
    pub timeout: Duration,
    /// TLS on the shard's TCP connections (None: plain TCP; shared-memory links have
    /// none).
    pub tls: Option<Arc<Tls>>,
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            mode: PsMode::Sync,
            optimizer: OptimizerConfig::default(),
            lr: 1e-3,
            average: true,
            sparse_dim: 0,
            sparse_rule: None,
            sparse_lr: None,
            sparse_init: (0.01, 0),
            sparse_evict_idle: 0,
            token: String::new(),
            timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

/// The contiguous range of a `total`-value buffer owned by shard `i` of `m`.
pub use crate::collective::split_range as shard_range;

/// The shard that owns sparse key `key` (SplitMix64 of the key, so neighbouring ids
/// spread evenly).
pub fn sparse_shard(key: u64, m: usize) -> usize {
    (shoal_optim::hash::mix64(key.wrapping_add(0x9E37_79B9_7F4A_7C15)) % m as u64) as usize
}

/// Sparse gradients summed per key into flat buffers that keep their capacity from
/// one update to the next (no allocation per key or per step once warm).
#[derive(Default)]
struct SparseSum {
    slot: HashMap<u64, u32>,
    keys: Vec<u64>,
    grads: Vec<f32>,
}

impl SparseSum {
    /// Adds `w * g` to key `k`'s sum.
    fn add(&mut self, k: u64, g: &[f32], w: f32) {
        let n = self.keys.len() as u32;
        let s = *self.slot.entry(k).or_insert(n) as usize;
        let d = g.len();
        if s == n as usize {
            self.keys.push(k);
            self.grads.extend(g.iter().map(|x| w * x));
        } else {
            for (a, b) in self.grads[s * d..(s + 1) * d].iter_mut().zip(g) {
                *a += w * b;
            }
        }
    }

    fn clear(&mut self) {
        self.slot.clear();
        self.keys.clear();
        self.grads.clear();
    }
}

struct Shard {
    cfg: ShardConfig,
    params: Option<Vec<f32>>,
    opt: Option<Optimizer>,
    /// Updates applied so far.
    applied: u64,
    /// Sync mode: the weighted sum of this step's pushes, the sum of their weights,
    /// the learning rate they carry, and how many arrived.
    pending: Vec<f32>,
    pending_sparse: SparseSum,
    pending_weight: f32,
    pending_lr: f32,
    arrived: usize,
    sparse: Option<SparseTable>,
    failed: Option<String>,
    done: usize,
}

impl Shard {
    /// One optimizer update with learning rate `lr` from gradient buffers the caller
    /// owns (in sync mode the weighted sum, scaled in place by `1 / weight` for the
    /// mean, so nothing is allocated per update).
    fn apply(
        &mut self,
        lr: f32,
        weight: f32,
        dense: &mut [f32],
        sparse: &mut SparseSum,
    ) -> Result<()> {
        let scale = if self.cfg.average && self.cfg.mode == PsMode::Sync && weight > 0.0 {
            1.0 / weight
        } else {
            1.0
        };
        if let (Some(p), Some(o)) = (self.params.as_mut(), self.opt.as_mut()) {
            if scale != 1.0 {
                dense.iter_mut().for_each(|x| *x *= scale);
            }
            o.step(lr, p, dense)?;
        }
        if let Some(t) = self.sparse.as_mut() {
            if scale != 1.0 {
                sparse.grads.iter_mut().for_each(|x| *x *= scale);
            }
            t.apply(
                &sparse.keys,
                &sparse.grads,
                self.cfg.sparse_lr.unwrap_or(lr),
            )?;
            let every = self.cfg.sparse_evict_idle;
            if every > 0 {
                t.tick();
                if (self.applied + 1).is_multiple_of(every) {
                    t.evict_idle(every.min(u32::MAX as u64) as u32)?;
                }
            }
        }
        self.applied += 1;
        Ok(())
    }
}

/// A running shard: its address and a handle to stop waiting on it.
pub struct PsServer {
    addr: Option<SocketAddr>,
    state: Arc<(Mutex<Shard>, Condvar)>,
    accept: Option<std::thread::JoinHandle<()>>,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// One side of a worker–shard conversation: a transport of two ranks (the shard is
/// rank 0, the worker rank 1) and the index of the other side, which its errors name
/// instead of the pair's rank.
struct Link {
    t: Box<dyn Transport>,
    other: usize,
    who: usize,
}

impl Link {
    fn new(t: Box<dyn Transport>, who: usize) -> Result<Self> {
        if t.size() != 2 {
            return Err(Error::Mismatch(format!(
                "a parameter-server link is a group of two ranks, this one has {}",
                t.size()
            )));
        }
        let other = 1 - t.rank().min(1);
        Ok(Self { t, other, who })
    }

    fn send(&mut self, op: u32, parts: &[&[u8]]) -> Result<()> {
        let who = self.who;
        self.t
            .send_parts(self.other, op, parts)
            .map_err(|e| e.about(who))
    }

    /// Reads one message into `buf` (reused) and returns its operation.
    fn recv(&mut self, buf: &mut Vec<u8>, max: u64) -> Result<u32> {
        let who = self.who;
        self.t
            .recv_any(self.other, buf, max)
            .map_err(|e| e.about(who))
    }
}

fn f32s(b: &[u8]) -> Vec<f32> {
    let mut v = Vec::new();
    f32s_into(b, &mut v);
    v
}

/// Decodes little-endian f32s into `out` (reused across messages).
fn f32s_into(b: &[u8], out: &mut Vec<f32>) {
    out.clear();
    out.extend(
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
}

fn read_u64(b: &[u8], at: usize, peer: usize) -> Result<u64> {
    b.get(at..at + 8)
        .map(|s| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        })
        .ok_or(Error::Frame {
            peer,
            why: "message too short".into(),
        })
}

/// Sparse rows as [`SparseTable::rows`] and [`SparseTable::state`] give them, from
/// every shard (restore into a [`SparseTable`] with [`SparseTable::restore`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseState {
    pub keys: Vec<u64>,
    pub values: Vec<f32>,
    pub state: Vec<f32>,
    pub steps: Vec<u32>,
}

fn encode_sparse(st: &SparseState) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        32 + 8 * st.keys.len() + 4 * (st.values.len() + st.state.len() + st.steps.len()),
    );
    for x in [
        st.keys.len(),
        st.values.len(),
        st.state.len(),
        st.steps.len(),
    ] {
        out.extend_from_slice(&(x as u64).to_le_bytes());
    }
    out.extend_from_slice(u64_bytes(&st.keys));
    out.extend_from_slice(f32_bytes(&st.values));
    out.extend_from_slice(f32_bytes(&st.state));
    for x in &st.steps {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn decode_sparse(b: &[u8], peer: usize) -> Result<SparseState> {
    let n = |at| read_u64(b, at, peer).map(|x| x as usize);
    let (nk, nv, ns, nt) = (n(0)?, n(8)?, n(16)?, n(24)?);
    let want = [
        nk.checked_mul(8),
        nv.checked_mul(4),
        ns.checked_mul(4),
        nt.checked_mul(4),
    ]
    .into_iter()
    .try_fold(32usize, |acc, x| x.and_then(|x| acc.checked_add(x)));
    if want != Some(b.len()) {
        return Err(Error::Frame {
            peer,
            why: "malformed sparse state".into(),
        });
    }
    let mut at = 32;
    let keys = b[at..at + 8 * nk]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    at += 8 * nk;
    let values = f32s(&b[at..at + 4 * nv]);
    at += 4 * nv;
    let state = f32s(&b[at..at + 4 * ns]);
    at += 4 * ns;
    let steps = b[at..at + 4 * nt]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(SparseState {
        keys,
        values,
        state,
        steps,
    })
}

/// A shard's (or, assembled, the whole buffer's) parameters and optimizer state.
#[derive(Debug, Clone, PartialEq)]
pub struct PsState {
    /// Updates the shards have applied (the step the next push carries).
    pub applied: u64,
    /// The optimizer's own step count (bias correction).
    pub optimizer_steps: u64,
    pub params: Vec<f32>,
    /// Named optimizer buffers, each as long as `params`.
    pub buffers: Vec<(String, Vec<f32>)>,
}

fn encode_state(applied: u64, opt_steps: u64, params: &[f32], bufs: &[(&str, &[f32])]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + 4 * params.len() * (1 + bufs.len()));
    out.extend_from_slice(&applied.to_le_bytes());
    out.extend_from_slice(&opt_steps.to_le_bytes());
    out.extend_from_slice(&(bufs.len() as u64).to_le_bytes());
    out.extend_from_slice(&(params.len() as u64).to_le_bytes());
    out.extend_from_slice(f32_bytes(params));
    for (name, b) in bufs {
        out.extend_from_slice(&(name.len() as u64).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(f32_bytes(b));
    }
    out
}

fn decode_state(b: &[u8], peer: usize) -> Result<PsState> {
    let short = || Error::Frame {
        peer,
        why: "state message too short".into(),
    };
    let applied = read_u64(b, 0, peer)?;
    let optimizer_steps = read_u64(b, 8, peer)?;
    let nbuf = read_u64(b, 16, peer)?;
    let mut at = 24;
    let f32s_at = |at: &mut usize| -> Result<Vec<f32>> {
        let n = read_u64(b, *at, peer)? as usize;
        let end = n
            .checked_mul(4)
            .and_then(|x| x.checked_add(*at + 8))
            .ok_or_else(short)?;
        let v = f32s(b.get(*at + 8..end).ok_or_else(short)?);
        *at = end;
        Ok(v)
    };
    let params = f32s_at(&mut at)?;
    let mut buffers = Vec::new();
    for _ in 0..nbuf.min(16) {
        let n = read_u64(b, at, peer)? as usize;
        let name = b
            .get(at + 8..at.saturating_add(8).saturating_add(n))
            .ok_or_else(short)?;
        let name = String::from_utf8_lossy(name).into_owned();
        at += 8 + n;
        buffers.push((name, f32s_at(&mut at)?));
    }
    if at != b.len() || nbuf > 16 {
        return Err(Error::Frame {
            peer,
            why: "malformed state message".into(),
        });
    }
    Ok(PsState {
        applied,
        optimizer_steps,
        params,
        buffers,
    })
}

/// Opens one worker place's link (in the thread that then serves it).
pub type LinkOpener = Box<dyn FnOnce() -> Result<Box<dyn Transport>> + Send>;

/// How a shard meets its workers.
pub enum ShardPlane {
    /// TCP connections accepted on this listener, each opening with a worker's hello
    /// (strangers are refused and do not use up a worker's place).
    Tcp(TcpListener),
    /// One two-rank transport per worker place, the shard rank 0 of each (worker `i`
    /// must say hello on link `i`): [`shm_link`] between processes of one host, or
    /// in-process pairs ([`crate::local::LocalTransport::group`]).
    Links(Vec<LinkOpener>),
}

/// The shared-memory link between shard `shard` and worker `worker` of the job whose
/// token is `token` (the shard is rank 0, the worker rank 1): two rings of 2 MiB. Each
/// side waits up to `connect` for the other; once connected a side waits on the other
/// for as long as it takes (a worker may evaluate for minutes between two requests),
/// but notices at once when the other's process has died.
pub fn shm_link(
    token: &str,
    shard: usize,
    worker: usize,
    rank: usize,
    connect: Duration,
) -> Result<Box<dyn Transport>> {
    let name = format!("shoal-ps-{token}-{shard}-{worker}");
    let mut t = crate::shm::ShmTransport::connect_with(&name, rank, 2, 2 << 20, connect, false)?;
    t.set_timeout(Duration::from_secs(365 * 24 * 3600));
    Ok(Box::new(t))
}

impl PsServer {
    /// Starts a shard owning `len` dense values, accepting TCP connections on
    /// `listener`.
    pub fn start(listener: TcpListener, len: usize, cfg: ShardConfig) -> Result<Self> {
        Self::start_on(ShardPlane::Tcp(listener), len, cfg)
    }

    /// Starts a shard owning `len` dense values on `plane`.
    pub fn start_on(plane: ShardPlane, len: usize, cfg: ShardConfig) -> Result<Self> {
        if cfg.workers == 0 {
            return Err(Error::Mismatch(
                "a parameter server needs at least one worker".into(),
            ));
        }
        if cfg.token.is_empty() {
            return Err(Error::Mismatch(
                "a parameter server needs a job token (it is empty)".into(),
            ));
        }
        cfg.optimizer
            .validate()
            .map_err(|e| Error::Mismatch(format!("parameter server optimizer: {e}")))?;
        let workers = cfg.workers;
        if let ShardPlane::Links(l) = &plane {
            if l.len() != workers {
                return Err(Error::Mismatch(format!(
                    "a shard for {workers} workers was given {} links",
                    l.len()
                )));
            }
        }
        let sparse = if cfg.sparse_dim > 0 {
            let rule = cfg
                .sparse_rule
                .unwrap_or_else(|| SparseRule::from_dense(&cfg.optimizer));
            let mut t =
                SparseTable::new(cfg.sparse_dim, rule, cfg.sparse_init.0, cfg.sparse_init.1)?;
            if cfg.sparse_evict_idle > 0 {
                t.track_updates();
            }
            Some(t)
        } else {
            None
        };
        let shard = Shard {
            pending: vec![0.0; len],
            pending_sparse: SparseSum::default(),
            pending_weight: 0.0,
            pending_lr: 0.0,
            params: None,
            opt: None,
            applied: 0,
            arrived: 0,
            sparse,
            failed: None,
            done: 0,
            cfg,
        };
        let state = Arc::new((Mutex::new(shard), Condvar::new()));
        let st = state.clone();
        let (addr, accept) = match plane {
            ShardPlane::Tcp(listener) => {
                let addr = listener
                    .local_addr()
                    .map_err(io("reading the shard address".into()))?;
                listener
                    .set_nonblocking(true)
                    .map_err(io("configuring the shard listener".into()))?;
                (
                    Some(addr),
                    std::thread::spawn(move || accept_tcp(listener, len, st)),
                )
            }
            ShardPlane::Links(openers) => {
                let h = std::thread::spawn(move || {
                    for (i, open) in openers.into_iter().enumerate() {
                        let st = st.clone();
                        std::thread::spawn(move || {
                            let r = open()
                                .and_then(|t| Link::new(t, i))
                                .map_err(|e| Error::Mismatch(format!("worker {i}: {e}")))
                                .and_then(|link| serve(link, Origin::Place(i), len, &st));
                            if let Err(e) = r {
                                fail_shard(&st, e.to_string());
                            }
                        });
                    }
                });
                (None, h)
            }
        };
        Ok(Self {
            addr,
            state,
            accept: Some(accept),
        })
    }

    /// The address of a shard that accepts TCP connections (None on links).
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// A copy of the shard's current dense parameters (None before initialisation).
    pub fn params(&self) -> Option<Vec<f32>> {
        let sh = self.state.0.lock().unwrap_or_else(|p| p.into_inner());
        sh.params.clone()
    }

    /// A measure of the shard's sparse table (0 without one).
    fn sparse_measure(&self, f: impl Fn(&SparseTable) -> usize) -> usize {
        let sh = self.state.0.lock().unwrap_or_else(|p| p.into_inner());
        sh.sparse.as_ref().map_or(0, f)
    }

    /// Number of sparse rows the shard holds.
    pub fn sparse_rows(&self) -> usize {
        self.sparse_measure(SparseTable::len)
    }

    /// Bytes held by the shard's sparse table (rows, optimizer state, index).
    pub fn sparse_bytes(&self) -> usize {
        self.sparse_measure(SparseTable::bytes)
    }

    /// Waits until every worker has said goodbye (or one failed).
    pub fn join(mut self) -> Result<()> {
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let (m, cv) = &*self.state;
        let mut sh = m.lock().unwrap_or_else(|p| p.into_inner());
        while sh.done < sh.cfg.workers && sh.failed.is_none() {
            sh = cv.wait(sh).unwrap_or_else(|p| p.into_inner());
        }
        match &sh.failed {
            Some(e) => Err(Error::Mismatch(format!(
                "parameter server shard failed: {e}"
            ))),
            None => Ok(()),
        }
    }
}

/// Connections beyond the workers' own that a shard's port holds at once (strangers
/// waiting out their hello deadline); more wait in the kernel's backlog.
const MAX_STRANGERS: usize = 256;

/// Accepts workers' TCP connections until every worker is done or the shard failed;
/// refused strangers do not use up a worker's place, and at most `workers +
/// MAX_STRANGERS` connections are open at once.
fn accept_tcp(listener: TcpListener, len: usize, st: Arc<(Mutex<Shard>, Condvar)>) {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let (workers, tls, wait) = {
        let sh = st.0.lock().unwrap_or_else(|p| p.into_inner());
        (sh.cfg.workers, sh.cfg.tls.clone(), sh.cfg.timeout)
    };
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        {
            let sh = st.0.lock().unwrap_or_else(|p| p.into_inner());
            if sh.done >= workers || sh.failed.is_some() {
                break;
            }
        }
        // At the cap, newer connections wait in the kernel's backlog until a
        // stranger's hello deadline frees a place (a worker among them is not lost).
        if open.load(SeqCst) >= workers + MAX_STRANGERS {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        match listener.accept() {
            Ok((s, from)) => {
                open.fetch_add(1, SeqCst);
                let (st, open, tls) = (st.clone(), open.clone(), tls.clone());
                std::thread::spawn(move || {
                    // Gives the connection's place back however the thread ends.
                    struct Place(Arc<AtomicUsize>);
                    impl Drop for Place {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, SeqCst);
                        }
                    }
                    let _place = Place(open);
                    let opened = s
                        .set_nonblocking(false)
                        .and_then(|_| s.set_read_timeout(Some(HELLO_TIMEOUT)))
                        .and_then(|_| s.try_clone())
                        .map_err(io(format!("configuring the connection from {from}")));
                    let ctl = match opened {
                        Ok(c) => c,
                        Err(e) => {
                            eprintln!("parameter-server shard: {e}");
                            return;
                        }
                    };
                    // A stranger that fails the TLS handshake is refused like one
                    // that fails its hello.
                    let s = match &tls {
                        None => Socket::Plain(s),
                        Some(t) => match t.accept(s, HELLO_TIMEOUT) {
                            Ok(s) => s,
                            Err(e) => {
                                eprintln!(
                                    "parameter-server shard: refused a connection from {from}: {e}"
                                );
                                return;
                            }
                        },
                    };
                    // A reply a worker does not take within the shard's wait fails
                    // (its requests may be minutes apart: reads wait for them).
                    let _ = s.tcp().set_write_timeout(Some(wait));
                    let r = TcpTransport::pair(s, 0, DEFAULT_MAX_PAYLOAD)
                        .and_then(|t| Link::new(Box::new(t), usize::MAX))
                        .and_then(|link| {
                            serve(link, Origin::Accepted(from.to_string(), ctl), len, &st)
                        });
                    if let Err(e) = r {
                        fail_shard(&st, e.to_string());
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => break,
        }
    }
}

/// How long a new connection has to present its hello before it is dropped.
const HELLO_TIMEOUT: Duration = Duration::from_secs(3);

/// Where a conversation a shard serves comes from.
enum Origin {
    /// A TCP connection from this address: until its hello it is a stranger, and a
    /// stranger's failure is not the shard's (the control resets its hello timeout).
    Accepted(String, TcpStream),
    /// The link of worker place `i`: a failure is the shard's.
    Place(usize),
}

/// Records the shard's first failure and wakes every waiting request.
fn fail_shard(st: &(Mutex<Shard>, Condvar), why: String) {
    let (m, cv) = st;
    let mut sh = m.lock().unwrap_or_else(|p| p.into_inner());
    if sh.failed.is_none() {
        sh.failed = Some(why);
    }
    cv.notify_all();
}

/// Serves one worker's link until it says goodbye.
fn serve(
    mut link: Link,
    origin: Origin,
    len: usize,
    st: &Arc<(Mutex<Shard>, Condvar)>,
) -> Result<()> {
    let (m, cv) = &**st;
    let (token, workers, dim, timeout) = {
        let sh = m.lock().unwrap_or_else(|p| p.into_inner());
        (
            sh.cfg.token.clone(),
            sh.cfg.workers,
            sh.cfg.sparse_dim,
            sh.cfg.timeout,
        )
    };
    let mut buf = Vec::new();
    // Decoded push payloads and pulled rows, reused from one request to the next.
    let (mut dense, mut rows) = (Vec::new(), Vec::new());
    let mut pushed = SparseSum::default();
    let (mut pull_keys, mut pull_rows) = (Vec::new(), Vec::new());
    // Hello: worker rank and token (on TCP within HELLO_TIMEOUT). A connection that
    // says nothing, closes, or sends something else is a stranger: refused, and the
    // shard (and the job) go on. On a worker place's own link it is that worker's
    // failure.
    let hello = link
        .recv(&mut buf, 4096)
        .and_then(|op| Ok((op, read_u64(&buf, 0, link.who)? as usize)));
    let refuse = |why: String| match &origin {
        Origin::Accepted(from, _) => {
            eprintln!("parameter-server shard: refused a connection from {from}: {why}");
            Ok(())
        }
        Origin::Place(i) => Err(Error::Mismatch(format!("worker {i}: {why}"))),
    };
    let (op, worker) = match hello {
        Ok(h) => h,
        Err(e) => return refuse(e.to_string()),
    };
    let good_place = match &origin {
        Origin::Accepted(_, ctl) => {
            let _ = ctl.set_read_timeout(None);
            true
        }
        Origin::Place(i) => *i == worker,
    };
    if op != OP_HELLO
        || !crate::frame::same_token(&buf[8..], token.as_bytes())
        || worker >= workers
        || !good_place
    {
        let msg = format!("refused: bad hello (worker {worker}) or wrong job token");
        let _ = link.send(OP_ERR, &[msg.as_bytes()]);
        // A refused stranger does not fail the shard.
        return refuse(msg);
    }
    link.who = worker;
    link.send(OP_OK, &[])?;
    let fail = |sh: &mut Shard, e: &Error| {
        if sh.failed.is_none() {
            sh.failed = Some(format!("worker {worker}: {e}"));
        }
        cv.notify_all();
    };
    loop {
        let op = match link.recv(&mut buf, DEFAULT_MAX_PAYLOAD) {
            Ok(op) => op,
            Err(e) => {
                let mut sh = m.lock().unwrap_or_else(|p| p.into_inner());
                fail(&mut sh, &e);
                return Err(e);
            }
        };
        match op {
            OP_INIT => {
                let vals = f32s(&buf);
                if vals.len() != len {
                    let e = Error::Mismatch(format!(
                        "init of {} values for a shard of {len}",
                        vals.len()
                    ));
                    let mut sh = m.lock().unwrap_or_else(|p| p.into_inner());
                    fail(&mut sh, &e);
                    return Err(e);
                }
                let mut sh = m.lock().unwrap_or_else(|p| p.into_inner());
                if sh.params.is_none() {
                    let opt = Optimizer::new(sh.cfg.optimizer, len)?;
                    sh.params = Some(vals);
                    sh.opt = Some(opt);
                }
                cv.notify_all();
            }
            OP_INIT_STATE => {
                // applied u64, optimizer steps u64, params, then named state buffers.
                let r = decode_state(&buf, worker).and_then(|st| {
                    if st.params.len() != len || st.buffers.iter().any(|(_, b)| b.len() != len) {
                        return Err(Error::Mismatch(format!(
                            "restoring {} values into a shard of {len}",
                            st.params.len()
                        )));
                    }
                    let sh = m.lock().unwrap_or_else(|p| p.into_inner());
                    let mut opt = Optimizer::new(sh.cfg.optimizer, len)?;
                    let bufs: Vec<(&str, &[f32])> = st
                        .buffers
                        .iter()
                        .map(|(n, b)| (n.as_str(), b.as_slice()))
                        .collect();
                    opt.load_state(st.optimizer_steps, &bufs)?;
                    Ok((st, opt))
                });
                let mut sh = m.lock().unwrap_or_else(|p| p.into_inner());
                match r {
                    Ok((st, opt)) => {
                        if sh.params.is_none() {
                            sh.params = Some(st.params);
                            sh.opt = Some(opt);
                            sh.applied = st.applied;
                        }
                        cv.notify_all();
                    }
                    Err(e) => {
                        fail(&mut sh, &e);
                        return Err(e);
                    }
                }
            }
            OP_SPARSE_STATE => {
                let sh = m.lock().unwrap_or_else(|p| p.into_inner());
                let bytes = match sh.sparse.as_ref() {
                    Some(t) => {
                        let (keys, values) = t.rows();
                        let (state, steps) = t.state();
                        encode_sparse(&SparseState {
                            keys,
                            values,
                            state,
                            steps,
                        })
                    }
                    None => vec![0u8; 32],
                };
                drop(sh);
                link.send(OP_OK, &[&bytes])?;
            }
            OP_SPARSE_RESTORE => {
                let r = decode_sparse(&buf, worker).and_then(|st| {
                    let mut sh = m.lock().unwrap_or_else(|p| p.into_inner());
                    match sh.sparse.as_mut() {
                        Some(t) => Ok(t.restore(&st.keys, &st.values, &st.state, &st.steps)?),
                        None => Err(Error::Mismatch("this shard holds no sparse table".into())),
                    }
                });
                if let Err(e) = r {
                    let mut sh = m.lock().unwrap_or_else(|p| p.into_inner());
                    fail(&mut sh, &e);
                    return Err(e);
                }
            }
            OP_STATE => {
                let sh = m.lock().unwrap_or_else(|p| p.into_inner());
                let (Some(p), Some(o)) = (sh.params.as_ref(), sh.opt.as_ref()) else {
                    drop(sh);
                    link.send(OP_ERR, &[b"state requested before initialisation"])?;
                    continue;
                };
                let bytes = encode_state(sh.applied, o.steps(), p, &o.state());
                drop(sh);
                link.send(OP_OK, &[&bytes])?;
            }
            OP_PUSH => {
                // step u64, n_dense u64, n_keys u64, lr f32 (as u64 bits; NaN: the
                // shard's), weight f32 (as u64 bits), dense f32s, keys u64s, rows f32s
                let step = read_u64(&buf, 0, worker)?;
                let nd = read_u64(&buf, 8, worker)? as usize;
                let nk = read_u64(&buf, 16, worker)? as usize;
                let lr = f32::from_bits(read_u64(&buf, 24, worker)? as u32);
                let weight = f32::from_bits(read_u64(&buf, 32, worker)? as u32);
                const H: usize = 40;
                let want = nd
                    .checked_mul(4)
                    .and_then(|d| d.checked_add(nk.checked_mul(8 + 4 * dim)?))
                    .and_then(|x| x.checked_add(H));
                if nd != len || Some(buf.len()) != want || !weight.is_finite() || weight < 0.0 {
                    let e = Error::Frame {
                        peer: worker,
                        why: format!("push of {} bytes for {nd} dense values and {nk} keys with weight {weight} (shard holds {len})", buf.len()),
                    };
                    let mut sh = m.lock().unwrap_or_else(|p| p.into_inner());
                    fail(&mut sh, &e);
                    return Err(e);
                }
                f32s_into(&buf[H..H + 4 * nd], &mut dense);
                let kb = &buf[H + 4 * nd..H + 4 * nd + 8 * nk];
                f32s_into(&buf[H + 4 * nd + 8 * nk..], &mut rows);
                pushed.clear();
                for (i, k) in kb.chunks_exact(8).enumerate() {
                    let key = u64::from_le_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]]);
                    pushed.add(key, &rows[i * dim..(i + 1) * dim], 1.0);
                }
                let mut sh = m.lock().unwrap_or_else(|p| p.into_inner());
                let lr = if lr.is_nan() { sh.cfg.lr } else { lr };
                match sh.cfg.mode {
                    PsMode::Async { .. } => {
                        sh.apply(lr, weight, &mut dense, &mut pushed)?;
                        cv.notify_all();
                    }
                    PsMode::Sync => {
                        // Wait for the previous step to be applied before joining this one.
                        let start = Instant::now();
                        while sh.applied < step && sh.failed.is_none() {
                            let (g, _) = cv
                                .wait_timeout(sh, Duration::from_millis(50))
                                .unwrap_or_else(|p| p.into_inner());
                            sh = g;
                            if start.elapsed() > timeout {
                                break;
                            }
                        }
                        if sh.applied != step {
                            let e = Error::Mismatch(format!(
                                "worker {worker} pushed step {step}, the shard is at step {}",
                                sh.applied
                            ));
                            fail(&mut sh, &e);
                            return Err(e);
                        }
                        for (p, g) in sh.pending.iter_mut().zip(&dense) {
                            *p += weight * g;
                        }
                        for (i, &k) in pushed.keys.iter().enumerate() {
                            sh.pending_sparse
                                .add(k, &pushed.grads[i * dim..(i + 1) * dim], weight);
                        }
                        sh.pending_weight += weight;
                        sh.pending_lr = lr;
                        sh.arrived += 1;
                        if sh.arrived == workers {
                            let mut dense = std::mem::take(&mut sh.pending);
                            let mut sp = std::mem::take(&mut sh.pending_sparse);
                            let (lr, w) = (sh.pending_lr, sh.pending_weight);
                            sh.apply(lr, w, &mut dense, &mut sp)?;
                            sh.pending = dense;
                            sh.pending.fill(0.0);
                            sp.clear();
                            sh.pending_sparse = sp;
                            sh.pending_weight = 0.0;
                            sh.arrived = 0;
                            cv.notify_all();
                        }
                    }
                }
            }
            OP_PULL => {
                let step = read_u64(&buf, 0, worker)?;
                let mut sh = m.lock().unwrap_or_else(|p| p.into_inner());
                let need = match sh.cfg.mode {
                    PsMode::Sync => step,
                    PsMode::Async { max_staleness } => {
                        max_staleness.map_or(0, |k| step.saturating_sub(k))
                    }
                };
                let start = Instant::now();
                while (sh.params.is_none() || sh.applied < need)
                    && sh.failed.is_none()
                    && start.elapsed() < timeout
                {
                    let (g, _) = cv
                        .wait_timeout(sh, Duration::from_millis(50))
                        .unwrap_or_else(|p| p.into_inner());
                    sh = g;
                }
                if let Some(f) = &sh.failed {
                    let msg = format!("parameter server shard failed: {f}");
                    drop(sh);
                    link.send(OP_ERR, &[msg.as_bytes()])?;
                    continue;
                }
                if sh.params.is_none() || sh.applied < need {
                    let msg = format!(
                        "timed out after {:?} waiting for step {need} ({} of {workers} workers pushed step {})",
                        timeout, sh.arrived, sh.applied
                    );
                    drop(sh);
                    link.send(OP_ERR, &[msg.as_bytes()])?;
                    continue;
                }
                let p = sh.params.clone().unwrap_or_default();
                drop(sh);
                link.send(OP_OK, &[f32_bytes(&p)])?;
            }
            op @ (OP_PULL_SPARSE | OP_PEEK_SPARSE) => {
                pull_keys.clear();
                pull_keys.extend(
                    buf.chunks_exact(8).map(|k| {
                        u64::from_le_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]])
                    }),
                );
                pull_rows.clear();
                pull_rows.resize(pull_keys.len() * dim, 0.0f32);
                let (keys, out) = (&pull_keys, &mut pull_rows);
                let mut sh = m.lock().unwrap_or_else(|p| p.into_inner());
                let r = match sh.sparse.as_mut() {
                    // A peek (scoring) reads missing rows as their initial values
                    // without creating them.
                    Some(t) if op == OP_PEEK_SPARSE => {
                        t.peek(keys, out);
                        Ok(())
                    }
                    Some(t) => t.pull(keys, out).map_err(Error::from),
                    None => Err(Error::Mismatch("this shard holds no sparse table".into())),
                };
                drop(sh);
                match r {
                    Ok(()) => link.send(OP_OK, &[f32_bytes(&pull_rows)])?,
                    Err(e) => link.send(OP_ERR, &[e.to_string().as_bytes()])?,
                }
            }
            OP_BYE => {
                let mut sh = m.lock().unwrap_or_else(|p| p.into_inner());
                sh.done += 1;
                cv.notify_all();
                return Ok(());
            }
            other => {
                let e = Error::Frame {
                    peer: worker,
                    why: format!("unknown request {other}"),
                };
                let mut sh = m.lock().unwrap_or_else(|p| p.into_inner());
                fail(&mut sh, &e);
                return Err(e);
            }
        }
    }
}

/// A worker's links to every shard.
pub struct PsClient {
    conns: Vec<Link>,
    ranges: Vec<(usize, usize)>,
    dim: usize,
    buf: Vec<u8>,
    keys: Vec<Vec<u64>>,
    rows: Vec<Vec<f32>>,
    /// Per shard, where each routed key sits in the caller's list (sparse pulls).
    pos: Vec<Vec<usize>>,
}

fn expect_ok(s: &mut Link, buf: &mut Vec<u8>) -> Result<()> {
    let shard = s.who;
    match s.recv(buf, DEFAULT_MAX_PAYLOAD)? {
        OP_OK => Ok(()),
        OP_ERR => Err(Error::Mismatch(format!(
            "parameter server shard {shard}: {}",
            String::from_utf8_lossy(buf)
        ))),
        op => Err(Error::Frame {
            peer: shard,
            why: format!("unexpected reply {op}"),
        }),
    }
}

impl PsClient {
    /// Connects worker `worker` over TCP to the shards at `addrs` for a dense buffer of
    /// `total` values and sparse rows of width `dim`.
    pub fn connect(
        addrs: &[SocketAddr],
        worker: usize,
        total: usize,
        dim: usize,
        token: &str,
    ) -> Result<Self> {
        Self::connect_with(addrs, worker, total, dim, token, None, None)
    }

    /// As [`PsClient::connect`], with TLS on every link when `tls` is given, and every
    /// receive and send failing after `io_timeout` when it is.
    pub fn connect_with(
        addrs: &[SocketAddr],
        worker: usize,
        total: usize,
        dim: usize,
        token: &str,
        tls: Option<&Tls>,
        io_timeout: Option<Duration>,
    ) -> Result<Self> {
        let mut links: Vec<Box<dyn Transport>> = Vec::with_capacity(addrs.len());
        for (i, a) in addrs.iter().enumerate() {
            let what = || format!("connecting to parameter server shard {i} at {a}");
            let s = TcpStream::connect(a).map_err(io(what()))?;
            let s = match tls {
                Some(t) => t.connect(s, HELLO_TIMEOUT)?,
                None => Socket::Plain(s),
            };
            s.tcp()
                .set_read_timeout(io_timeout)
                .and_then(|_| s.tcp().set_write_timeout(io_timeout))
                .map_err(io(what()))?;
            links.push(Box::new(TcpTransport::pair(s, 1, DEFAULT_MAX_PAYLOAD)?));
        }
        Self::over(links, worker, total, dim, token)
    }

    /// As [`PsClient::connect`] over links already open, one per shard in shard order,
    /// each a two-rank transport whose rank 0 is the shard ([`shm_link`] with rank 1,
    /// or an in-process pair).
    pub fn over(
        links: Vec<Box<dyn Transport>>,
        worker: usize,
        total: usize,
        dim: usize,
        token: &str,
    ) -> Result<Self> {
        let m = links.len();
        let mut conns = Vec::with_capacity(m);
        let mut buf = Vec::new();
        for (i, t) in links.into_iter().enumerate() {
            let mut s = Link::new(t, i)?;
            s.send(
                OP_HELLO,
                &[&(worker as u64).to_le_bytes(), token.as_bytes()],
            )?;
            expect_ok(&mut s, &mut buf)?;
            conns.push(s);
        }
        Ok(Self {
            conns,
            ranges: (0..m).map(|i| shard_range(total, m, i)).collect(),
            dim,
            buf,
            keys: vec![Vec::new(); m],
            rows: vec![Vec::new(); m],
            pos: vec![Vec::new(); m],
        })
    }

    /// Sets the initial parameters (the first worker to call wins; the others' pulls
    /// wait for it).
    pub fn init(&mut self, params: &[f32]) -> Result<()> {
        for (i, s) in self.conns.iter_mut().enumerate() {
            let (a, b) = self.ranges[i];
            s.send(OP_INIT, &[f32_bytes(&params[a..b])])?;
        }
        Ok(())
    }

    /// Pushes this worker's gradients for `step`: the dense buffer (whole length) and
    /// optionally sparse rows (`keys`, and `rows` of `keys.len() * dim` values), with
    /// weight 1 and the shards' learning rate.
    pub fn push(
        &mut self,
        step: u64,
        dense: &[f32],
        sparse: Option<(&[u64], &[f32])>,
    ) -> Result<()> {
        self.push_weighted(step, f32::NAN, 1.0, dense, sparse)
    }

    /// [`PsClient::push`] with the learning rate for this update (the worker's schedule)
    /// and the weight of this worker's mean gradient (e.g. its token count): in sync
    /// mode a shard applies `sum(weight * grad) / sum(weight)` (the mean over the
    /// global batch when `average`), in async mode each gradient as pushed.
    pub fn push_weighted(
        &mut self,
        step: u64,
        lr: f32,
        weight: f32,
        dense: &[f32],
        sparse: Option<(&[u64], &[f32])>,
    ) -> Result<()> {
        let m = self.conns.len();
        for i in 0..m {
            self.keys[i].clear();
            self.rows[i].clear();
        }
        if let Some((keys, rows)) = sparse {
            for (j, k) in keys.iter().enumerate() {
                let sh = sparse_shard(*k, m);
                self.keys[sh].push(*k);
                self.rows[sh].extend_from_slice(&rows[j * self.dim..(j + 1) * self.dim]);
            }
        }
        for i in 0..m {
            let (a, b) = self.ranges[i];
            let head = [
                step,
                (b - a) as u64,
                self.keys[i].len() as u64,
                lr.to_bits() as u64,
                weight.to_bits() as u64,
            ];
            let s = &mut self.conns[i];
            s.send(
                OP_PUSH,
                &[
                    u64_bytes(&head),
                    f32_bytes(&dense[a..b]),
                    u64_bytes(&self.keys[i]),
                    f32_bytes(&self.rows[i]),
                ],
            )?;
        }
        Ok(())
    }

    /// Pulls the dense parameters as of `step` updates into `params`.
    pub fn pull(&mut self, step: u64, params: &mut [f32]) -> Result<()> {
        for s in self.conns.iter_mut() {
            s.send(OP_PULL, &[&step.to_le_bytes()])?;
        }
        for (i, s) in self.conns.iter_mut().enumerate() {
            expect_ok(s, &mut self.buf)?;
            let (a, b) = self.ranges[i];
            if self.buf.len() != 4 * (b - a) {
                return Err(Error::Frame {
                    peer: i,
                    why: format!(
                        "pull returned {} bytes for {} values",
                        self.buf.len(),
                        b - a
                    ),
                });
            }
            for (d, c) in params[a..b].iter_mut().zip(self.buf.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Ok(())
    }

    /// Pulls sparse rows for `keys` into `out` (`keys.len() * dim`), creating missing
    /// rows on their shards.
    pub fn pull_sparse(&mut self, keys: &[u64], out: &mut [f32]) -> Result<()> {
        self.sparse_request(OP_PULL_SPARSE, keys, out)
    }

    /// Reads sparse rows for `keys` into `out` without creating any: a missing row
    /// reads as its initial values (for scoring).
    pub fn peek_sparse(&mut self, keys: &[u64], out: &mut [f32]) -> Result<()> {
        self.sparse_request(OP_PEEK_SPARSE, keys, out)
    }

    fn sparse_request(&mut self, op: u32, keys: &[u64], out: &mut [f32]) -> Result<()> {
        let m = self.conns.len();
        let dim = self.dim;
        if out.len() != keys.len() * dim {
            return Err(Error::Mismatch(format!(
                "sparse pull of {} keys into {} values (rows of {dim})",
                keys.len(),
                out.len()
            )));
        }
        for i in 0..m {
            self.keys[i].clear();
            self.pos[i].clear();
        }
        for (j, k) in keys.iter().enumerate() {
            let sh = sparse_shard(*k, m);
            self.keys[sh].push(*k);
            self.pos[sh].push(j);
        }
        for i in 0..m {
            if self.keys[i].is_empty() {
                continue;
            }
            self.conns[i].send(op, &[u64_bytes(&self.keys[i])])?;
            expect_ok(&mut self.conns[i], &mut self.buf)?;
            if self.buf.len() != 4 * dim * self.keys[i].len() {
                return Err(Error::Frame {
                    peer: i,
                    why: format!(
                        "{} bytes for {} sparse rows",
                        self.buf.len(),
                        self.keys[i].len()
                    ),
                });
            }
            // Each row straight from the reply into its place in `out`.
            for (n, &j) in self.pos[i].iter().enumerate() {
                let src = &self.buf[n * 4 * dim..(n + 1) * 4 * dim];
                for (d, c) in out[j * dim..(j + 1) * dim]
                    .iter_mut()
                    .zip(src.chunks_exact(4))
                {
                    *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
        Ok(())
    }

    /// Restores the shards from a saved state (parameters, optimizer state and step;
    /// each buffer the whole length): the resume counterpart of [`PsClient::init`].
    pub fn init_state(&mut self, st: &PsState) -> Result<()> {
        for (i, s) in self.conns.iter_mut().enumerate() {
            let (a, b) = self.ranges[i];
            let bufs: Vec<(&str, &[f32])> = st
                .buffers
                .iter()
                .map(|(n, v)| (n.as_str(), &v[a..b]))
                .collect();
            let bytes = encode_state(st.applied, st.optimizer_steps, &st.params[a..b], &bufs);
            s.send(OP_INIT_STATE, &[&bytes])?;
        }
        Ok(())
    }

    /// The shards' parameters and optimizer state, assembled in shard order (for a
    /// checkpoint). In sync mode, asked right after a pull it is the state of that step.
    pub fn state(&mut self) -> Result<PsState> {
        let mut all: Option<PsState> = None;
        for (i, s) in self.conns.iter_mut().enumerate() {
            s.send(OP_STATE, &[])?;
            expect_ok(s, &mut self.buf)?;
            let part = decode_state(&self.buf, i)?;
            let (a, b) = self.ranges[i];
            if part.params.len() != b - a {
                return Err(Error::Frame {
                    peer: i,
                    why: format!(
                        "state of {} values for a shard of {}",
                        part.params.len(),
                        b - a
                    ),
                });
            }
            match all.as_mut() {
                None => all = Some(part),
                Some(acc) => {
                    if acc.buffers.len() != part.buffers.len() {
                        return Err(Error::Frame {
                            peer: i,
                            why: "shards disagree on the optimizer state".into(),
                        });
                    }
                    acc.applied = acc.applied.min(part.applied);
                    acc.params.extend_from_slice(&part.params);
                    for (x, y) in acc.buffers.iter_mut().zip(part.buffers) {
                        x.1.extend_from_slice(&y.1);
                    }
                }
            }
        }
        all.ok_or_else(|| Error::Mismatch("no parameter server shards".into()))
    }

    /// Every shard's sparse rows with their optimizer state, concatenated (for saving a
    /// model whose rows live on the shards). Asked right after a sync pull it is the
    /// state of that step.
    pub fn sparse_state(&mut self) -> Result<SparseState> {
        let mut all = SparseState::default();
        for (i, s) in self.conns.iter_mut().enumerate() {
            s.send(OP_SPARSE_STATE, &[])?;
            expect_ok(s, &mut self.buf)?;
            let part = decode_sparse(&self.buf, i)?;
            all.keys.extend(part.keys);
            all.values.extend(part.values);
            all.state.extend(part.state);
            all.steps.extend(part.steps);
        }
        Ok(all)
    }

    /// Replaces the shards' sparse rows by `st` (each row sent to the shard its key
    /// belongs to): the resume counterpart of [`PsClient::sparse_state`], before training.
    pub fn restore_sparse(&mut self, st: &SparseState) -> Result<()> {
        let m = self.conns.len();
        let n = st.keys.len();
        let d = st.values.len().checked_div(n).unwrap_or(0);
        let per = st.state.len().checked_div(n).unwrap_or(0);
        let lazy = !st.steps.is_empty();
        let mut parts = vec![SparseState::default(); m];
        for (i, &k) in st.keys.iter().enumerate() {
            let p = &mut parts[sparse_shard(k, m)];
            p.keys.push(k);
            p.values.extend_from_slice(&st.values[i * d..(i + 1) * d]);
            p.state.extend_from_slice(&st.state[i * per..(i + 1) * per]);
            if lazy {
                p.steps.push(st.steps[i]);
            }
        }
        for (s, p) in self.conns.iter_mut().zip(&parts) {
            s.send(OP_SPARSE_RESTORE, &[&encode_sparse(p)])?;
        }
        Ok(())
    }

    /// Tells every shard this worker is done.
    pub fn close(mut self) -> Result<()> {
        for s in self.conns.iter_mut() {
            s.send(OP_BYE, &[])?;
        }
        Ok(())
    }
}
