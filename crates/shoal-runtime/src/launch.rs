//! The launcher of the embedded local cluster: starts a job's coordinator, worker and
//! parameter-server processes on this machine, relays the [`Report`]s workers print
//! (one JSON object per stdout line), and stops the whole job as soon as one process
//! fails, naming it with the end of its log. It knows no workload: the job's files in
//! `RUN/job` (its `kind` first) are the workload's business, and each process is this
//! same program run as `shoal role`, its part taken from the `ENV_*` variables, so a
//! cluster scheduler can start the processes the same way.

use crate::dist::{DistMode, DistSection, Placement};
use crate::exchange::PhaseTimes;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use shoal_control::{Coordinator, CoordinatorConfig};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `http://host:port` of the coordinator.
pub const ENV_COORDINATOR: &str = "SHOAL_COORDINATOR";
/// The job's shared secret.
pub const ENV_TOKEN: &str = "SHOAL_JOB_TOKEN";
/// `worker`, `ps` or `worker+ps` (a worker hosting a shard: colocated placement).
pub const ENV_ROLE: &str = "SHOAL_ROLE";
/// The job directory (configuration and tokenizers).
pub const ENV_JOB: &str = "SHOAL_JOB_DIR";
/// The run directory (checkpoints).
pub const ENV_RUN: &str = "SHOAL_RUN_DIR";
/// A checkpoint to resume from.
pub const ENV_RESUME: &str = "SHOAL_RESUME";
/// The address this process's data plane listens on and advertises (default 127.0.0.1).
pub const ENV_HOST: &str = "SHOAL_HOST";
/// This process's index within its role; Kubernetes' indexed Jobs set
/// `JOB_COMPLETION_INDEX` and Volcano's env plugin `VC_TASK_INDEX`, read when this is unset.
pub const ENV_INDEX: &str = "SHOAL_INDEX";
/// The number of workers the job has now (an elastic job's launcher sets it on every
/// (re)start; default `dist.workers`).
pub const ENV_WORKERS: &str = "SHOAL_WORKERS";
/// How many times the job has restarted (0 on its first start), as TorchElastic's
/// `TORCHELASTIC_RESTART_COUNT`.
pub const ENV_RESTART: &str = "SHOAL_RESTART_COUNT";
/// How long to wait for the coordinator to be reachable, in seconds (default 60).
pub const ENV_CONNECT_TIMEOUT: &str = "SHOAL_CONNECT_TIMEOUT_S";

/// What a worker tells the launcher, one JSON object per stdout line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Report {
    Started {
        rank: usize,
        /// The steps the learning-rate schedule spans (0: none).
        total_steps: u64,
        /// The step the run will stop at (its step limit applied; 0: not known).
        #[serde(default)]
        last_step: u64,
        /// What is left of the run's time limit, in seconds.
        #[serde(default)]
        time_limit_s: Option<f64>,
        start_step: u64,
        batches_per_epoch: usize,
        params: usize,
    },
    Step {
        rank: usize,
        step: u64,
        epoch: u64,
        loss: f32,
        grad_norm: f32,
        lr: f32,
        tokens: usize,
    },
    EpochEnd {
        epoch: u64,
        valid_loss: f32,
    },
    Checkpoint {
        step: u64,
        path: PathBuf,
    },
    /// Worker 0's held-out scores after an epoch, by name (a CTR job: `auc`, `logloss`,
    /// and `planted_auc` when the planted model is known).
    Scores {
        epoch: u64,
        scores: BTreeMap<String, f64>,
    },
    /// A change of an elastic job's members, said by the launcher: a process failed
    /// and the job restarted without it, or replacements joined at a checkpoint.
    Membership {
        /// `failed` or `joined`.
        change: String,
        /// The process that failed (its name, pid and how it ended), or who joined.
        who: String,
        /// Seconds since the job started.
        at_s: f64,
        workers_before: usize,
        workers_after: usize,
        /// The step of the checkpoint the job goes on from.
        from_step: u64,
        /// Updates made after that checkpoint, made again.
        steps_lost: u64,
        /// The restarts so far, this one counted.
        restart: u32,
    },
    /// The first update after a membership change, said by the launcher: `seconds`
    /// from the moment it saw the failure (or decided the change) to it.
    Recovered {
        step: u64,
        seconds: f64,
    },
    Done {
        rank: usize,
        steps: u64,
        seconds: f64,
        tokens_per_s: f64,
        timing: PhaseTimes,
        checkpoint: PathBuf,
    },
}

impl Report {
    /// A membership change or recovery in words (None for the other reports): what
    /// the progress displays print.
    pub fn membership_text(&self) -> Option<String> {
        Some(match self {
            Report::Membership {
                change,
                who,
                at_s,
                workers_before,
                workers_after,
                from_step,
                steps_lost,
                restart,
            } => format!(
                "membership at {at_s:.1} s, {change}: {who}; restart {restart}: {workers_before} \
                 -> {workers_after} workers from the checkpoint of step {from_step} \
                 (updates done again: {steps_lost})"
            ),
            Report::Recovered { step, seconds } => {
                format!("recovered: update {step} {seconds:.1} s after the change")
            }
            _ => return None,
        })
    }
}

/// The outcome of a distributed run.
#[derive(Debug, Clone)]
pub struct ClusterSummary {
    pub steps: u64,
    pub seconds: f64,
    /// Examples (target tokens, rows) per second of the whole job (the sum over workers).
    pub tokens_per_s: f64,
    /// Each worker's examples per second.
    pub worker_tokens_per_s: Vec<f64>,
    /// Each worker's time per phase, summed over its updates.
    pub timing: Vec<PhaseTimes>,
    pub last_checkpoint: PathBuf,
}

/// How the launcher starts a process of the job: this program with these arguments
/// (it must call [`crate::role::run`] for the job's kind).
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub exe: PathBuf,
    pub args: Vec<String>,
    /// Continue from this checkpoint (its configuration, adjusted, is `cfg`).
    pub resume: Option<PathBuf>,
    /// The job's timeline file, which the workers append to: the launcher makes it,
    /// marks each membership change in it and closes it when the job ends.
    pub timeline: Option<PathBuf>,
}

/// Writes the job's kind (`RUN/job/kind`): what `shoal role` reads first.
pub fn write_kind(job: &Path, kind: &str) -> Result<()> {
    let p = job.join("kind");
    std::fs::write(&p, kind).map_err(crate::error::io_err(&p))
}

/// A fresh job token: 128 random bits from the OS (it also names the shared-memory
/// rings).
pub fn new_token() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(crate::io_err("/dev/urandom"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Compute threads for each of `n` processes: `threads`, or with 0 this machine's cores
/// shared out (at least one each).
fn threads_each(threads: usize, n: usize) -> usize {
    match threads {
        0 => {
            let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
            (cores / n.max(1)).max(1)
        }
        t => t,
    }
}

struct Proc {
    name: String,
    child: Child,
    /// Where its stderr goes (None: this process's own stderr).
    log: Option<PathBuf>,
    /// A worker (else a parameter-server shard).
    worker: bool,
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join("\n    ")
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    }
}

fn kill_all(procs: &mut [Proc]) {
    for p in procs.iter_mut() {
        let _ = p.child.kill();
    }
    for p in procs.iter_mut() {
        let _ = p.child.wait();
    }
}

/// Points a child at the job's TLS directory, or makes sure it inherits none.
fn set_tls_env(cmd: &mut Command, tls: Option<&crate::tls::TlsDir>) {
    match tls {
        Some(t) => cmd.env(crate::tls::ENV_TLS_DIR, &t.path),
        None => cmd.env_remove(crate::tls::ENV_TLS_DIR),
    };
}

/// Starts the processes of a job whose files are already in `RUN/job` (the kind, its
/// configuration): the coordinator, `d.workers` workers and the separate shards, each
/// worker with `threads` engine threads (0: cores / workers); relays every report with
/// the workers' current rates until all have exited.
///
/// A job with `d.max_restarts` goes on after a process fails: every process stops and
/// the job starts again from its last checkpoint (the commit), without the failed
/// workers when `d.min_workers` allows (the global batch stays the same, so the
/// computation does too), and grows back to `d.workers` at its next checkpoint: the
/// replacements join there. Each change is relayed as a [`Report::Membership`], the
/// first update after it as a [`Report::Recovered`], and both are appended to
/// `RUN/membership.jsonl`.
pub fn launch_job(
    d: &DistSection,
    threads: usize,
    run_dir: &Path,
    opts: &LaunchOptions,
    mut on_report: impl FnMut(&Report, &[f64]),
) -> Result<ClusterSummary> {
    let job = run_dir.join("job");
    // A per-job CA lives in the job's folder while the job runs (one left by a killed
    // launcher is replaced).
    let at = job.join("tls");
    if d.tls && d.tls_dir.is_empty() {
        let _ = std::fs::remove_dir_all(&at);
    }
    let tls_dir = crate::tls::prepare(d, &at)?;
    if let Some(t) = &opts.timeline {
        crate::timeline::start(t)?;
    }
    let result = run_job(d, threads, run_dir, opts, tls_dir.as_ref(), &mut on_report);
    if let Some(t) = &opts.timeline {
        // Closed whatever the outcome: the workers have stopped.
        let closed = crate::timeline::finish(t);
        if result.is_ok() {
            closed?;
        }
    }
    result
}

/// [`launch_job`]'s restarts, each an [`Attempt`].
fn run_job(
    d: &DistSection,
    threads: usize,
    run_dir: &Path,
    opts: &LaunchOptions,
    tls_dir: Option<&crate::tls::TlsDir>,
    on_report: &mut impl FnMut(&Report, &[f64]),
) -> Result<ClusterSummary> {
    let began = Instant::now();
    let began_at = std::time::SystemTime::now();
    let mut world = d.workers;
    let mut restarts = 0u32;
    let mut resume = opts.resume.clone();
    let mut watch = Watch::default();
    let mut first_step = 0;
    let mut log = MembershipLog::new(run_dir);
    loop {
        let mut attempt = Attempt::start(
            d,
            world,
            restarts,
            threads,
            run_dir,
            opts,
            resume.as_deref(),
            tls_dir,
        )?;
        // A smaller job than configured grows back at its first checkpoint.
        let grow = world < d.workers;
        let ended = supervise(&mut attempt, world, grow, &mut watch, &mut |r, rates| {
            if let (Report::Step { rank: 0, step, .. }, Some(since)) = (r, log.pending) {
                let rec = Report::Recovered {
                    step: *step,
                    seconds: since.elapsed().as_secs_f64(),
                };
                log.recovered(&rec);
                on_report(&rec, rates);
            }
            on_report(r, rates)
        });
        let failure = match ended {
            Ok(Ended::Finished(mut summary)) => {
                // The whole job's, across its restarts.
                if restarts > 0 {
                    summary.steps = watch.last_step.saturating_sub(first_step);
                    summary.seconds = began.elapsed().as_secs_f64();
                }
                return Ok(summary);
            }
            Ok(Ended::Commit) => None,
            Ok(Ended::Failed(f)) => Some(f),
            Err(e) => {
                kill_all(&mut attempt.procs);
                return Err(e);
            }
        };
        let at_step = watch.last_step;
        if restarts == 0 {
            first_step = watch.start_step;
        }
        kill_all(&mut attempt.procs);
        // The newest complete checkpoint: the one worker 0 reported, or a later one it
        // saved but died before reporting.
        if let Some((step, path)) = newest_checkpoint(run_dir, began_at) {
            if watch.commit.as_ref().is_none_or(|(s, _)| step > *s) && step > watch.start_step {
                watch.commit = Some((step, path));
            }
        }
        let (from_step, from) = match &watch.commit {
            Some((step, path)) => (*step, Some(path.clone())),
            None => (watch.start_step, opts.resume.clone()),
        };
        let before = world;
        let since = failure.as_ref().map_or_else(Instant::now, |f| f.seen);
        let (change, who) = match failure {
            None => {
                world = d.workers;
                (
                    "joined",
                    format!("{} replacement worker(s)", d.workers - before),
                )
            }
            Some(f) => {
                if restarts >= d.max_restarts {
                    let mut e = f.error;
                    if d.max_restarts > 0 {
                        e = Error::Cluster(format!(
                            "{}\n  the job had restarted {restarts} time(s), \
                             dist.max_restarts = {}",
                            cluster_text(e),
                            d.max_restarts
                        ));
                    }
                    return Err(e);
                }
                world = before
                    .saturating_sub(f.workers_failed)
                    .max(d.fewest_workers());
                ("failed", f.who)
            }
        };
        restarts += 1;
        let m = Report::Membership {
            change: change.into(),
            who,
            at_s: began.elapsed().as_secs_f64(),
            workers_before: before,
            workers_after: world,
            from_step,
            steps_lost: at_step.saturating_sub(from_step),
            restart: restarts,
        };
        log.changed(&m, since);
        if let (Some(t), Some(text)) = (&opts.timeline, m.membership_text()) {
            // A timeline that cannot be marked loses a mark, not the job.
            let _ = crate::timeline::mark(t, &text);
        }
        on_report(&m, &[]);
        resume = from;
        watch.start_step = from_step;
        watch.last_step = from_step;
    }
}

/// What the launcher follows of a job across its restarts: worker 0's last update and
/// the last checkpoint it reported (the commit a restart goes on from).
#[derive(Debug, Default)]
struct Watch {
    start_step: u64,
    last_step: u64,
    /// The step the run stops at (0: not known).
    end_step: u64,
    commit: Option<(u64, PathBuf)>,
}

/// How one start of a job's processes ended.
enum Ended {
    /// Every process finished.
    Finished(ClusterSummary),
    /// A job smaller than configured reached a checkpoint: the replacements join there.
    Commit,
    /// A process failed.
    Failed(Failure),
}

/// A failed process (or the coordinator's word that one is): the error naming it, and
/// how many workers are gone.
struct Failure {
    error: Error,
    who: String,
    workers_failed: usize,
    /// When the launcher saw it.
    seen: Instant,
}

/// The run's newest complete checkpoint (what `RUN/latest` names, or the newest
/// complete one) and its step, from its name, if this job wrote it (after `since`).
fn newest_checkpoint(run_dir: &Path, since: std::time::SystemTime) -> Option<(u64, PathBuf)> {
    let dir = crate::store::resolve(run_dir).ok()?;
    if dir.metadata().and_then(|m| m.modified()).ok()? < since {
        return None;
    }
    Some((crate::store::step_of(&dir)?, dir))
}

/// The membership changes of a job, appended to `RUN/membership.jsonl` as they happen
/// (a run's record of who failed and joined, and how long each recovery took).
struct MembershipLog {
    path: PathBuf,
    /// The last change not yet followed by an update.
    pending: Option<Instant>,
}

impl MembershipLog {
    fn new(run_dir: &Path) -> Self {
        Self {
            path: run_dir.join("membership.jsonl"),
            pending: None,
        }
    }

    /// A change, whose recovery counts from `since` (when the failure was seen).
    fn changed(&mut self, r: &Report, since: Instant) {
        self.pending = Some(since);
        self.append(r);
    }

    fn recovered(&mut self, r: &Report) {
        self.pending = None;
        self.append(r);
    }

    /// Appends one line (a log that cannot be written is said once on stderr; the job
    /// goes on).
    fn append(&self, r: &Report) {
        use std::io::Write;
        let line = serde_json::to_string(r).unwrap_or_default();
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            eprintln!(
                "{}: {e} (the membership change is not recorded)",
                self.path.display()
            );
        }
    }
}

/// The text of a cluster error without its prefix (to add to it).
fn cluster_text(e: Error) -> String {
    match e {
        Error::Cluster(m) => m,
        e => e.to_string(),
    }
}

/// One start of a job's processes: its coordinator, processes and their reports.
struct Attempt {
    coord: Coordinator,
    procs: Vec<Proc>,
    rx: mpsc::Receiver<(usize, String)>,
}

impl Attempt {
    /// Starts the coordinator and the processes of a job of `world` workers (and the
    /// separate shards), the `restart`th time, from `resume` when given.
    #[allow(clippy::too_many_arguments)]
    fn start(
        d: &DistSection,
        world: usize,
        restart: u32,
        threads: usize,
        run_dir: &Path,
        opts: &LaunchOptions,
        resume: Option<&Path>,
        tls_dir: Option<&crate::tls::TlsDir>,
    ) -> Result<Attempt> {
        let job = run_dir.join("job");
        // A fresh token each time: it also names the shared-memory rings, so a restart
        // never meets a ring of the processes before it.
        let token = new_token()?;
        let servers = d.separate_servers();
        let coord = Coordinator::start(
            "127.0.0.1:0".parse().expect("literal address"),
            CoordinatorConfig {
                token: token.clone(),
                world: (world + servers) as u32,
                heartbeat_timeout: Duration::from_secs_f64(d.heartbeat_timeout_s),
                rendezvous_timeout: Duration::from_secs(180),
                tls: tls_dir.map(|t| t.tls.control.clone()),
            },
        )?;
        let threads = threads_each(threads, world);
        let mut roles: Vec<(String, String, usize)> = Vec::new();
        for i in 0..world {
            let hosts =
                d.mode != DistMode::Allreduce && d.placement == Placement::Colocated && i < d.ps;
            let role = if hosts { "worker+ps" } else { "worker" };
            roles.push((role.into(), format!("worker-{i}"), threads));
        }
        for i in 0..servers {
            roles.push(("ps".into(), format!("ps-{i}"), 1));
        }
        let (tx, rx) = mpsc::channel::<(usize, String)>();
        let mut procs: Vec<Proc> = Vec::new();
        for (idx, (role, name, threads)) in roles.iter().enumerate() {
            let log = job.join("logs").join(format!("{name}.log"));
            // A restart appends: the log of a process that failed is kept.
            let err = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(restart > 0)
                .truncate(restart == 0)
                .open(&log)
                .and_then(|mut f| {
                    use std::io::Write;
                    if restart > 0 {
                        writeln!(f, "--- restart {restart}: a job of {world} workers ---")?;
                    }
                    Ok(f)
                })
                .map_err(crate::error::io_err(&log))?;
            let mut cmd = Command::new(&opts.exe);
            cmd.args(&opts.args)
                .env(ENV_COORDINATOR, format!("http://{}", coord.addr))
                .env(ENV_TOKEN, &token)
                .env(ENV_ROLE, role)
                .env(ENV_JOB, &job)
                .env(ENV_RUN, run_dir)
                .env(ENV_WORKERS, world.to_string())
                .env(ENV_RESTART, restart.to_string())
                .env("RAYON_NUM_THREADS", threads.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::from(err));
            set_tls_env(&mut cmd, tls_dir);
            match resume {
                Some(r) => cmd.env(ENV_RESUME, r),
                None => cmd.env_remove(ENV_RESUME),
            };
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    kill_all(&mut procs);
                    return Err(Error::Cluster(format!(
                        "starting {name} ({}): {e}",
                        opts.exe.display()
                    )));
                }
            };
            if let Some(out) = child.stdout.take() {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                        if tx.send((idx, line)).is_err() {
                            break;
                        }
                    }
                });
            }
            procs.push(Proc {
                name: name.clone(),
                child,
                log: Some(log),
                worker: role.starts_with("worker"),
            });
        }
        Ok(Attempt { coord, procs, rx })
    }
}

/// A job of copies of one command (`shoal run -n N -- CMD`): see [`run_command`].
#[derive(Debug, Clone, Copy)]
pub struct CommandJob<'a> {
    /// How many processes.
    pub n: usize,
    /// The first this many host the parameter-server shards of a script's sparse
    /// tables (`SHOAL_PS_SHARDS`; None: not set).
    pub shards: Option<usize>,
    /// The program and its arguments.
    pub command: &'a [String],
    pub transport: crate::dist::DataPlane,
    /// Compute threads each (`OMP_NUM_THREADS`; 0: cores / n).
    pub threads: usize,
    pub heartbeat_timeout: Duration,
    pub tls_dir: Option<&'a crate::tls::TlsDir>,
    /// Starts of all the processes again after a failure (torchrun's `--max-restarts`).
    pub max_restarts: u32,
}

/// Runs `job.n` copies of a command on this host as the processes of one job (`shoal
/// run -n N -- CMD`): a coordinator for them, and in each process's environment its
/// rank and the job (`SHOAL_COORDINATOR`, `SHOAL_JOB_TOKEN`, `SHOAL_INDEX`,
/// `SHOAL_TRANSPORT`, and torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
/// `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`; `SHOAL_PS_SHARDS` when
/// `job.shards` is given), `job.threads` compute threads each. Their output is this
/// process's. Returns when all have exited; the first that fails (or that the
/// coordinator declares failed) stops the others and is named in the error.
///
/// With `job.max_restarts` (torchrun's `--max-restarts`), a failed job starts all its
/// processes again, up to that many times, with `SHOAL_RESTART_COUNT` and torchrun's
/// `TORCHELASTIC_RESTART_COUNT` / `TORCHELASTIC_MAX_RESTARTS` set: the script resumes
/// from its own checkpoint.
pub fn run_command(job: &CommandJob) -> Result<()> {
    if job.command.is_empty() {
        return Err(Error::Cluster("no command to run".into()));
    }
    if job.n == 0 {
        return Err(Error::Cluster("a job needs at least one process".into()));
    }
    let (n, max_restarts) = (job.n, job.max_restarts);
    let mut restart = 0;
    loop {
        let Some(e) = run_once(job, restart)? else {
            return Ok(());
        };
        if restart >= max_restarts {
            return Err(match max_restarts {
                0 => e,
                m => Error::Cluster(format!(
                    "{}\n  the job had restarted {restart} time(s), --max-restarts {m}",
                    cluster_text(e)
                )),
            });
        }
        restart += 1;
        eprintln!(
            "shoal run: {}\nshoal run: restart {restart} of {max_restarts}: starting all {n} \
             processes again (SHOAL_RESTART_COUNT={restart})",
            cluster_text(e)
        );
    }
}

/// One start of [`run_command`]'s processes, the `restart`th: Ok(None) when all
/// succeeded, Ok(Some(error)) when one failed (and the others were stopped), Err when
/// the job could not be started.
fn run_once(job: &CommandJob, restart: u32) -> Result<Option<Error>> {
    let CommandJob {
        n,
        shards,
        command,
        transport,
        threads,
        heartbeat_timeout,
        tls_dir,
        max_restarts,
    } = *job;
    let Some((program, args)) = command.split_first() else {
        return Err(Error::Cluster("no command to run".into()));
    };
    let token = new_token()?;
    let coord = Coordinator::start(
        "127.0.0.1:0".parse().expect("literal address"),
        CoordinatorConfig {
            token: token.clone(),
            world: n as u32,
            heartbeat_timeout,
            rendezvous_timeout: Duration::from_secs(180),
            tls: tls_dir.map(|t| t.tls.control.clone()),
        },
    )?;
    // A free port for a script's own torch.distributed store, as torchrun gives one.
    let master_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Cluster(format!("finding a free port for MASTER_PORT: {e}")))?;
    let threads = threads_each(threads, n);
    let plane = match transport {
        crate::dist::DataPlane::Shm => "shm",
        crate::dist::DataPlane::Tcp => "tcp",
    };
    let mut procs: Vec<Proc> = Vec::new();
    for i in 0..n {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env(ENV_COORDINATOR, format!("http://{}", coord.addr))
            .env(ENV_TOKEN, &token)
            .env(ENV_ROLE, "worker")
            .env(ENV_INDEX, i.to_string())
            .env(crate::group::ENV_TRANSPORT, plane)
            .env("RANK", i.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", i.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", master_port.to_string())
            .env("OMP_NUM_THREADS", threads.to_string())
            .env("RAYON_NUM_THREADS", threads.to_string())
            .env(ENV_RESTART, restart.to_string())
            .env("TORCHELASTIC_RESTART_COUNT", restart.to_string())
            .env("TORCHELASTIC_MAX_RESTARTS", max_restarts.to_string())
            .stdin(Stdio::null());
        set_tls_env(&mut cmd, tls_dir);
        if let Some(m) = shards {
            cmd.env(crate::group::ENV_SHARDS, m.to_string());
        }
        match cmd.spawn() {
            Ok(child) => procs.push(Proc {
                name: format!("rank {i}"),
                child,
                log: None,
                worker: true,
            }),
            Err(e) => {
                kill_all(&mut procs);
                return Err(Error::Cluster(format!("starting {program}: {e}")));
            }
        }
    }
    let mut exited = vec![false; n];
    let result = loop {
        match poll_exits(&mut procs, &mut exited) {
            Err(e) => break Err(e),
            Ok(Some(f)) => break Ok(Some(f.error)),
            Ok(None) => {}
        }
        if let Some((rank, why)) = coord.failures().into_iter().next() {
            break Ok(Some(Error::Cluster(format!(
                "the coordinator declared the process of control rank {rank} failed: {why}"
            ))));
        }
        if exited.iter().all(|&e| e) {
            break Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !matches!(result, Ok(None)) {
        kill_all(&mut procs);
    }
    result
}

/// One worker's examples per second as its reports come in: counted from its start
/// (the `Started` report), so the first reading is the first update's own rate, not
/// its examples over the moment between two lines.
#[derive(Debug, Clone, Copy, Default)]
struct RateMeter {
    since: Option<Instant>,
    count: usize,
}

impl RateMeter {
    fn start(&mut self, at: Instant) {
        *self = RateMeter {
            since: Some(at),
            count: 0,
        };
    }

    /// Adds `n` examples done by `at`; returns the rate so far (0 until one interval
    /// is known: a worker whose start was not seen starts its clock at its first report).
    fn add(&mut self, at: Instant, n: usize) -> f64 {
        let Some(since) = self.since else {
            self.start(at);
            return 0.0;
        };
        self.count += n;
        let el = at.saturating_duration_since(since).as_secs_f64();
        if el > 0.0 {
            self.count as f64 / el
        } else {
            0.0
        }
    }
}

/// Relays reports until every process has exited, a process fails (or the
/// coordinator declares one failed), or, with `grow`, worker 0 reports a checkpoint.
fn supervise(
    at: &mut Attempt,
    workers: usize,
    grow: bool,
    watch: &mut Watch,
    on_report: &mut impl FnMut(&Report, &[f64]),
) -> Result<Ended> {
    let start = Instant::now();
    let mut meters = vec![RateMeter::default(); workers];
    let mut rates = vec![0.0f64; workers];
    let mut done: Vec<Option<Report>> = vec![None; workers];
    let mut exited = vec![false; at.procs.len()];
    loop {
        match at.rx.recv_timeout(Duration::from_millis(100)) {
            Ok((idx, line)) => {
                let Ok(r) = serde_json::from_str::<Report>(&line) else {
                    // Anything else a process prints goes to our stderr.
                    eprintln!("[{}] {line}", at.procs[idx].name);
                    continue;
                };
                let mut commit = false;
                match &r {
                    Report::Started {
                        rank,
                        start_step,
                        last_step,
                        ..
                    } if *rank < workers => {
                        meters[*rank].start(Instant::now());
                        if *rank == 0 {
                            watch.end_step = *last_step;
                        }
                        if *rank == 0 && watch.commit.is_none() {
                            watch.start_step = *start_step;
                            watch.last_step = *start_step;
                        }
                    }
                    Report::Step {
                        rank,
                        step,
                        tokens: t,
                        ..
                    } if *rank < workers => {
                        rates[*rank] = meters[*rank].add(Instant::now(), *t);
                        if *rank == 0 {
                            watch.last_step = *step;
                        }
                    }
                    Report::Checkpoint { step, path } => {
                        // Not at the run's last step: the job is about to end anyway.
                        let last = watch.end_step > 0 && *step >= watch.end_step;
                        commit = grow && *step > watch.start_step && !last;
                        watch.commit = Some((*step, path.clone()));
                    }
                    Report::Done { rank, .. } if *rank < workers => done[*rank] = Some(r.clone()),
                    _ => {}
                }
                on_report(&r, &rates);
                if commit {
                    return Ok(Ended::Commit);
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Some(f) = poll_exits(&mut at.procs, &mut exited)? {
            return Ok(Ended::Failed(f));
        }
        if let Some((rank, why)) = at.coord.failures().into_iter().next() {
            // The coordinator knows a member by its control rank, not its process:
            // the job restarts at its size.
            return Ok(Ended::Failed(Failure {
                error: Error::Cluster(format!(
                    "the coordinator declared process {rank} failed: {why}"
                )),
                who: format!("control rank {rank} ({why})"),
                workers_failed: 0,
                seen: Instant::now(),
            }));
        }
        if exited.iter().all(|&e| e) {
            // Drain what is left of the reports.
            while let Ok((_, line)) = at.rx.try_recv() {
                if let Ok(r @ Report::Done { rank, .. }) = serde_json::from_str::<Report>(&line) {
                    if rank < workers {
                        done[rank] = Some(r);
                    }
                }
            }
            break;
        }
    }
    let mut summary = ClusterSummary {
        steps: 0,
        seconds: start.elapsed().as_secs_f64(),
        tokens_per_s: 0.0,
        worker_tokens_per_s: Vec::new(),
        timing: Vec::new(),
        last_checkpoint: PathBuf::new(),
    };
    for (rank, r) in done.into_iter().enumerate() {
        let Some(Report::Done {
            steps,
            seconds,
            tokens_per_s,
            timing,
            checkpoint,
            ..
        }) = r
        else {
            return Err(Error::Cluster(format!(
                "worker {rank} exited without reporting its end"
            )));
        };
        if rank == 0 {
            summary.steps = steps;
            summary.seconds = seconds;
            summary.last_checkpoint = checkpoint;
        }
        summary.tokens_per_s += tokens_per_s;
        summary.worker_tokens_per_s.push(tokens_per_s);
        summary.timing.push(timing);
    }
    Ok(Ended::Finished(summary))
}

/// Notes processes that exited; for a failure, waits a moment for the failures it
/// causes and names the cause first (a process killed by a signal, else the first one
/// seen) with the end of its log.
fn poll_exits(procs: &mut [Proc], exited: &mut [bool]) -> Result<Option<Failure>> {
    use std::os::unix::process::ExitStatusExt;
    let mut failed: Vec<(usize, std::process::ExitStatus)> = Vec::new();
    let mut deadline: Option<Instant> = None;
    let seen = Instant::now();
    loop {
        for (i, p) in procs.iter_mut().enumerate() {
            if exited[i] {
                continue;
            }
            match p.child.try_wait() {
                Ok(Some(st)) => {
                    exited[i] = true;
                    if !st.success() {
                        failed.push((i, st));
                        deadline.get_or_insert_with(|| Instant::now() + Duration::from_millis(500));
                    }
                }
                Ok(None) => {}
                Err(e) => return Err(Error::Cluster(format!("watching {}: {e}", p.name))),
            }
        }
        match deadline {
            Some(t) if Instant::now() < t && !exited.iter().all(|&e| e) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => break,
        }
    }
    if failed.is_empty() {
        return Ok(None);
    }
    failed.sort_by_key(|(_, st)| st.signal().is_none());
    // The causes: the processes killed by a signal (the others failed because they
    // lost them), else the first seen.
    let causes: Vec<usize> = match failed
        .iter()
        .filter(|(_, st)| st.signal().is_some())
        .count()
    {
        0 => vec![failed[0].0],
        n => failed[..n].iter().map(|(i, _)| *i).collect(),
    };
    let (i, st) = failed[0];
    let p = &procs[i];
    let who = causes
        .iter()
        .map(|&c| {
            let p = &procs[c];
            let st = failed.iter().find(|(j, _)| *j == c).map(|(_, s)| *s);
            format!(
                "{} (pid {}) {}",
                p.name,
                p.child.id(),
                st.map_or_else(|| "ended".into(), describe)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let workers_failed = causes.iter().filter(|&&c| procs[c].worker).count();
    let mut msg = format!("{} (pid {}) {}", p.name, p.child.id(), describe(st));
    if let Some(log) = &p.log {
        let tail = log_tail(log);
        msg.push_str(&format!(
            "; its log {}{}",
            log.display(),
            if tail.is_empty() {
                " is empty".to_string()
            } else {
                format!(" ends:\n    {tail}")
            }
        ));
    }
    if failed.len() > 1 {
        let then: Vec<String> = failed[1..]
            .iter()
            .map(|(j, s)| format!("{} {}", procs[*j].name, describe(*s)))
            .collect();
        msg.push_str(&format!("\n  then: {}", then.join("; ")));
    }
    Ok(Some(Failure {
        error: Error::Cluster(msg),
        who,
        workers_failed,
        seen,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_rate_is_the_first_updates_own() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut m = RateMeter::default();
        m.start(t0);
        // 4,000 tokens in the first 0.5 s: 8,000/s (the old reading divided by 1 ms).
        assert_eq!(m.add(t0 + ms(500), 4_000), 8_000.0);
        assert_eq!(m.add(t0 + ms(1_000), 4_000), 8_000.0);
        // No start seen: the first report starts the clock and counts nothing.
        let mut m = RateMeter::default();
        assert_eq!(m.add(t0, 4_000), 0.0);
        assert_eq!(m.add(t0 + ms(250), 1_000), 4_000.0);
    }
}
