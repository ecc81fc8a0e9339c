//! A process group for a program that is not one of shoal's workloads (a PyTorch
//! script through the `shoal` Python package): it joins the job `shoal run` started, or
//! one that torchrun-style variables describe, forms the workers' allreduce group over
//! shared memory or TCP, and stops the process when another member fails.

use crate::launch::{ENV_CONNECT_TIMEOUT, ENV_COORDINATOR, ENV_HOST, ENV_TOKEN};
use crate::{Error, Result};
use shoal_comm::local::LocalTransport;
use shoal_comm::shm::ShmTransport;
use shoal_comm::tcp::{TcpOptions, TcpTransport};
use shoal_comm::{Communicator, Transport};
use shoal_control::proto::Member;
use shoal_control::{ControlClient, Coordinator, CoordinatorConfig, Joining};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The data plane a command's processes use (`shm` or `tcp`), set by `shoal run`.
pub const ENV_TRANSPORT: &str = "SHOAL_TRANSPORT";

/// How many of a command's processes host parameter-server shards (the first ones; set
/// by `shoal run --ps M`; default: all of them).
pub const ENV_SHARDS: &str = "SHOAL_PS_SHARDS";

/// How long a process waits for its peers' shared-memory rings.
pub(crate) const SHM_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Capacity of each shared-memory ring of a group.
const SHM_RING_BYTES: usize = 8 << 20;

/// One process's place in a group: its rank among the group's processes, theirs on
/// its host, and the allreduce plane between them.
pub struct Group {
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    comm: Communicator<Box<dyn Transport>>,
    /// Names the job's shared-memory rings (from its token).
    name: String,
    ctl: Option<Arc<ControlClient>>,
    dog: Option<Watchdog>,
    /// With torchrun-style variables, rank 0 hosts the coordinator.
    _coordinator: Option<Coordinator>,
    /// TLS for the program's further TCP planes (from `SHOAL_TLS_DIR`).
    tls: Option<Arc<shoal_comm::tls::Tls>>,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn int_var(name: &str) -> Result<Option<usize>> {
    match var(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map(Some)
            .map_err(|_| Error::Cluster(format!("{name} is '{v}', not a whole number"))),
    }
}

fn connect_wait() -> Result<Duration> {
    match var(ENV_CONNECT_TIMEOUT) {
        None => Ok(Duration::from_secs(60)),
        Some(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && (0.0..=86_400.0).contains(s))
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                Error::Cluster(format!(
                    "{ENV_CONNECT_TIMEOUT} is '{v}', not a number of seconds (0 to 86400)"
                ))
            }),
    }
}

/// A name for a job that only torchrun-style variables describe (the same on every
/// rank; not a secret: set `SHOAL_JOB_TOKEN` on an untrusted network).
fn derived_token(master: &str, run_id: &str) -> String {
    // FNV-1a, 64 bits: a stable name that is safe in a shared-memory path.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in master.bytes().chain([0]).chain(run_id.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("torchrun-{h:016x}")
}

impl Group {
    /// Joins the group the environment describes:
    /// - `shoal run` sets `SHOAL_COORDINATOR`, `SHOAL_JOB_TOKEN`, `SHOAL_INDEX` (the rank)
    ///   and `SHOAL_TRANSPORT`;
    /// - torchrun (or any launcher) sets `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`
    ///   (and `LOCAL_RANK`, `LOCAL_WORLD_SIZE`): rank 0 then hosts the coordinator on
    ///   `MASTER_ADDR:(MASTER_PORT + 1)` (`SHOAL_COORDINATOR_PORT` to choose another);
    /// - neither: a group of one.
    ///
    /// Returns once every member has joined and the data plane is formed.
    pub fn join_from_env() -> Result<Group> {
        let world = int_var("WORLD_SIZE")?;
        let rank_var = match crate::role::role_index()? {
            Some(i) => Some(i as usize),
            None => int_var("RANK")?,
        };
        let Some(coordinator) = var(ENV_COORDINATOR) else {
            return match (world, rank_var) {
                (None | Some(1), None | Some(0)) => Self::alone(),
                (Some(w), Some(r)) => Self::torchrun(r, w),
                (w, r) => Err(Error::Cluster(format!(
                    "RANK is {} and WORLD_SIZE {}: a launcher sets both (or run under \
                     `shoal run -n N -- ...`)",
                    r.map_or("unset".into(), |r| r.to_string()),
                    w.map_or("unset".into(), |w| w.to_string())
                ))),
            };
        };
        let token = var(ENV_TOKEN).ok_or_else(|| {
            Error::Cluster(format!(
                "{ENV_COORDINATOR} is set but {ENV_TOKEN} is not (start the job with `shoal run`)"
            ))
        })?;
        let tls = crate::tls::from_env()?;
        let ctl = ControlClient::connect(
            &coordinator,
            &token,
            connect_wait()?,
            tls.as_ref().map(|t| &t.control),
        )?;
        Self::assemble(ctl, &token, rank_var, None, tls)
    }

    fn alone() -> Result<Group> {
        let t: Box<dyn Transport> = Box::new(LocalTransport::group(1).remove(0));
        Ok(Group {
            rank: 0,
            size: 1,
            local_rank: 0,
            local_size: 1,
            comm: Communicator::new(t),
            name: format!("shoal-{}", crate::launch::new_token()?),
            ctl: None,
            dog: None,
            _coordinator: None,
            tls: None,
        })
    }

    fn torchrun(rank: usize, world: usize) -> Result<Group> {
        if rank >= world {
            return Err(Error::Cluster(format!(
                "RANK is {rank} in a WORLD_SIZE of {world}"
            )));
        }
        let addr = var("MASTER_ADDR").ok_or_else(|| {
            Error::Cluster(format!(
                "RANK and WORLD_SIZE are set ({rank} of {world}) but MASTER_ADDR is not"
            ))
        })?;
        let port = match int_var("SHOAL_COORDINATOR_PORT")? {
            Some(p) => p,
            None => int_var("MASTER_PORT")?
                .ok_or_else(|| Error::Cluster("MASTER_ADDR is set but MASTER_PORT is not".into()))?
                .checked_add(1)
                .ok_or_else(|| Error::Cluster("MASTER_PORT is too large".into()))?,
        };
        let port = u16::try_from(port)
            .map_err(|_| Error::Cluster(format!("coordinator port {port} is not a TCP port")))?;
        let token = var(ENV_TOKEN).unwrap_or_else(|| {
            derived_token(
                &format!("{addr}:{port}"),
                &var("TORCHELASTIC_RUN_ID").unwrap_or_default(),
            )
        });
        let tls = crate::tls::from_env()?;
        let coordinator = if rank == 0 {
            let listen: SocketAddr =
                std::net::ToSocketAddrs::to_socket_addrs(&(addr.as_str(), port))
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| {
                        Error::Cluster(format!("MASTER_ADDR '{addr}' does not resolve"))
                    })?;
            Some(Coordinator::start(
                listen,
                CoordinatorConfig {
                    token: token.clone(),
                    world: world as u32,
                    heartbeat_timeout: Duration::from_secs_f64(
                        crate::dist::DistSection::default().heartbeat_timeout_s,
                    ),
                    rendezvous_timeout: Duration::from_secs(180),
                    tls: tls.as_ref().map(|t| t.control.clone()),
                },
            )?)
        } else {
            None
        };
        let ctl = ControlClient::connect(
            &format!("http://{addr}:{port}"),
            &token,
            connect_wait()?,
            tls.as_ref().map(|t| &t.control),
        )?;
        Self::assemble(ctl, &token, Some(rank), coordinator, tls)
    }

    fn assemble(
        mut ctl: ControlClient,
        token: &str,
        index: Option<usize>,
        coordinator: Option<Coordinator>,
        tls: Option<crate::tls::JobTls>,
    ) -> Result<Group> {
        let host = var(ENV_HOST).unwrap_or_else(|| "127.0.0.1".into());
        let tcp = match var(ENV_TRANSPORT).as_deref() {
            None | Some("auto") => None,
            Some("shm") => Some(false),
            Some("tcp") => Some(true),
            Some(o) => {
                return Err(Error::Cluster(format!(
                    "{ENV_TRANSPORT} is '{o}'; expected shm, tcp or auto"
                )))
            }
        };
        // A listener is bound before registering, so the advertised address is live;
        // it is dropped unused when the group turns out to be on one host.
        let listener = match tcp {
            Some(false) => None,
            _ => Some(bind(&host)?),
        };
        let index = index
            .map(|i| u32::try_from(i).map_err(|_| Error::Cluster(format!("rank {i} is too large"))))
            .transpose()?;
        let reg = ctl.join(&Joining {
            role: "worker".into(),
            host: host.clone(),
            data_addr: listener
                .as_ref()
                .map(|(_, a)| a.to_string())
                .unwrap_or_default(),
            index,
        })?;
        let mut members: Vec<&Member> = reg.members.iter().collect();
        members.sort_by_key(|m| (m.index.unwrap_or(u32::MAX), m.rank));
        let size = members.len();
        let rank = members
            .iter()
            .position(|m| m.rank == reg.rank)
            .ok_or_else(|| Error::Cluster("this process is not among the job's members".into()))?;
        if let Some(i) = index {
            if i as usize != rank {
                return Err(Error::Cluster(format!(
                    "this process has rank {i}, but the job's members give it {rank} (ranks \
                     must be 0..{size}, each once)"
                )));
            }
        }
        let mine = &members[rank].host;
        let local: Vec<usize> = (0..size).filter(|&i| members[i].host == *mine).collect();
        let local_rank = local.iter().position(|&i| i == rank).unwrap_or(0);
        let one_host = local.len() == size;
        let listener = match tcp.unwrap_or(!one_host) {
            true => Some(listener.map(|(l, _)| l).ok_or_else(|| {
                Error::Cluster(format!(
                    "{ENV_TRANSPORT}=shm, but the job spans several hosts"
                ))
            })?),
            false if !one_host => {
                return Err(Error::Cluster(format!(
                    "{ENV_TRANSPORT}=shm, but the job spans several hosts"
                )))
            }
            false => None,
        };
        let ctl = Arc::new(ctl);
        let dog = Watchdog::start(ctl.clone(), format!("rank {rank}"));
        let tls = tls.map(|t| t.data);
        // The coordinator's heartbeat timeout (it tells its members to beat four times
        // within it) sets the data plane's deadline, as a workload's `[dist]` does.
        let timeout = crate::dist::DistSection {
            heartbeat_timeout_s: (4 * reg.heartbeat).as_secs_f64(),
            ..Default::default()
        }
        .data_timeout();
        let comm = worker_plane(token, rank, &members, listener, tls.clone(), timeout)?;
        Ok(Group {
            rank,
            size,
            local_rank,
            local_size: local.len(),
            comm,
            name: format!("shoal-{token}"),
            ctl: Some(ctl),
            dog: Some(dog),
            _coordinator: coordinator,
            tls,
        })
    }

    /// This process's rank, `0..size`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// This process's rank among those on its host.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// The number of processes on this process's host.
    pub fn local_size(&self) -> usize {
        self.local_size
    }

    /// A name for this job's shared-memory rings, the same on every process (a
    /// program's further planes, such as parameter-server links, are named after it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many processes host parameter-server shards (the first ones): `SHOAL_PS_SHARDS`
    /// (1 to size), else all of them.
    pub fn shards(&self) -> Result<usize> {
        match int_var(ENV_SHARDS)? {
            None => Ok(self.size),
            Some(m) if (1..=self.size).contains(&m) => Ok(m),
            Some(m) => Err(Error::Cluster(format!(
                "{ENV_SHARDS} is {m}: the job's {} processes can host 1 to {} shards",
                self.size, self.size
            ))),
        }
    }

    /// TLS for the program's further TCP planes (the processes' own parameter-server
    /// links), when the job has it.
    pub fn tls(&self) -> Option<&Arc<shoal_comm::tls::Tls>> {
        self.tls.as_ref()
    }

    /// The collectives between the group's processes.
    pub fn comm(&mut self) -> &mut Communicator<Box<dyn Transport>> {
        &mut self.comm
    }

    /// Leaves the job in order (the coordinator counts this process as finished).
    pub fn leave(mut self) -> Result<()> {
        if let Some(d) = self.dog.take() {
            d.stop();
        }
        if let Some(c) = self.ctl.take().and_then(|c| Arc::try_unwrap(c).ok()) {
            c.leave()?;
        }
        // Rank 0's coordinator (torchrun-style) waits for the others to leave.
        if let Some(c) = self._coordinator.take() {
            c.wait_finished()?;
        }
        Ok(())
    }
}

/// Serves as the coordinator of a job of `workers` processes that are no workload of
/// shoal's (a python job on a cluster): serves on `listen` (its address said on stderr
/// as `coordinator listening on ADDR`), returns when every process has left in order,
/// or an error if one fails or the job has not assembled within `rendezvous`.
pub fn serve_coordinator(
    listen: SocketAddr,
    token: &str,
    workers: u32,
    rendezvous: Duration,
) -> Result<()> {
    let coord = Coordinator::start(
        listen,
        CoordinatorConfig {
            token: token.into(),
            world: workers,
            heartbeat_timeout: Duration::from_secs_f64(
                crate::dist::DistSection::default().heartbeat_timeout_s,
            ),
            rendezvous_timeout: rendezvous,
            tls: crate::tls::from_env()?.map(|t| t.control),
        },
    )?;
    eprintln!("coordinator listening on {}", coord.addr);
    eprintln!("coordinator of a python job: expecting {workers} processes");
    coord.wait_finished()?;
    eprintln!("every process of the job has finished");
    Ok(())
}

/// The allreduce plane of a job's workers (`workers` in rank order, `rank` this one's):
/// TCP between the addresses they advertised when `listener` is given, else
/// shared-memory rings named after the job's token; on several hosts, the two-level
/// allreduce. On TCP every connection is TLS when `tls` is given, and every receive and
/// send fails after `timeout` (the shared-memory rings keep their own deadline).
pub(crate) fn worker_plane(
    token: &str,
    rank: usize,
    workers: &[&Member],
    listener: Option<TcpListener>,
    tls: Option<Arc<shoal_comm::tls::Tls>>,
    timeout: Duration,
) -> Result<Communicator<Box<dyn Transport>>> {
    let n = workers.len();
    let t: Box<dyn Transport> = match listener {
        None => Box::new(ShmTransport::connect(
            &format!("shoal-{token}"),
            rank,
            n,
            SHM_RING_BYTES,
            SHM_CONNECT_TIMEOUT,
        )?),
        Some(l) => {
            let addrs = workers
                .iter()
                .map(|m| parse_addr(&m.data_addr, &format!("worker {}", m.rank)))
                .collect::<Result<Vec<_>>>()?;
            let opts = TcpOptions {
                token: token.into(),
                io_timeout: Some(timeout),
                tls,
                ..Default::default()
            };
            Box::new(TcpTransport::connect(rank, &addrs, l, &opts)?)
        }
    };
    let mut comm = Communicator::new(t);
    let host_of: Vec<usize> = workers
        .iter()
        .map(|m| workers.iter().position(|x| x.host == m.host).unwrap_or(0))
        .collect();
    comm.set_hosts(&host_of)?;
    Ok(comm)
}

pub(crate) fn bind(host: &str) -> Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind((host, 0))
        .map_err(|e| Error::Cluster(format!("binding a data-plane listener on {host}: {e}")))?;
    let a = l
        .local_addr()
        .map_err(|e| Error::Cluster(format!("reading the listener address: {e}")))?;
    Ok((l, a))
}

pub(crate) fn parse_addr(s: &str, who: &str) -> Result<SocketAddr> {
    s.parse()
        .map_err(|_| Error::Cluster(format!("{who} advertised a bad data-plane address '{s}'")))
}

/// Stops this process if the control plane reports a failed member (or loses the
/// coordinator), so that no process of a broken job waits for ever.
pub(crate) struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub(crate) fn start(ctl: Arc<ControlClient>, me: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Err(e) = ctl.check() {
                    eprintln!("{me}: stopping: {e}");
                    std::process::exit(3);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    pub(crate) fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_derived_token_is_the_same_for_the_same_job_and_differs_for_another() {
        let a = derived_token("127.0.0.1:29501", "none");
        assert_eq!(a, derived_token("127.0.0.1:29501", "none"));
        assert_ne!(a, derived_token("127.0.0.1:29502", "none"));
        assert_ne!(a, derived_token("127.0.0.1:29501", "job-2"));
        assert!(
            a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{a}"
        );
    }
}
