//! `shoal._native`: the `shoal` Python package's native part. `init()` joins the
//! process group the environment describes (`shoal run`, torchrun's variables, or a
//! group of one); collectives on flat float32 buffers are queued to one background
//! thread that runs them in the order they were submitted (the same on every rank, as
//! Horovod's and DDP's buckets are), with the GIL released while a caller waits. Each
//! operation first checks that every rank submitted the same one (kind, length, root),
//! so mismatched calls fail on every rank with the same message instead of hanging.
//! The buffers are given as an address and a length by the Python layer, which checks
//! the tensor (CPU, float32, contiguous) and keeps it alive in the handle.

use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use shoal_comm::ps::{shm_link, PsClient, PsMode, PsServer, ShardConfig, ShardPlane};
use shoal_optim::sparse::SparseRule;
use shoal_runtime::group::Group;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

create_exception!(
    _native,
    ShoalError,
    PyRuntimeError,
    "A collective failed: mismatched calls across ranks, or a broken data plane."
);

/// What a queued operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Allreduce {
        average: bool,
    },
    Broadcast {
        root: usize,
    },
    /// Concatenates every rank's buffer into the one at `out` (size x len values).
    Allgather {
        out: usize,
    },
    Barrier,
}

impl Kind {
    fn code(self) -> u32 {
        match self {
            Kind::Allreduce { average: false } => 1,
            Kind::Allreduce { average: true } => 2,
            Kind::Broadcast { .. } => 3,
            Kind::Allgather { .. } => 4,
            Kind::Barrier => 5,
        }
    }

    fn root(self) -> u32 {
        match self {
            Kind::Broadcast { root } => root as u32,
            _ => 0,
        }
    }
}

fn describe(code: u32, len: u64, root: u32) -> String {
    match code {
        1 => format!("allreduce (sum) of {len} values"),
        2 => format!("allreduce (average) of {len} values"),
        3 => format!("broadcast of {len} values from rank {root}"),
        4 => format!("allgather of {len} values"),
        5 => "barrier".into(),
        c => format!("unknown operation {c}"),
    }
}

/// Where an operation's outcome is left for its handle.
#[derive(Default)]
struct Done {
    state: Mutex<Option<Result<(), String>>>,
    cv: Condvar,
}

impl Done {
    fn finish(&self, r: Result<(), String>) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        self.cv.notify_all();
    }

    fn wait(&self) -> Result<(), String> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = s.as_ref() {
                return r.clone();
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn is_done(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

struct Op {
    seq: u64,
    name: String,
    kind: Kind,
    ptr: usize,
    len: usize,
    done: Arc<Done>,
}

/// The running group: its shape and the queue to its background thread.
struct Engine {
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    /// Names the job's shared-memory planes.
    name: String,
    /// How many processes host parameter-server shards (the first ones).
    shards: usize,
    /// TLS for the sparse tables' TCP links, when the job has it.
    tls: Option<std::sync::Arc<shoal_comm::tls::Tls>>,
    /// Sparse tables made so far (each has its own shards).
    tables: usize,
    seq: u64,
    tx: mpsc::Sender<Op>,
    thread: JoinHandle<Group>,
}

static ENGINE: Mutex<Option<Engine>> = Mutex::new(None);

fn engine() -> std::sync::MutexGuard<'static, Option<Engine>> {
    ENGINE.lock().unwrap_or_else(|p| p.into_inner())
}

fn not_initialized() -> PyErr {
    PyRuntimeError::new_err("shoal: init() has not been called (call shoal.torch.init() first)")
}

/// Runs the queued operations in order until the queue closes; returns the group so
/// that `shutdown` can leave the job.
fn serve(mut group: Group, rx: mpsc::Receiver<Op>) -> Group {
    // After a failure of the data plane nothing more can cross it.
    let mut broken: Option<String> = None;
    // Every rank's description of the current operation (reused).
    let mut descriptions = vec![0f32; 4 * group.size()];
    for op in rx {
        let r = match &broken {
            Some(b) => Err(format!("the data plane failed earlier: {b}")),
            // Mismatched calls fail on every rank alike: the next ones can still run.
            None => match run_op(&mut group, &op, &mut descriptions) {
                Ok(()) => Ok(()),
                Err(Failure::Mismatch(m)) => Err(m),
                Err(Failure::Plane(m)) => {
                    broken = Some(m.clone());
                    Err(m)
                }
            },
        };
        op.done.finish(r);
    }
    group
}

/// Why an operation failed.
enum Failure {
    /// The ranks submitted different operations (every rank sees the same).
    Mismatch(String),
    /// The data plane failed (a peer gone, a broken ring).
    Plane(String),
}

fn run_op(group: &mut Group, op: &Op, all: &mut [f32]) -> Result<(), Failure> {
    let n = group.size();
    // Named only when something fails (no text built per operation).
    let what = || format!("operation {} ('{}')", op.seq, op.name);
    // Every rank's (kind, length, root), gathered; float32 words carry the bits (the
    // allgather only copies them).
    let len = op.len as u64;
    let mine = [
        op.kind.code(),
        len as u32,
        (len >> 32) as u32,
        op.kind.root(),
    ]
    .map(f32::from_bits);
    let comm = group.comm();
    comm.allgather(&mine, all)
        .map_err(|e| Failure::Plane(format!("{}: {e}", what())))?;
    let desc = |r: usize| {
        let w = |i: usize| all[4 * r + i].to_bits();
        (w(0), u64::from(w(1)) | (u64::from(w(2)) << 32), w(3))
    };
    // Each rank against rank 0's: every rank finds the same difference.
    if let Some(r) = (1..n).find(|&r| desc(r) != desc(0)) {
        let (c0, l0, r0) = desc(0);
        let (c1, l1, r1) = desc(r);
        return Err(Failure::Mismatch(format!(
            "{}: every rank must submit the same collectives in the same order; rank 0 \
             submitted a {}, rank {r} a {}",
            what(),
            describe(c0, l0, r0),
            describe(c1, l1, r1)
        )));
    }
    let data: &mut [f32] = if op.len == 0 {
        &mut []
    } else {
        // SAFETY: the Python layer gave the address and length of a contiguous float32
        // CPU tensor that its handle keeps alive until this operation is done (a handle
        // dropped early waits for it), and no other operation of this thread uses it.
        unsafe { std::slice::from_raw_parts_mut(op.ptr as *mut f32, op.len) }
    };
    let comm = group.comm();
    let r = match op.kind {
        Kind::Allreduce { average } => comm.allreduce_sum(data).map(|()| {
            if average && n > 1 {
                let s = 1.0 / n as f32;
                data.iter_mut().for_each(|x| *x *= s);
            }
        }),
        Kind::Broadcast { root } => comm.broadcast(data, root),
        Kind::Allgather { out } => {
            let out: &mut [f32] = if op.len == 0 {
                &mut []
            } else {
                // SAFETY: as above, for the output tensor of n x len values.
                unsafe { std::slice::from_raw_parts_mut(out as *mut f32, op.len * n) }
            };
            comm.allgather(data, out)
        }
        Kind::Barrier => comm.barrier(),
    };
    r.map_err(|e| Failure::Plane(format!("{}: {e}", what())))
}

/// Joins the process group the environment describes; a second call does nothing.
#[pyfunction]
fn init(py: Python<'_>) -> PyResult<()> {
    if engine().is_some() {
        return Ok(());
    }
    let group = py
        .detach(Group::join_from_env)
        .map_err(|e| ShoalError::new_err(format!("shoal: joining the job: {e}")))?;
    let (rank, size, local_rank, local_size) = (
        group.rank(),
        group.size(),
        group.local_rank(),
        group.local_size(),
    );
    let name = group.name().to_string();
    let tls = group.tls().cloned();
    let shards = group
        .shards()
        .map_err(|e| ShoalError::new_err(format!("shoal: {e}")))?;
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("shoal-collectives".into())
        .spawn(move || serve(group, rx))
        .map_err(|e| ShoalError::new_err(format!("shoal: starting the collectives thread: {e}")))?;
    *engine() = Some(Engine {
        rank,
        size,
        local_rank,
        local_size,
        name,
        shards,
        tls,
        tables: 0,
        seq: 0,
        tx,
        thread,
    });
    Ok(())
}

/// Whether `init()` has been called (and `shutdown()` not since).
#[pyfunction]
fn is_initialized() -> bool {
    engine().is_some()
}

fn shape(f: impl Fn(&Engine) -> usize) -> PyResult<usize> {
    engine().as_ref().map(f).ok_or_else(not_initialized)
}

/// This process's rank, 0..size().
#[pyfunction]
fn rank() -> PyResult<usize> {
    shape(|e| e.rank)
}

/// The number of processes in the job.
#[pyfunction]
fn size() -> PyResult<usize> {
    shape(|e| e.size)
}

/// This process's rank among those on its host.
#[pyfunction]
fn local_rank() -> PyResult<usize> {
    shape(|e| e.local_rank)
}

/// The number of processes on this host.
#[pyfunction]
fn local_size() -> PyResult<usize> {
    shape(|e| e.local_size)
}

/// An operation in flight: `poll()` says whether it is done, `wait()` blocks (the GIL
/// released) and raises `ShoalError` if it failed. It holds the objects whose memory
/// the operation uses; dropped before the operation ends, it waits for it.
#[pyclass(module = "shoal._native")]
struct Handle {
    done: Arc<Done>,
    #[pyo3(get)]
    name: String,
    keep: Vec<Py<PyAny>>,
}

#[pymethods]
impl Handle {
    /// True once the operation has finished (successfully or not).
    fn poll(&self) -> bool {
        self.done.is_done()
    }

    /// Waits for the operation; raises `ShoalError` if it failed.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        let done = self.done.clone();
        py.detach(move || done.wait())
            .map_err(|e| ShoalError::new_err(format!("shoal: {e}")))
    }

    /// The objects this operation works on (what the Python layer returns).
    fn objects(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        self.keep.iter().map(|o| o.clone_ref(py)).collect()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The memory in `keep` must outlive the operation; the collectives thread never
        // needs the GIL, so waiting here cannot deadlock.
        let _ = self.done.wait();
    }
}

fn check_buffer(ptr: usize, len: usize, what: &str) -> PyResult<()> {
    if len > 0 && (ptr == 0 || !ptr.is_multiple_of(std::mem::align_of::<f32>())) {
        return Err(PyValueError::new_err(format!(
            "shoal: {what}: address {ptr:#x} is not that of float32 values"
        )));
    }
    if len > (isize::MAX as usize) / 4 {
        return Err(PyValueError::new_err(format!(
            "shoal: {what}: {len} values is too many"
        )));
    }
    Ok(())
}

/// Queues one operation (used by `shoal.torch`, which checks the tensors): `kind` is
/// `sum`, `average`, `broadcast`, `allgather` or `barrier`; `ptr`/`len` the float32
/// values it works on in place (`out`: the allgather's output, size x len values);
/// `keep`: the objects that own that memory.
#[pyfunction]
#[pyo3(signature = (kind, ptr, len, keep, name, root=0, out=0))]
#[allow(clippy::too_many_arguments)]
fn submit(
    kind: &str,
    ptr: usize,
    len: usize,
    keep: Vec<Py<PyAny>>,
    name: String,
    root: usize,
    out: usize,
) -> PyResult<Handle> {
    let mut guard = engine();
    let e = guard.as_mut().ok_or_else(not_initialized)?;
    let kind = match kind {
        "sum" => Kind::Allreduce { average: false },
        "average" => Kind::Allreduce { average: true },
        "broadcast" => {
            if root >= e.size {
                return Err(PyValueError::new_err(format!(
                    "shoal: broadcast from rank {root} in a job of {} processes",
                    e.size
                )));
            }
            Kind::Broadcast { root }
        }
        "allgather" => {
            check_buffer(out, len.saturating_mul(e.size), "allgather output")?;
            Kind::Allgather { out }
        }
        "barrier" => Kind::Barrier,
        k => {
            return Err(PyValueError::new_err(format!(
                "shoal: unknown operation '{k}'"
            )))
        }
    };
    check_buffer(ptr, len, &name)?;
    let done = enqueue(e, kind, ptr, len, name.clone())?;
    Ok(Handle { done, name, keep })
}

/// Queues one operation on the collectives thread; the memory at `ptr` must stay
/// alive until the returned outcome is finished.
fn enqueue(
    e: &mut Engine,
    kind: Kind,
    ptr: usize,
    len: usize,
    name: String,
) -> PyResult<Arc<Done>> {
    e.seq += 1;
    let done = Arc::new(Done::default());
    let op = Op {
        seq: e.seq,
        name,
        kind,
        ptr,
        len,
        done: done.clone(),
    };
    if e.tx.send(op).is_err() {
        return Err(ShoalError::new_err(
            "shoal: the collectives thread has stopped",
        ));
    }
    Ok(done)
}

/// Bytes of one process's address record when a table's shards meet over TCP.
const ADDR_BYTES: usize = 64;

/// How long a table's processes wait for each other's shared-memory links.
const LINK_TIMEOUT: Duration = Duration::from_secs(60);

struct TableState {
    client: PsClient,
    /// This process's shard of the table, if it hosts one.
    server: Option<PsServer>,
    /// Pushes so far: a pull waits until the shards applied that many updates.
    step: u64,
}

/// A sparse table on parameter-server shards (what `shoal.torch.SparseEmbedding`
/// stores its rows in): rows of `dim` float32 values by 64-bit key, created on first
/// pull, updated on the shards by the table's rule from the mean of every process's
/// pushed gradients (synchronously: a pull waits for the previous push of every process).
#[pyclass(module = "shoal._native")]
struct SparseTable {
    state: Mutex<Option<TableState>>,
    #[pyo3(get)]
    dim: usize,
    #[pyo3(get)]
    shards: usize,
    lr: f32,
}

fn ps_err(e: impl std::fmt::Display) -> PyErr {
    ShoalError::new_err(format!("shoal: sparse table: {e}"))
}

/// Makes the job's next sparse table (every process makes its tables in the same
/// order): rows of `dim` values, `rule` one of sgd, adagrad, row-adagrad, adam (lazy:
/// moments of the touched rows only), ftrl; new rows uniform in +-`init_scale` from a
/// hash of (`seed`, key).
#[pyfunction]
#[pyo3(signature = (dim, rule, lr, init_scale=0.01, seed=0, eps=1e-10, beta1=0.9, beta2=0.999))]
#[allow(clippy::too_many_arguments)]
fn sparse_table(
    py: Python<'_>,
    dim: usize,
    rule: &str,
    lr: f32,
    init_scale: f32,
    seed: u64,
    eps: f32,
    beta1: f32,
    beta2: f32,
) -> PyResult<SparseTable> {
    if dim == 0 || dim > 1 << 16 {
        return Err(PyValueError::new_err(format!(
            "shoal: sparse table: rows of {dim} values (1 to 65536)"
        )));
    }
    if !(lr.is_finite() && lr > 0.0 && init_scale.is_finite() && init_scale >= 0.0) {
        return Err(PyValueError::new_err(format!(
            "shoal: sparse table: lr {lr} and init_scale {init_scale} must be finite, lr positive"
        )));
    }
    let rule = match rule {
        "sgd" => SparseRule::Sgd,
        "adagrad" => SparseRule::Adagrad { eps },
        "row-adagrad" => SparseRule::RowAdagrad { eps },
        "adam" => SparseRule::LazyAdam { beta1, beta2, eps },
        "ftrl" => SparseRule::Ftrl {
            beta: 1.0,
            l1: 0.0,
            l2: 0.0,
        },
        r => {
            return Err(PyValueError::new_err(format!(
                "shoal: sparse table: unknown rule '{r}'; expected sgd, adagrad, row-adagrad, adam or ftrl"
            )))
        }
    };
    let (rank, size, shards, job, one_host, tls) = {
        let mut g = engine();
        let e = g.as_mut().ok_or_else(not_initialized)?;
        e.tables += 1;
        (
            e.rank,
            e.size,
            e.shards,
            format!("{}-t{}", e.name, e.tables),
            e.local_size == e.size,
            e.tls.clone(),
        )
    };
    // On one host the shards meet the processes over shared memory; across hosts each
    // shard listens on TCP (on SHOAL_HOST) and every process learns the shards'
    // addresses by an allgather on the group's plane.
    let listener = match (one_host, rank < shards) {
        (false, true) => {
            let host = std::env::var("SHOAL_HOST").unwrap_or_else(|_| "127.0.0.1".into());
            let l = std::net::TcpListener::bind((host.as_str(), 0)).map_err(|e| {
                ShoalError::new_err(format!("shoal: sparse table: listening on {host}: {e}"))
            })?;
            Some(l)
        }
        _ => None,
    };
    let addrs = match one_host {
        true => None,
        false => Some(shard_addresses(py, listener.as_ref(), size, shards)?),
    };
    let shard_tls = tls.clone();
    let cfg = move |job: &str| ShardConfig {
        workers: size,
        mode: PsMode::Sync,
        lr,
        average: true,
        sparse_dim: dim,
        sparse_rule: Some(rule),
        sparse_init: (init_scale, seed),
        token: job.to_string(),
        timeout: Duration::from_secs(600),
        tls: shard_tls.clone(),
        ..Default::default()
    };
    let state = py
        .detach(move || -> shoal_comm::Result<TableState> {
            let server = match (rank < shards, listener) {
                (true, Some(l)) => Some(PsServer::start_on(ShardPlane::Tcp(l), 0, cfg(&job))?),
                (true, None) => {
                    let openers = (0..size)
                        .map(|w| {
                            let job = job.clone();
                            Box::new(move || shm_link(&job, rank, w, 0, LINK_TIMEOUT))
                                as shoal_comm::ps::LinkOpener
                        })
                        .collect();
                    Some(PsServer::start_on(
                        ShardPlane::Links(openers),
                        0,
                        cfg(&job),
                    )?)
                }
                (false, _) => None,
            };
            let mut client = match addrs {
                Some(a) => PsClient::connect_with(&a, rank, 0, dim, &job, tls.as_deref(), None)?,
                None => {
                    let links = (0..shards)
                        .map(|i| shm_link(&job, i, rank, 1, LINK_TIMEOUT))
                        .collect::<shoal_comm::Result<Vec<_>>>()?;
                    PsClient::over(links, rank, 0, dim, &job)?
                }
            };
            client.init(&[])?;
            Ok(TableState {
                client,
                server,
                step: 0,
            })
        })
        .map_err(ps_err)?;
    Ok(SparseTable {
        state: Mutex::new(Some(state)),
        dim,
        shards,
        lr,
    })
}

/// The TCP addresses of a new table's `shards` shards (the first processes'), from an
/// allgather of every process's record (its listener's address, or nothing).
fn shard_addresses(
    py: Python<'_>,
    listener: Option<&std::net::TcpListener>,
    size: usize,
    shards: usize,
) -> PyResult<Vec<std::net::SocketAddr>> {
    let mut mine = [0u8; ADDR_BYTES];
    if let Some(l) = listener {
        let a = l
            .local_addr()
            .map_err(|e| ShoalError::new_err(format!("shoal: sparse table: {e}")))?
            .to_string();
        if a.len() > ADDR_BYTES {
            return Err(ShoalError::new_err(format!(
                "shoal: sparse table: the address {a} is too long"
            )));
        }
        mine[..a.len()].copy_from_slice(a.as_bytes());
    }
    // Words carry the bytes (the allgather only copies them).
    let words: Vec<f32> = mine
        .chunks_exact(4)
        .map(|c| f32::from_bits(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    let mut all = vec![0f32; size * words.len()];
    let done = {
        let mut g = engine();
        let e = g.as_mut().ok_or_else(not_initialized)?;
        enqueue(
            e,
            Kind::Allgather {
                out: all.as_mut_ptr() as usize,
            },
            words.as_ptr() as usize,
            words.len(),
            "sparse table shard addresses".into(),
        )?
    };
    // `words` and `all` outlive the operation: it is waited for here.
    py.detach(|| done.wait())
        .map_err(|e| ShoalError::new_err(format!("shoal: sparse table: {e}")))?;
    let per = words.len();
    (0..shards)
        .map(|r| {
            let bytes: Vec<u8> = all[r * per..(r + 1) * per]
                .iter()
                .flat_map(|w| w.to_bits().to_le_bytes())
                .collect();
            let text = String::from_utf8_lossy(&bytes);
            let text = text.trim_end_matches('\0');
            text.parse().map_err(|_| {
                ShoalError::new_err(format!(
                    "shoal: sparse table: shard {r} sent the address '{text}'"
                ))
            })
        })
        .collect()
}

/// The `n` keys at `keys` and the `n * dim` values at `rows`, as slices.
///
/// # Safety
/// The Python layer passes contiguous int64 and float32 CPU tensors of those sizes,
/// alive for the call.
unsafe fn key_rows<'a>(
    keys: usize,
    n: usize,
    rows: usize,
    dim: usize,
) -> (&'a [u64], &'a mut [f32]) {
    if n == 0 {
        return (&[], &mut []);
    }
    (
        std::slice::from_raw_parts(keys as *const u64, n),
        std::slice::from_raw_parts_mut(rows as *mut f32, n * dim),
    )
}

fn check_rows(keys: usize, n: usize, rows: usize, dim: usize) -> PyResult<()> {
    if n > 0
        && (keys == 0
            || rows == 0
            || !keys.is_multiple_of(8)
            || !rows.is_multiple_of(4)
            || n.checked_mul(dim)
                .is_none_or(|v| v > (isize::MAX as usize) / 4))
    {
        return Err(PyValueError::new_err(
            "shoal: sparse table: bad key or row buffer",
        ));
    }
    Ok(())
}

impl SparseTable {
    fn with<T>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut TableState) -> shoal_comm::Result<T> + Send,
    ) -> PyResult<T>
    where
        T: Send,
    {
        py.detach(|| {
            let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let st = g
                .as_mut()
                .ok_or_else(|| ShoalError::new_err("shoal: sparse table: closed"))?;
            f(st).map_err(ps_err)
        })
    }
}

#[pymethods]
impl SparseTable {
    /// Fills `rows` (`n * dim` float32) with the rows of the `n` int64 `keys` as of
    /// every process's last push, creating missing rows.
    fn pull(&self, py: Python<'_>, keys: usize, n: usize, rows: usize) -> PyResult<()> {
        check_rows(keys, n, rows, self.dim)?;
        let dim = self.dim;
        self.with(py, move |st| {
            // SAFETY: see `key_rows`.
            let (k, r) = unsafe { key_rows(keys, n, rows, dim) };
            st.client.pull(st.step, &mut [])?;
            st.client.pull_sparse(k, r)
        })
    }

    /// As `pull`, creating nothing (a missing row reads as its initial values).
    fn peek(&self, py: Python<'_>, keys: usize, n: usize, rows: usize) -> PyResult<()> {
        check_rows(keys, n, rows, self.dim)?;
        let dim = self.dim;
        self.with(py, move |st| {
            // SAFETY: see `key_rows`.
            let (k, r) = unsafe { key_rows(keys, n, rows, dim) };
            st.client.pull(st.step, &mut [])?;
            st.client.peek_sparse(k, r)
        })
    }

    /// Pushes this process's gradient rows (`n` distinct int64 keys, `n * dim` float32
    /// values) of a batch of `weight` examples: the shards apply
    /// `sum(weight * grad) / sum(weight)` over the processes.
    fn push(
        &self,
        py: Python<'_>,
        keys: usize,
        n: usize,
        grads: usize,
        weight: f32,
    ) -> PyResult<()> {
        check_rows(keys, n, grads, self.dim)?;
        if !(weight.is_finite() && weight >= 0.0) {
            return Err(PyValueError::new_err(format!(
                "shoal: sparse table: push weight {weight}"
            )));
        }
        let (dim, lr) = (self.dim, self.lr);
        self.with(py, move |st| {
            // SAFETY: see `key_rows`.
            let (k, g) = unsafe { key_rows(keys, n, grads, dim) };
            st.client
                .push_weighted(st.step, lr, weight, &[], Some((k, &*g)))?;
            st.step += 1;
            Ok(())
        })
    }

    /// Rows held by this process's shard (0 if it hosts none).
    fn local_rows(&self) -> usize {
        let g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref()
            .and_then(|s| s.server.as_ref())
            .map_or(0, PsServer::sparse_rows)
    }

    /// Leaves the table: tells the shards, then waits until every process has left
    /// this process's shard. Every process must call it (`shoal.torch.shutdown` does).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(st) = st {
                st.client.close().map_err(ps_err)?;
                if let Some(s) = st.server {
                    s.join().map_err(ps_err)?;
                }
            }
            Ok(())
        })
    }
}

/// Waits for every queued operation, then leaves the job in order. `init()` may be
/// called again afterwards only in a new job.
#[pyfunction]
fn shutdown(py: Python<'_>) -> PyResult<()> {
    let Some(e) = engine().take() else {
        return Ok(());
    };
    drop(e.tx);
    py.detach(move || {
        let group = e
            .thread
            .join()
            .map_err(|_| "the collectives thread panicked".to_string())?;
        group.leave().map_err(|e| e.to_string())
    })
    .map_err(|e| ShoalError::new_err(format!("shoal: leaving the job: {e}")))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("ShoalError", m.py().get_type::<ShoalError>())?;
    m.add_class::<Handle>()?;
    m.add_class::<SparseTable>()?;
    for f in [
        wrap_pyfunction!(init, m)?,
        wrap_pyfunction!(is_initialized, m)?,
        wrap_pyfunction!(rank, m)?,
        wrap_pyfunction!(size, m)?,
        wrap_pyfunction!(local_rank, m)?,
        wrap_pyfunction!(local_size, m)?,
        wrap_pyfunction!(submit, m)?,
        wrap_pyfunction!(sparse_table, m)?,
        wrap_pyfunction!(shutdown, m)?,
    ] {
        m.add_function(f)?;
    }
    Ok(())
}
