//! The shared-memory transport for ranks on one host: one single-producer
//! single-consumer ring buffer per direction per pair, in a file under `/dev/shm`
//! mapped by both processes. The payload never passes through the kernel: the sender
//! copies it into the ring and the receiver copies it out, coordinated by two atomic
//! counters; a side that waits longer than a moment sleeps on a futex in the ring until
//! the other wakes it. A receiver that waits longer than the timeout, or whose sender's process
//! has died, gets an error naming the peer instead of waiting for ever.
//!
//! Large allreduces take a single-copy path (as OpenMPI's shared-memory transport does
//! with CMA): the ranks trade the addresses of their buffers through the rings, each
//! rank reads its segment of every peer's buffer straight out of the peer's memory
//! (`process_vm_readv`) and adds it into its own, then reads every peer's reduced segment
//! straight into its buffer: one copy per byte instead of two, and no ring in between.
//! Whether the kernel allows it is tried once when the group connects (every rank must
//! be able to read every peer, or none uses it); `SHOAL_SHM_SINGLE_COPY=0` turns it off.

use crate::collective::split_range;
use crate::frame::f32_bytes_mut;
use crate::transport::Transport;
use crate::{Error, Result};
use std::ffi::CString;
use std::path::Path;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MAGIC: u64 = u64::from_le_bytes(*b"SHLSHM01");
const OFF_MAGIC: usize = 0;
const OFF_CAP: usize = 8;
const OFF_HEAD: usize = 64;
const OFF_TAIL: usize = 128;
const OFF_WPID: usize = 192;
const OFF_RPID: usize = 196;
/// Set by a side when it lets go of the ring (its transport dropped): the other side
/// then fails at once instead of waiting out its timeout.
const OFF_WCLOSED: usize = 200;
const OFF_RCLOSED: usize = 204;
/// Futex words: bumped by the writer when it publishes bytes (the reader sleeps on it
/// while the ring is empty), and by the reader when it frees space (the writer sleeps
/// on it while the ring is full); each with a flag set while its side sleeps, so a
/// side wakes the other (a system call) only when it is asleep.
const OFF_WAKE_DATA: usize = 208;
const OFF_SLEEP_DATA: usize = 212;
const OFF_WAKE_SPACE: usize = 216;
const OFF_SLEEP_SPACE: usize = 220;
/// How long a sleeping side waits before it checks on the other side's process.
const SLEEP_SLICE: Duration = Duration::from_millis(10);
const DATA: usize = 256;
const REC: usize = 16;

/// Smallest allreduce, in bytes, that takes the single-copy path (smaller ones go
/// through the rings: three rounds of control messages cost more than they save).
pub const SINGLE_COPY_MIN_BYTES: usize = 64 << 10;
/// Values read from one peer per `process_vm_readv` while reducing (256 KB: the piece
/// stays in cache between the read and the add).
const SINGLE_COPY_PIECE: usize = 64 << 10;
/// Tags of the single-copy path's control messages (outside the collectives' counter
/// range in practice; a mix-up still fails as a tag mismatch).
const TAG_PROBE: u32 = 0xC3A0_0001;
const TAG_AGREE: u32 = 0xC3A0_0002;
const TAG_ADDR: u32 = 0xC3A0_0003;
const TAG_REDUCED: u32 = 0xC3A0_0004;
const TAG_GATHERED: u32 = 0xC3A0_0005;
const PROBE_MAGIC: u64 = u64::from_le_bytes(*b"SHLCMA01");

/// One direction of one pair: a mapped ring.
struct Ring {
    base: *mut u8,
    map_len: usize,
    cap: u64,
    peer: usize,
    timeout: Duration,
    /// This side writes the ring (else it reads it).
    writer: bool,
}

// SAFETY: the mapping is shared memory accessed through atomics (counters) and by one
// writer and one reader that never touch the same bytes at the same time.
unsafe impl Send for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        let closed = if self.writer {
            OFF_WCLOSED
        } else {
            OFF_RCLOSED
        };
        self.atomic_u32(closed).store(1, Ordering::Release);
        // Whoever sleeps on the other side wakes now and finds the ring let go.
        for w in [OFF_WAKE_DATA, OFF_WAKE_SPACE] {
            self.atomic_u32(w).fetch_add(1, Ordering::Release);
            futex_wake(self.atomic_u32(w));
        }
        // SAFETY: base/map_len came from a successful mmap.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.map_len);
        }
    }
}

fn os_err(what: String) -> Error {
    Error::Io {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// The file of the ring `from -> to` of group `job`.
pub fn ring_path(job: &str, from: usize, to: usize) -> String {
    path(job, from, to)
}

fn path(job: &str, from: usize, to: usize) -> String {
    // The job name is hashed so that any string is a valid file name.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    format!("/dev/shm/shoal-{h:016x}-{from}-{to}")
}

impl Ring {
    fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        // SAFETY: off is 8-aligned inside the header of a live mapping.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    fn atomic_u32(&self, off: usize) -> &AtomicU32 {
        // SAFETY: off is 4-aligned inside the header of a live mapping.
        unsafe { &*(self.base.add(off) as *const AtomicU32) }
    }

    fn map(fd: i32, len: usize, what: &str) -> Result<*mut u8> {
        // SAFETY: mapping a file descriptor we own, shared, read-write.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_err(format!("mapping {what}")));
        }
        Ok(p as *mut u8)
    }

    /// Creates the ring `from -> to` as its writer.
    fn create(job: &str, from: usize, to: usize, cap: usize, timeout: Duration) -> Result<Ring> {
        let p = path(job, from, to);
        let c = CString::new(p.clone())
            .map_err(|_| Error::Mismatch("bad shared-memory path".into()))?;
        sweep_stale();
        // Created exclusively, never through a link: a file already there is a ring of
        // a process that died before its peer opened it (removed, once), or of a live
        // one (refused: two jobs with one name).
        let open = || {
            // SAFETY: plain open(2) on a NUL-terminated path.
            unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_NOFOLLOW,
                    0o600,
                )
            }
        };
        let mut fd = open();
        if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST) {
            match stale_writer(Path::new(&p)) {
                Some(pid) if pid != std::process::id() && process_alive(pid) => {
                    return Err(Error::Mismatch(format!(
                        "{p} is a ring of process {pid}, which is alive: another job with the same name and token is running"
                    )));
                }
                _ => {
                    // SAFETY: unlinking a file of this job's own name.
                    unsafe { libc::unlink(c.as_ptr()) };
                    fd = open();
                }
            }
        }
        if fd < 0 {
            return Err(os_err(format!("creating {p}")));
        }
        let len = DATA + cap;
        // SAFETY: fd is open.
        let r = unsafe { libc::ftruncate(fd, len as libc::off_t) };
        if r != 0 {
            // SAFETY: fd is open.
            unsafe { libc::close(fd) };
            return Err(os_err(format!("sizing {p}")));
        }
        let base = Ring::map(fd, len, &p);
        // SAFETY: the mapping keeps the file alive; the descriptor is no longer needed.
        unsafe { libc::close(fd) };
        let ring = Ring {
            base: base?,
            map_len: len,
            cap: cap as u64,
            peer: to,
            timeout,
            writer: true,
        };
        ring.atomic_u64(OFF_CAP)
            .store(cap as u64, Ordering::Relaxed);
        ring.atomic_u64(OFF_HEAD).store(0, Ordering::Relaxed);
        ring.atomic_u64(OFF_TAIL).store(0, Ordering::Relaxed);
        ring.atomic_u32(OFF_WPID)
            .store(std::process::id(), Ordering::Relaxed);
        for off in [
            OFF_RPID,
            OFF_WCLOSED,
            OFF_RCLOSED,
            OFF_WAKE_DATA,
            OFF_SLEEP_DATA,
            OFF_WAKE_SPACE,
            OFF_SLEEP_SPACE,
        ] {
            ring.atomic_u32(off).store(0, Ordering::Relaxed);
        }
        ring.atomic_u64(OFF_MAGIC).store(MAGIC, Ordering::Release);
        Ok(ring)
    }

    /// Opens the ring `from -> to` as its reader (waiting for its writer), then removes
    /// its name (the mapping stays valid).
    fn open(job: &str, from: usize, to: usize, timeout: Duration) -> Result<Ring> {
        let p = path(job, from, to);
        let c = CString::new(p.clone())
            .map_err(|_| Error::Mismatch("bad shared-memory path".into()))?;
        let start = Instant::now();
        loop {
            // SAFETY: plain open(2), never through a link.
            let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NOFOLLOW) };
            if fd >= 0 {
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: fd is open, st is a valid out-pointer.
                let ok = unsafe { libc::fstat(fd, &mut st) } == 0 && st.st_size as usize > DATA;
                if ok {
                    let len = st.st_size as usize;
                    let base = Ring::map(fd, len, &p);
                    // SAFETY: as in create.
                    unsafe { libc::close(fd) };
                    let base = base?;
                    let mut ring = Ring {
                        base,
                        map_len: len,
                        cap: 0,
                        peer: from,
                        timeout,
                        writer: false,
                    };
                    // Complete once its magic is there. A ring whose writer died or let
                    // go of it (a run that failed before its peer came) is stale: the live
                    // writer replaces it, so wait for that one rather than attach to the
                    // dead one.
                    let ready = ring.atomic_u64(OFF_MAGIC).load(Ordering::Acquire) == MAGIC;
                    let wpid = ring.writer_pid();
                    let stale = ring.atomic_u32(OFF_WCLOSED).load(Ordering::Acquire) != 0
                        || (wpid != 0 && !process_alive(wpid));
                    if ready && !stale {
                        ring.cap = ring.atomic_u64(OFF_CAP).load(Ordering::Relaxed);
                        if ring.cap as usize + DATA != len {
                            ring.release();
                            return Err(Error::Frame {
                                peer: from,
                                why: format!("{p} has a bad size"),
                            });
                        }
                        ring.atomic_u32(OFF_RPID)
                            .store(std::process::id(), Ordering::Release);
                        // SAFETY: unlinking our own job's file.
                        unsafe { libc::unlink(c.as_ptr()) };
                        return Ok(ring);
                    }
                    ring.release();
                } else {
                    // SAFETY: fd is open.
                    unsafe { libc::close(fd) };
                }
            }
            if start.elapsed() > timeout {
                return Err(Error::Disconnected { peer: from });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Unmaps a ring this side never took part in, without marking it let go (it is
    /// not this side's to close: the writer may be setting it up).
    fn release(self) {
        // SAFETY: base/map_len came from a successful mmap; Drop does not run after.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.map_len) };
        std::mem::forget(self);
    }

    fn writer_pid(&self) -> u32 {
        self.atomic_u32(OFF_WPID).load(Ordering::Relaxed)
    }

    /// Whether the other side still holds the ring: its process lives and it has not
    /// let go (a reader not yet attached counts as there).
    fn other_side_there(&self) -> bool {
        let (pid, closed) = match self.writer {
            true => (OFF_RPID, OFF_RCLOSED),
            false => (OFF_WPID, OFF_WCLOSED),
        };
        if self.atomic_u32(closed).load(Ordering::Acquire) != 0 {
            return false;
        }
        let pid = self.atomic_u32(pid).load(Ordering::Acquire);
        pid == 0 || process_alive(pid)
    }

    /// Waits until `ready()`: spinning for the first 200 us (a peer on another core
    /// usually answers within that), then asleep on the futex word at `wake` (the
    /// other side bumps it and wakes this one when it sees the `sleeping` flag), so a
    /// side that waits long, as a parameter-server shard between two requests, costs
    /// no CPU. Fails after the timeout or when the other side's process is gone or it
    /// let go of the ring.
    fn wait(&self, ready: impl Fn() -> bool, wake: usize, sleeping: usize) -> Result<()> {
        if ready() {
            return Ok(());
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_micros(200) {
            for _ in 0..64 {
                if ready() {
                    return Ok(());
                }
                std::hint::spin_loop();
            }
        }
        let (word, flag) = (self.atomic_u32(wake), self.atomic_u32(sleeping));
        loop {
            let seq = word.load(Ordering::Acquire);
            flag.store(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            // Checked after the flag is up: bytes published before it was seen are
            // found here, bytes published after it come with a wake-up.
            if ready() {
                flag.store(0, Ordering::Relaxed);
                return Ok(());
            }
            futex_wait(word, seq, SLEEP_SLICE);
            flag.store(0, Ordering::Relaxed);
            if ready() {
                return Ok(());
            }
            if !self.other_side_there() && !ready() {
                return Err(Error::Disconnected { peer: self.peer });
            }
            if start.elapsed() > self.timeout {
                return Err(Error::Disconnected { peer: self.peer });
            }
        }
    }

    /// Wakes the other side if it sleeps on the futex word at `wake`.
    fn notify(&self, wake: usize, sleeping: usize) {
        fence(Ordering::SeqCst);
        if self.atomic_u32(sleeping).load(Ordering::Relaxed) != 0 {
            self.atomic_u32(wake).fetch_add(1, Ordering::Release);
            futex_wake(self.atomic_u32(wake));
        }
    }

    fn write(&self, mut data: &[u8]) -> Result<()> {
        let head = self.atomic_u64(OFF_HEAD);
        let tail = self.atomic_u64(OFF_TAIL);
        while !data.is_empty() {
            let h = head.load(Ordering::Relaxed);
            self.wait(
                || self.cap - (h - tail.load(Ordering::Acquire)) > 0,
                OFF_WAKE_SPACE,
                OFF_SLEEP_SPACE,
            )?;
            let free = (self.cap - (h - tail.load(Ordering::Acquire))) as usize;
            let at = (h % self.cap) as usize;
            let n = data.len().min(free).min(self.cap as usize - at);
            // SAFETY: [at, at+n) is inside the data area and free (not yet readable).
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(DATA + at), n) };
            head.store(h + n as u64, Ordering::Release);
            self.notify(OFF_WAKE_DATA, OFF_SLEEP_DATA);
            data = &data[n..];
        }
        Ok(())
    }

    fn read(&self, mut buf: &mut [u8]) -> Result<()> {
        let head = self.atomic_u64(OFF_HEAD);
        let tail = self.atomic_u64(OFF_TAIL);
        while !buf.is_empty() {
            let t = tail.load(Ordering::Relaxed);
            self.wait(
                || head.load(Ordering::Acquire) > t,
                OFF_WAKE_DATA,
                OFF_SLEEP_DATA,
            )?;
            let avail = (head.load(Ordering::Acquire) - t) as usize;
            let at = (t % self.cap) as usize;
            let n = buf.len().min(avail).min(self.cap as usize - at);
            // SAFETY: [at, at+n) holds published bytes the writer will not touch until
            // the tail moves past them.
            unsafe { std::ptr::copy_nonoverlapping(self.base.add(DATA + at), buf.as_mut_ptr(), n) };
            tail.store(t + n as u64, Ordering::Release);
            self.notify(OFF_WAKE_SPACE, OFF_SLEEP_SPACE);
            buf = &mut buf[n..];
        }
        Ok(())
    }
}

/// Whether process `pid` exists.
fn process_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The writer's process id recorded in the ring file at `p` (None: not a ring, or not
/// readable).
fn stale_writer(p: &Path) -> Option<u32> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
        .ok()?;
    let mut magic = [0u8; 8];
    let mut pid = [0u8; 4];
    f.read_exact_at(&mut magic, OFF_MAGIC as u64).ok()?;
    f.read_exact_at(&mut pid, OFF_WPID as u64).ok()?;
    (u64::from_le_bytes(magic) == MAGIC).then(|| u32::from_le_bytes(pid))
}

/// Removes, once per process, the ring files under `/dev/shm` that this user's dead
/// processes left (a process that died before its peer opened its rings).
fn sweep_stale() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        let Ok(dir) = std::fs::read_dir("/dev/shm") else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(n) = name.to_str() else { continue };
            let p = e.path();
            let ours = std::fs::symlink_metadata(&p)
                .map(|m| m.is_file() && m.uid() == uid)
                .unwrap_or(false);
            if !n.starts_with("shoal-") || !ours {
                continue;
            }
            if let Some(pid) = stale_writer(&p) {
                if !process_alive(pid) {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    });
}

/// Sleeps while the shared word still holds `expected`, at most `timeout` (a wake-up,
/// a change of the word or a signal ends it early).
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: the word is a live, aligned u32 of a shared mapping; FUTEX_WAIT (not the
    // private variant) because the other side is another process.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes whoever sleeps on the shared word.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: as in futex_wait.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Copies `dst.len()` bytes at address `remote` of process `pid` (rank `peer`) into
/// `dst` with `process_vm_readv`.
fn read_remote(pid: u32, remote: u64, dst: &mut [u8], peer: usize) -> Result<()> {
    let mut done = 0;
    while done < dst.len() {
        let rest = &mut dst[done..];
        let local = libc::iovec {
            iov_base: rest.as_mut_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        let far = libc::iovec {
            iov_base: (remote + done as u64) as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // SAFETY: `local` is a live, writable buffer of the stated length; the kernel
        // checks the remote range and fails with EFAULT if it is not mapped.
        let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &far, 1, 0) };
        if n <= 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                return Err(Error::Disconnected { peer });
            }
            return Err(Error::Io {
                what: format!("reading rank {peer}'s buffer (process {pid})"),
                source: e,
            });
        }
        done += n as usize;
    }
    Ok(())
}

/// Two `u64`s as one control message's bytes.
fn pair_bytes(a: u64, b: u64) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[..8].copy_from_slice(&a.to_le_bytes());
    m[8..].copy_from_slice(&b.to_le_bytes());
    m
}

fn pair_of(m: &[u8; 16]) -> (u64, u64) {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&m[..8]);
    b.copy_from_slice(&m[8..]);
    (u64::from_le_bytes(a), u64::from_le_bytes(b))
}

/// One rank's rings to and from every peer on this host.
pub struct ShmTransport {
    rank: usize,
    size: usize,
    out: Vec<Option<Ring>>,
    inc: Vec<Option<Ring>>,
    /// Every rank's process id (from the rings' headers).
    pids: Vec<u32>,
    /// Whether every rank can read every peer's memory (agreed when connecting).
    single_copy: bool,
    /// Peers' buffer addresses for the allreduce in progress.
    remote: Vec<u64>,
    /// One piece read from a peer, to be added in.
    scratch: Vec<f32>,
    /// What the peers read when trying the single-copy path (kept at a fixed address
    /// for the transport's life).
    probe: Box<u64>,
}

impl ShmTransport {
    /// Joins the group `job` (a name shared by its ranks, unique per run) as `rank` of
    /// `size`, with rings of `capacity` bytes; waits up to `timeout` for the peers.
    /// Large allreduces are single-copy where the kernel allows it, unless
    /// `SHOAL_SHM_SINGLE_COPY=0`.
    pub fn connect(
        job: &str,
        rank: usize,
        size: usize,
        capacity: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let allowed = std::env::var("SHOAL_SHM_SINGLE_COPY").map_or(true, |v| v != "0");
        Self::connect_with(job, rank, size, capacity, timeout, allowed)
    }

    /// As [`ShmTransport::connect`], with the single-copy path allowed or not by this
    /// rank (it is used only if every rank allows it).
    pub fn connect_with(
        job: &str,
        rank: usize,
        size: usize,
        capacity: usize,
        timeout: Duration,
        single_copy: bool,
    ) -> Result<Self> {
        if rank >= size {
            return Err(Error::BadRank {
                peer: rank,
                rank,
                size,
            });
        }
        let mut out = Vec::with_capacity(size);
        for p in 0..size {
            out.push(if p == rank {
                None
            } else {
                Some(Ring::create(job, rank, p, capacity.max(4096), timeout)?)
            });
        }
        let mut inc = Vec::with_capacity(size);
        for p in 0..size {
            inc.push(if p == rank {
                None
            } else {
                Some(Ring::open(job, p, rank, timeout)?)
            });
        }
        let pids = (0..size)
            .map(|p| inc[p].as_ref().map_or(std::process::id(), Ring::writer_pid))
            .collect();
        let mut t = Self {
            rank,
            size,
            out,
            inc,
            pids,
            single_copy: false,
            remote: vec![0; size],
            scratch: Vec::new(),
            probe: Box::new(PROBE_MAGIC ^ rank as u64),
        };
        t.single_copy = t.agree_single_copy(single_copy)?;
        if t.single_copy {
            t.scratch = vec![0.0; SINGLE_COPY_PIECE];
        }
        Ok(t)
    }

    /// Reads the header of the next message from `peer`: the ring it comes on, its tag
    /// and its length.
    fn next_record(&self, peer: usize) -> Result<(&Ring, u32, u64)> {
        let (rank, size) = (self.rank, self.size);
        let r = self
            .inc
            .get(peer)
            .and_then(|r| r.as_ref())
            .ok_or(Error::BadRank { peer, rank, size })?;
        let mut rec = [0u8; REC];
        r.read(&mut rec)?;
        let t = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]);
        let mut l = [0u8; 8];
        l.copy_from_slice(&rec[8..16]);
        Ok((r, t, u64::from_le_bytes(l)))
    }

    /// How long a send or receive waits on a peer from now on before it fails (a dead
    /// peer's process is noticed whatever this is).
    pub fn set_timeout(&mut self, timeout: Duration) {
        for r in self.out.iter_mut().chain(self.inc.iter_mut()).flatten() {
            r.timeout = timeout;
        }
    }

    /// Whether large allreduces read peers' buffers directly (see the module doc).
    pub fn single_copy(&self) -> bool {
        self.single_copy
    }

    fn peers(&self) -> impl Iterator<Item = usize> + use<> {
        let rank = self.rank;
        (0..self.size).filter(move |&p| p != rank)
    }

    /// Sends `msg` to every peer, then receives one message of the same size from each,
    /// handing it to `got(self, peer, message)`.
    fn all_to_all(
        &mut self,
        tag: u32,
        msg: [u8; 16],
        mut got: impl FnMut(&mut Self, usize, [u8; 16]),
    ) -> Result<()> {
        for p in self.peers() {
            self.send(p, tag, &msg)?;
        }
        for p in self.peers() {
            let mut m = [0u8; 16];
            self.recv(p, tag, &mut m)?;
            got(self, p, m);
        }
        Ok(())
    }

    /// Each rank reads every peer's probe word; the single-copy path is used only if
    /// every rank allows it and every read succeeded, on every rank.
    fn agree_single_copy(&mut self, allowed: bool) -> Result<bool> {
        let addr = &*self.probe as *const u64 as u64;
        let mut ok = allowed;
        self.all_to_all(
            TAG_PROBE,
            pair_bytes(u64::from(allowed), addr),
            |t, p, m| {
                let (theirs, at) = pair_of(&m);
                let mut word = [0u8; 8];
                ok &= theirs == 1
                    && read_remote(t.pids[p], at, &mut word, p).is_ok()
                    && u64::from_le_bytes(word) == PROBE_MAGIC ^ p as u64;
            },
        )?;
        let mut all = ok;
        self.all_to_all(TAG_AGREE, pair_bytes(u64::from(ok), 0), |_, _, m| {
            all &= pair_of(&m).0 == 1;
        })?;
        Ok(all)
    }

    /// The single-copy sum allreduce: trade buffer addresses; reduce this rank's
    /// segment by reading it from every peer (peers in rank order, so the sum is the
    /// same whichever rank computes it); wait until every segment is reduced; copy every
    /// peer's segment straight from its buffer; wait until nobody reads this buffer any
    /// more.
    fn allreduce_single_copy(&mut self, data: &mut [f32]) -> Result<()> {
        let (n, r, len) = (self.size, self.rank, data.len());
        let mine = pair_bytes(data.as_ptr() as u64, len as u64);
        let mut mismatch = None;
        self.all_to_all(TAG_ADDR, mine, |t, p, m| {
            let (at, their_len) = pair_of(&m);
            if their_len != len as u64 {
                mismatch.get_or_insert((p, their_len));
            }
            t.remote[p] = at;
        })?;
        if let Some((p, their_len)) = mismatch {
            return Err(Error::Mismatch(format!(
                "allreduce of {len} values, rank {p} passed {their_len}"
            )));
        }
        let (a, b) = split_range(len, n, r);
        let mut at = a;
        while at < b {
            let m = (b - at).min(self.scratch.len());
            for p in 0..n {
                if p == r {
                    continue;
                }
                let s = &mut self.scratch[..m];
                read_remote(
                    self.pids[p],
                    self.remote[p] + 4 * at as u64,
                    f32_bytes_mut(s),
                    p,
                )?;
                for (d, v) in data[at..at + m].iter_mut().zip(s.iter()) {
                    *d += v;
                }
            }
            at += m;
        }
        self.all_to_all(TAG_REDUCED, [0; 16], |_, _, _| {})?;
        for p in 0..n {
            if p == r {
                continue;
            }
            let (a, b) = split_range(len, n, p);
            let dst = f32_bytes_mut(&mut data[a..b]);
            read_remote(self.pids[p], self.remote[p] + 4 * a as u64, dst, p)?;
        }
        self.all_to_all(TAG_GATHERED, [0; 16], |_, _, _| {})?;
        Ok(())
    }
}

impl Transport for ShmTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn buffered_bytes(&self) -> usize {
        self.out
            .iter()
            .flatten()
            .map(|r| r.cap as usize)
            .min()
            .unwrap_or(usize::MAX)
    }

    fn size(&self) -> usize {
        self.size
    }

    fn send(&mut self, peer: usize, tag: u32, data: &[u8]) -> Result<()> {
        self.send_parts(peer, tag, &[data])
    }

    fn recv(&mut self, peer: usize, tag: u32, buf: &mut [u8]) -> Result<()> {
        let (r, t, len) = self.next_record(peer)?;
        if t != tag || len != buf.len() as u64 {
            return Err(Error::Frame {
                peer,
                why: format!(
                    "expected tag {tag} with {} bytes, got tag {t} with {len} bytes",
                    buf.len()
                ),
            });
        }
        r.read(buf)
    }

    fn send_parts(&mut self, peer: usize, tag: u32, parts: &[&[u8]]) -> Result<()> {
        let (rank, size) = (self.rank, self.size);
        let r = self
            .out
            .get(peer)
            .and_then(|r| r.as_ref())
            .ok_or(Error::BadRank { peer, rank, size })?;
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut rec = [0u8; REC];
        rec[0..4].copy_from_slice(&tag.to_le_bytes());
        rec[8..16].copy_from_slice(&(len as u64).to_le_bytes());
        r.write(&rec)?;
        for p in parts {
            r.write(p)?;
        }
        Ok(())
    }

    fn recv_any(&mut self, peer: usize, buf: &mut Vec<u8>, max: u64) -> Result<u32> {
        let (r, t, len) = self.next_record(peer)?;
        if len > max {
            return Err(crate::local::too_long(peer, len, max));
        }
        buf.clear();
        buf.resize(len as usize, 0);
        r.read(buf)?;
        Ok(t)
    }

    fn allreduce_sum_native(&mut self, data: &mut [f32]) -> Option<Result<()>> {
        if !self.single_copy || data.len() * 4 < SINGLE_COPY_MIN_BYTES {
            return None;
        }
        Some(self.allreduce_single_copy(data))
    }
}
