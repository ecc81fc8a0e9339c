//! One process of a distributed job (`shoal role`): its role (`worker`, `ps` or
//! `worker+ps`) and the job taken from the environment (the `ENV_*` variables of
//! [`crate::launch`]); it registers with the coordinator, hosts its parameter-server
//! shard if it has one, builds the worker's exchange (an allreduce over shared memory or
//! TCP, or a client of the shards) and hands it to the workload's [`JobKind::run_worker`].
//! A process of a broken job stops itself (the watchdog) instead of waiting for ever.
//! Also the coordinator of a job whose processes a scheduler starts.

use crate::dist::{DataPlane, DistSection, Placement};
use crate::exchange::{Attachment, Exchange};
use crate::group::{bind, parse_addr, worker_plane, Watchdog, SHM_CONNECT_TIMEOUT};
use crate::launch::{
    Report, ENV_CONNECT_TIMEOUT, ENV_COORDINATOR, ENV_HOST, ENV_INDEX, ENV_JOB, ENV_RESUME,
    ENV_ROLE, ENV_RUN, ENV_TOKEN, ENV_WORKERS,
};
use crate::tls::JobTls;
use crate::{Error, Result};
use shoal_comm::ps::{
    shard_range, shm_link, LinkOpener, PsClient, PsServer, ShardConfig, ShardPlane,
};
use shoal_control::{ControlClient, Coordinator, CoordinatorConfig, Joining};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A kind of job whose processes the runtime runs: a workload crate implements it for
/// its job (what `RUN/job` holds for it) and the binary picks the kind by name.
pub trait JobKind: Sized {
    /// The workload's error; the runtime's and the planes' errors convert into it.
    type Error: From<Error> + From<shoal_comm::Error> + From<shoal_control::Error>;
    /// The name in `RUN/job/kind`.
    const KIND: &'static str;
    /// What a worker's throughput counts (its reports' `tokens`), for the log.
    const UNIT: &'static str = "examples";
    /// Reads the job from its directory (written by [`JobKind::prepare`] or the
    /// workload's launcher).
    fn read(job: &Path) -> std::result::Result<Self, Self::Error>;
    /// Prepares `RUN/job` from the job's configuration file (what a standalone
    /// coordinator does before it serves); returns the job's shape.
    fn prepare(config: &Path, run_dir: &Path) -> std::result::Result<DistSection, Self::Error>;
    /// The job's shape.
    fn dist(&self) -> &DistSection;
    /// Whether workers meet through parameter-server shards (else: an allreduce).
    fn needs_shards(&self) -> bool {
        self.dist().mode != crate::dist::DistMode::Allreduce
    }
    /// The dense values all shards hold together, and the width of a sparse row (0:
    /// no sparse rows).
    fn shard_shape(&self) -> std::result::Result<(usize, usize), Self::Error>;
    /// A shard's settings (`width` from [`JobKind::shard_shape`]).
    fn shard_config(&self, width: usize, token: &str) -> ShardConfig;
    /// Runs this worker's part of the job.
    fn run_worker(self, w: Worker) -> std::result::Result<(), Self::Error>;
}

/// What a worker of a job is given.
pub struct Worker {
    /// The run directory (checkpoints).
    pub run_dir: PathBuf,
    /// A checkpoint to resume from.
    pub resume: Option<PathBuf>,
    /// Its place in the job: rank, worker count and how its gradients meet the others'
    /// (what the workload's trainer attaches to).
    pub attachment: Attachment,
}

/// The kind of the job in `job` (its `kind` file; `nmt` when there is none, as jobs
/// written before the file existed).
pub fn job_kind(job: &Path) -> Result<String> {
    match std::fs::read_to_string(job.join("kind")) {
        Ok(k) => Ok(k.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok("nmt".into()),
        Err(e) => Err(Error::Io {
            path: job.join("kind"),
            source: e,
        }),
    }
}

/// A process of a job that has reached its coordinator: its part taken from the
/// environment (see the `ENV_*` constants of [`crate::launch`]), and the job's kind.
pub struct Joined {
    role: String,
    token: String,
    run_dir: PathBuf,
    job: PathBuf,
    host: String,
    resume: Option<PathBuf>,
    index: Option<u32>,
    kind: String,
    ctl: ControlClient,
    tls: Option<JobTls>,
}

impl Joined {
    /// The job's kind (`RUN/job/kind`), read once the coordinator answered.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The job directory.
    pub fn job_dir(&self) -> &Path {
        &self.job
    }
}

/// Reads this process's part from the environment and connects to the coordinator
/// (waiting up to `SHOAL_CONNECT_TIMEOUT_S`, default 60 s). The coordinator prepares the
/// job directory before it serves, so once it answers the job's files are there (on a
/// cluster: on the shared volume) and the kind can be read; [`run`] does the rest.
pub fn connect() -> Result<Joined> {
    let role = env(ENV_ROLE)?;
    let coordinator = env(ENV_COORDINATOR)?;
    let token = env(ENV_TOKEN)?;
    let run_dir = PathBuf::from(env(ENV_RUN)?);
    let job = std::env::var_os(ENV_JOB)
        .map(PathBuf::from)
        .unwrap_or_else(|| run_dir.join("job"));
    let host = std::env::var(ENV_HOST).unwrap_or_else(|_| "127.0.0.1".into());
    let resume = std::env::var_os(ENV_RESUME).map(PathBuf::from);
    let index = role_index()?;
    let wait = match std::env::var(ENV_CONNECT_TIMEOUT) {
        Ok(v) => v
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|s| *s >= 0.0)
            .ok_or_else(|| {
                Error::Cluster(format!(
                    "{ENV_CONNECT_TIMEOUT} is '{v}', not a number of seconds"
                ))
            })?,
        Err(_) => 60.0,
    };
    log(&format!(
        "{role}{}: connecting to the coordinator at {coordinator} (run {})",
        index.map(|i| format!(" index {i}")).unwrap_or_default(),
        run_dir.display()
    ));
    let tls = crate::tls::from_env()?;
    let ctl = ControlClient::connect(
        &coordinator,
        &token,
        Duration::from_secs_f64(wait),
        tls.as_ref().map(|t| &t.control),
    )?;
    let kind = job_kind(&job)?;
    log(&format!("connected: a '{kind}' job in {}", job.display()));
    Ok(Joined {
        role,
        token,
        run_dir,
        job,
        host,
        resume,
        index,
        kind,
        ctl,
        tls,
    })
}

/// Runs this process's part of a job of kind `K` (see [`connect`]). A worker prints
/// [`Report`]s on stdout.
pub fn run<K: JobKind>(j: Joined) -> std::result::Result<(), K::Error> {
    let Joined {
        mut role,
        token,
        run_dir,
        job,
        host,
        resume,
        index,
        kind,
        mut ctl,
        tls,
    } = j;
    if kind != K::KIND {
        return Err(Error::Cluster(format!(
            "{}: a '{kind}' job, not '{}'",
            job.join("kind").display(),
            K::KIND
        ))
        .into());
    }
    STEP_LOG.lock().unwrap_or_else(|p| p.into_inner()).unit = K::UNIT;
    // A restarted job's pods are all told to resume from the run directory; on the
    // first start it has no checkpoint yet (the coordinator has made the directory by
    // now), and the job starts from the beginning.
    let resume = resume.filter(|p| {
        let fresh = p.is_dir()
            && !p.join(crate::store::META_FILE).exists()
            && !p.join(crate::store::LATEST).exists()
            && crate::store::candidates(p).is_ok_and(|c| c.is_empty());
        if fresh {
            log(&format!(
                "{ENV_RESUME}={}: no checkpoint there yet, starting from the beginning",
                p.display()
            ));
        }
        !fresh
    });
    let spec = K::read(&job)?;
    let d = spec.dist().clone();
    // An elastic job's launcher says how many workers it has now.
    let world = match std::env::var(ENV_WORKERS) {
        Ok(v) => {
            let n = v.trim().parse::<usize>().map_err(|_| {
                Error::Cluster(format!("{ENV_WORKERS} is '{v}', not a number of workers"))
            })?;
            d.check_world(n, ENV_WORKERS)?;
            n
        }
        Err(_) => d.workers,
    };
    crate::tls::check(&d, tls.as_ref())?;
    let data_tls = tls.as_ref().map(|t| t.data.clone());
    let shards_needed = spec.needs_shards();
    // A scheduler starts all workers from one template: with colocated shards, the
    // workers with the lowest indexes host them.
    if role == "worker" && shards_needed && d.placement == Placement::Colocated {
        if let Some(i) = index.filter(|&i| (i as usize) < d.ps) {
            eprintln!("worker index {i} hosts parameter-server shard {i} (colocated placement)");
            role = "worker+ps".into();
        }
    }
    let hosts_shard = matches!(role.as_str(), "ps" | "worker+ps");
    let is_worker = role.starts_with("worker");
    if !(is_worker || role == "ps") {
        return Err(Error::Cluster(format!(
            "{ENV_ROLE} is '{role}'; expected worker, ps or worker+ps"
        ))
        .into());
    }
    // Listeners are bound before registering, so the advertised addresses are live.
    // Shards on shared memory (the processes of one host) meet their workers on
    // per-pair rings and need no port.
    let shm_shards = d.transport == DataPlane::Shm;
    let shard_listener = if hosts_shard && !shm_shards {
        Some(bind(&host)?)
    } else {
        None
    };
    let ring_listener = if is_worker && !shards_needed && d.transport == DataPlane::Tcp {
        Some(bind(&host)?)
    } else {
        None
    };
    let advertised = shard_listener
        .as_ref()
        .or(ring_listener.as_ref())
        .map(|(_, a)| a.to_string())
        .unwrap_or_default();
    let reg = ctl.join(&Joining {
        role: role.clone(),
        host: host.clone(),
        data_addr: advertised,
        index,
    })?;
    let me = format!("{role} (control rank {})", reg.rank);
    log(&format!(
        "{me}: registered from {host}; the job has {} members",
        reg.members.len()
    ));
    let ctl = Arc::new(ctl);
    let dog = Watchdog::start(ctl.clone(), me.clone());
    // Members in role order: by index where the scheduler gave one, else by rank.
    let mut members: Vec<&shoal_control::proto::Member> = reg.members.iter().collect();
    members.sort_by_key(|m| (m.index.unwrap_or(u32::MAX), m.rank));
    let shard_hosts: Vec<&shoal_control::proto::Member> = members
        .iter()
        .copied()
        .filter(|m| m.role == "ps" || m.role == "worker+ps")
        .collect();
    let worker_ranks: Vec<u32> = members
        .iter()
        .filter(|m| m.role.starts_with("worker"))
        .map(|m| m.rank)
        .collect();
    if worker_ranks.len() != world {
        return Err(Error::Cluster(format!(
            "{} workers registered, the job has {world}",
            worker_ranks.len(),
        ))
        .into());
    }
    // This process's shard, if it hosts one.
    let (total, width) = spec.shard_shape()?;
    let mut shard_cfg = spec.shard_config(width, &token);
    shard_cfg.workers = world;
    shard_cfg.tls = data_tls.clone();
    let ps_wait = shard_cfg.timeout;
    let shards = shard_hosts.len();
    let shm_job = format!("shoal-{token}");
    let server = match hosts_shard {
        true => {
            let idx = shard_hosts
                .iter()
                .position(|m| m.rank == reg.rank)
                .ok_or_else(|| Error::Cluster(format!("{me}: not in the shard table")))?;
            let (a, b) = shard_range(total, shards, idx);
            let (plane, addr) = match shard_listener {
                Some((l, _)) => {
                    let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                    let tls = if data_tls.is_some() { " with TLS" } else { "" };
                    (ShardPlane::Tcp(l), format!("{addr}{tls}"))
                }
                None => {
                    let links = (0..world)
                        .map(|w| {
                            let job = shm_job.clone();
                            Box::new(move || shm_link(&job, idx, w, 0, SHM_CONNECT_TIMEOUT))
                                as LinkOpener
                        })
                        .collect();
                    (ShardPlane::Links(links), "shared memory".to_string())
                }
            };
            let s = PsServer::start_on(plane, b - a, shard_cfg)?;
            log(&format!(
                "{me}: serving parameter-server shard {idx} of {shards} ({}) on {addr}",
                match width {
                    0 => format!("values {a}..{b} of {total}"),
                    w => format!("rows {a}..{b} of {total}, {w} values each"),
                }
            ));
            Some(s)
        }
        false => None,
    };
    let result = if is_worker {
        let rank = worker_ranks
            .iter()
            .position(|&r| r == reg.rank)
            .expect("a worker is in the worker table");
        let shard_addrs = || {
            shard_hosts
                .iter()
                .map(|m| parse_addr(&m.data_addr, &format!("shard host {}", m.rank)))
                .collect::<Result<Vec<_>>>()
        };
        let exchange = match shards_needed {
            false => {
                let workers: Vec<&shoal_control::proto::Member> = members
                    .iter()
                    .copied()
                    .filter(|m| m.role.starts_with("worker"))
                    .collect();
                let comm = worker_plane(
                    &token,
                    rank,
                    &workers,
                    ring_listener.map(|(l, _)| l),
                    data_tls.clone(),
                    d.data_timeout(),
                )?;
                Exchange::Allreduce(comm)
            }
            true if shm_shards => {
                let links = (0..shards)
                    .map(|i| shm_link(&shm_job, i, rank, 1, SHM_CONNECT_TIMEOUT))
                    .collect::<shoal_comm::Result<Vec<_>>>()?;
                Exchange::Ps(PsClient::over(links, rank, total, width, &token)?)
            }
            true => Exchange::Ps(PsClient::connect_with(
                &shard_addrs()?,
                rank,
                total,
                width,
                &token,
                data_tls.as_deref(),
                // Past the shards' own wait for the other workers, which names them.
                Some(d.data_timeout().max(ps_wait + Duration::from_secs(30))),
            )?),
        };
        let sealed = match &data_tls {
            Some(_) => " with TLS",
            None => "",
        };
        log(&format!(
            "{me}: worker {rank} of {world}, exchanging gradients by {}",
            match &exchange {
                Exchange::Allreduce(_) if d.transport == DataPlane::Tcp =>
                    format!("ring allreduce over TCP{sealed}"),
                Exchange::Allreduce(_) => "ring allreduce over shared memory".to_string(),
                _ if shm_shards => format!("{shards} parameter-server shards over shared memory"),
                _ => format!("{shards} parameter-server shards over TCP{sealed}"),
            }
        ));
        spec.run_worker(Worker {
            run_dir: run_dir.clone(),
            resume: resume.clone(),
            attachment: Attachment::new(rank, world, exchange)?,
        })
    } else {
        Ok(())
    };
    finish::<K>(result, server, dog, ctl)
}

/// Waits for this process's shard (if any) to be released by every worker, then leaves
/// the job (or abandons it after a failure).
fn finish<K: JobKind>(
    result: std::result::Result<(), K::Error>,
    server: Option<PsServer>,
    dog: Watchdog,
    ctl: Arc<ControlClient>,
) -> std::result::Result<(), K::Error> {
    let result = result.and_then(|()| match server {
        Some(s) => {
            log("waiting for every worker to release this process's shard");
            s.join().map_err(K::Error::from)?;
            log("shard released by every worker");
            Ok(())
        }
        None => Ok(()),
    });
    dog.stop();
    match (&result, Arc::try_unwrap(ctl)) {
        (Ok(()), Ok(c)) => {
            c.leave()?;
            log("left the job: finished");
        }
        (_, Ok(c)) => {
            c.abandon();
            log("abandoned the job after the error below");
        }
        (_, Err(_)) => {}
    }
    result
}

fn env(name: &str) -> Result<String> {
    std::env::var(name)
        .map_err(|_| Error::Cluster(format!("environment variable {name} is not set")))
}

/// Prints a report for the launcher (one JSON line on stdout), and what it says in
/// words in this process's log (see [`log`]; updates at most every 10 s, with the
/// throughput since the last such line).
pub fn emit(r: &Report) {
    if let Ok(line) = serde_json::to_string(r) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
    let mut meter = STEP_LOG.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(line) = meter.line(r, Instant::now()) {
        log(&line);
    }
}

/// A line in this process's log: stderr, which the local launcher writes to
/// `RUN/job/logs/NAME.log` (a cluster scheduler keeps it as the pod's log), after the
/// UTC time.
pub fn log(line: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    eprintln!("{} {line}", utc(now));
}

/// `YYYY-MM-DD HH:MM:SSZ` of a Unix time (the civil calendar of the proleptic
/// Gregorian days since 1970-01-01).
fn utc(unix: u64) -> String {
    let (days, secs) = ((unix / 86_400) as i64, unix % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// What the log says of a worker's reports: every report but the updates in full,
/// the updates every [`StepLog::EVERY`] with their throughput.
struct StepLog {
    unit: &'static str,
    last: Option<Instant>,
    units: usize,
    steps: u64,
}

static STEP_LOG: Mutex<StepLog> = Mutex::new(StepLog {
    unit: "examples",
    last: None,
    units: 0,
    steps: 0,
});

impl StepLog {
    const EVERY: Duration = Duration::from_secs(10);

    fn line(&mut self, r: &Report, now: Instant) -> Option<String> {
        let unit = self.unit;
        Some(match r {
            Report::Started {
                rank,
                last_step,
                start_step,
                batches_per_epoch,
                params,
                ..
            } => {
                self.last = Some(now);
                format!(
                    "worker {rank}: training from step {start_step}{}, {batches_per_epoch} \
                     batches per epoch{}",
                    match *last_step {
                        0 | u64::MAX => String::new(),
                        l => format!(" to step {l}"),
                    },
                    match params {
                        0 => String::new(),
                        p => format!(", {p} parameters"),
                    }
                )
            }
            Report::Step {
                rank,
                step,
                epoch,
                loss,
                tokens,
                ..
            } => {
                self.units += tokens;
                self.steps += 1;
                let since = *self.last.get_or_insert(now);
                let el = now.saturating_duration_since(since);
                if el < Self::EVERY {
                    return None;
                }
                let line = format!(
                    "worker {rank}: step {step} (epoch {}), loss {loss:.4}, {:.0} {unit}/s and \
                     {:.2} updates/s over the last {:.0} s",
                    epoch + 1,
                    self.units as f64 / el.as_secs_f64(),
                    self.steps as f64 / el.as_secs_f64(),
                    el.as_secs_f64()
                );
                (self.last, self.units, self.steps) = (Some(now), 0, 0);
                line
            }
            r @ (Report::Membership { .. } | Report::Recovered { .. }) => {
                r.membership_text().unwrap_or_default()
            }
            Report::EpochEnd { epoch, valid_loss } => {
                format!("epoch {} done: validation loss {valid_loss:.4}", epoch + 1)
            }
            Report::Scores { epoch, scores } => format!(
                "epoch {} held-out scores: {}",
                epoch + 1,
                scores
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.4}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Report::Checkpoint { step, path } => {
                format!("checkpoint at step {step}: {}", path.display())
            }
            Report::Done {
                rank,
                steps,
                seconds,
                tokens_per_s,
                checkpoint,
                ..
            } => format!(
                "worker {rank}: done, {steps} updates in {seconds:.1} s ({tokens_per_s:.0} \
                 {unit}/s); its model at {}",
                checkpoint.display()
            ),
        })
    }
}

/// This process's index within its role, from [`ENV_INDEX`] or what a scheduler sets.
pub(crate) fn role_index() -> Result<Option<u32>> {
    for name in [ENV_INDEX, "JOB_COMPLETION_INDEX", "VC_TASK_INDEX"] {
        if let Ok(v) = std::env::var(name) {
            return v
                .trim()
                .parse::<u32>()
                .map(Some)
                .map_err(|_| Error::Cluster(format!("{name} is '{v}', not a process index")));
        }
    }
    Ok(None)
}

/// Serves as the coordinator of a job whose processes a scheduler starts: prepares the
/// job directory ([`JobKind::prepare`]), serves on `listen` (port 0: one the system picks; the address bound is
/// printed on stderr as `coordinator listening on ADDR`), and returns when every process
/// has left in order (an error if one fails or the job does not assemble within
/// `rendezvous`).
pub fn run_coordinator<K: JobKind>(
    config: &Path,
    run_dir: &Path,
    listen: SocketAddr,
    token: &str,
    rendezvous: Duration,
) -> std::result::Result<(), K::Error> {
    let d = K::prepare(config, run_dir)?;
    let kind = K::KIND;
    let world = d.workers + d.separate_servers();
    let coord = Coordinator::start(
        listen,
        CoordinatorConfig {
            token: token.into(),
            world: world as u32,
            heartbeat_timeout: Duration::from_secs_f64(d.heartbeat_timeout_s),
            rendezvous_timeout: rendezvous,
            tls: crate::tls::for_job(&d)?.map(|t| t.control),
        },
    )?;
    // The address bound (with port 0, the port the system picked), for whoever started
    // this process and waits to learn it.
    eprintln!("coordinator listening on {}", coord.addr);
    eprintln!(
        "coordinator of a {kind} job on {}: expecting {} workers and {} separate shards",
        coord.addr,
        d.workers,
        d.separate_servers()
    );
    coord.wait_finished()?;
    eprintln!("every process of the job has finished");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_times_are_utc_calendar_dates() {
        // Python's datetime.fromtimestamp(t, UTC) for each.
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(utc(1_796_128_496), "2026-12-01 12:34:56Z");
        assert_eq!(utc(4_107_542_399), "2100-02-28 23:59:59Z");
    }

    #[test]
    fn updates_are_logged_every_ten_seconds_with_their_rate() {
        let t0 = Instant::now();
        let mut log = StepLog {
            unit: "rows",
            last: None,
            units: 0,
            steps: 0,
        };
        let started = Report::Started {
            rank: 1,
            total_steps: 0,
            last_step: 40,
            time_limit_s: None,
            start_step: 0,
            batches_per_epoch: 4,
            params: 0,
        };
        let line = log.line(&started, t0).unwrap();
        assert_eq!(
            line,
            "worker 1: training from step 0 to step 40, 4 batches per epoch"
        );
        let step = |step| Report::Step {
            rank: 1,
            step,
            epoch: 0,
            loss: 0.5,
            grad_norm: 0.0,
            lr: 0.0,
            tokens: 500,
        };
        assert_eq!(log.line(&step(1), t0 + Duration::from_secs(4)), None);
        let line = log.line(&step(2), t0 + Duration::from_secs(10)).unwrap();
        assert!(
            line.contains("step 2 (epoch 1)") && line.contains("100 rows/s and 0.20 updates/s"),
            "{line}"
        );
        // The next interval counts from there.
        assert_eq!(log.line(&step(3), t0 + Duration::from_secs(15)), None);
    }
}
