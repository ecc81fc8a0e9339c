//! Distributed NMT training as one job: the launcher starts the coordinator and the
//! worker and parameter-server processes on this machine (the embedded local cluster),
//! relays their progress, and stops the whole job as soon as one process fails; each
//! process takes its role from the environment, so a cluster scheduler can start the
//! same binary the same way.
//!
//! A job directory (`RUN/job`) holds what every process needs: the configuration and
//! the tokenizers. Workers print one JSON [`Report`] per line on stdout for the
//! launcher; their stderr goes to `RUN/job/logs/<role>-<i>.log`.

use crate::checkpoint;
use crate::config::{DataPlane, DistMode, DistSection, NmtTrainConfig, Placement};
use crate::ctr::{CtrEvent, CtrTrainConfig, CtrTrainer};
use crate::nmt::{Event, Exchange, NmtTrainer, PhaseTimes, StepStats, Tokenizers};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use shoal_comm::ps::{shard_range, PsClient, PsMode, PsServer, ShardConfig};
use shoal_comm::shm::ShmTransport;
use shoal_comm::tcp::{TcpOptions, TcpTransport};
use shoal_comm::{Communicator, Transport};
use shoal_control::{ControlClient, Coordinator, CoordinatorConfig, Joining};
use shoal_data::ctr::BadRows;
use shoal_data::SubwordTokenizer;
use shoal_model::ctr::{CtrConfig, CtrModel};
use shoal_model::{Cpu, FlatLayout};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
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
/// How long to wait for the coordinator to be reachable, in seconds (default 60).
pub const ENV_CONNECT_TIMEOUT: &str = "SHOAL_CONNECT_TIMEOUT_S";

/// What a worker tells the launcher, one JSON object per stdout line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Report {
    Started {
        rank: usize,
        total_steps: u64,
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
    /// A CTR worker 0's held-out scores after an epoch.
    CtrEval {
        epoch: u64,
        auc: f64,
        logloss: f64,
        planted_auc: Option<f64>,
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

/// The outcome of a distributed run.
#[derive(Debug, Clone)]
pub struct ClusterSummary {
    pub steps: u64,
    pub seconds: f64,
    /// Target tokens per second of the whole job (the sum over workers).
    pub tokens_per_s: f64,
    /// Each worker's target tokens per second.
    pub worker_tokens_per_s: Vec<f64>,
    /// Each worker's time per phase, summed over its updates.
    pub timing: Vec<PhaseTimes>,
    pub last_checkpoint: PathBuf,
}

/// How the launcher starts a process of the job: this program with these arguments
/// (it must call [`run_role`]).
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub exe: PathBuf,
    pub args: Vec<String>,
    /// Continue from this checkpoint (its configuration, adjusted, is `cfg`).
    pub resume: Option<PathBuf>,
}

fn job_files(job: &Path) -> [PathBuf; 3] {
    [
        job.join("config.toml"),
        job.join("src_tokenizer.json"),
        job.join("tgt_tokenizer.json"),
    ]
}

fn write_job(job: &Path, cfg: &NmtTrainConfig, tok: &Tokenizers) -> Result<()> {
    std::fs::create_dir_all(job.join("logs")).map_err(crate::error::io_err(job))?;
    write_kind(job, "nmt")?;
    let [c, s, t] = job_files(job);
    for (path, text) in [
        (c, cfg.to_toml()),
        (s, tok.src.to_json()?),
        (t, tok.tgt.to_json()?),
    ] {
        std::fs::write(&path, text).map_err(crate::error::io_err(&path))?;
    }
    Ok(())
}

fn write_kind(job: &Path, kind: &str) -> Result<()> {
    let p = job.join("kind");
    std::fs::write(&p, kind).map_err(crate::error::io_err(&p))
}

/// A CTR job: its configuration and where worker 0 saves the model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CtrJob {
    pub cfg: CtrTrainConfig,
    pub out: PathBuf,
}

/// Writes a CTR job's files into `RUN/job`.
pub fn write_ctr_job(run_dir: &Path, j: &CtrJob) -> Result<()> {
    let job = run_dir.join("job");
    std::fs::create_dir_all(job.join("logs")).map_err(crate::error::io_err(&job))?;
    write_kind(&job, "ctr")?;
    let p = job.join("ctr.json");
    let text = serde_json::to_string_pretty(j).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(&p, text).map_err(crate::error::io_err(&p))
}

fn read_ctr_job(job: &Path) -> Result<CtrJob> {
    let p = job.join("ctr.json");
    let text = std::fs::read_to_string(&p).map_err(crate::error::io_err(&p))?;
    serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", p.display())))
}

/// The dense length and row width of a CTR job's model (fields from the data header).
fn ctr_shape(cfg: &CtrTrainConfig) -> Result<(usize, usize)> {
    let f = std::fs::File::open(&cfg.data).map_err(crate::error::io_err(&cfg.data))?;
    let mut header = String::new();
    BufReader::new(f)
        .read_line(&mut header)
        .map_err(crate::error::io_err(&cfg.data))?;
    let fields = if header.contains(',') {
        shoal_data::ctr::Schema::from_header(&header).fields.len()
    } else {
        // libffm/libsvm: the field count comes from the rows.
        shoal_data::ctr::read_click_log(&cfg.data, BadRows::Skip)?
            .0
            .fields
    };
    let m = CtrModel::new(CtrConfig {
        kind: cfg.kind,
        fields,
        dim: cfg.dim,
        hidden: cfg.hidden.clone(),
    })?;
    Ok((m.dense_len(), m.cfg.row_width()))
}

/// What a process of a job trains.
enum Job {
    Nmt(Box<NmtTrainConfig>, Box<Tokenizers>),
    Ctr(Box<CtrJob>),
}

fn read_job(job: &Path) -> Result<(NmtTrainConfig, Tokenizers)> {
    let [c, s, t] = job_files(job);
    let cfg = NmtTrainConfig::load(Some(&c), &[])?;
    let read = |p: &Path| std::fs::read_to_string(p).map_err(crate::error::io_err(p));
    let tok = Tokenizers {
        src: SubwordTokenizer::from_json(&read(&s)?)?,
        tgt: SubwordTokenizer::from_json(&read(&t)?)?,
    };
    Ok((cfg, tok))
}

/// Number of values in the model's flat parameter buffer.
fn param_count(cfg: &NmtTrainConfig, tok: &Tokenizers) -> Result<usize> {
    let model = cfg
        .model_config(tok.src.vocab_size(), tok.tgt.vocab_size())
        .init::<Cpu>(&Default::default())?;
    Ok(FlatLayout::of(&model).total)
}

/// A fresh job token (also names the shared-memory rings).
fn new_token() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", std::process::id(), t & 0xffff_ffff_ffff)
}

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
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

/// Runs a distributed job on this machine: writes the job directory, starts the
/// coordinator, `dist.workers` worker processes and the separate parameter servers,
/// and relays their progress to `on_event` (with the per-worker target tokens/s).
/// Returns when every process has finished; the first process that fails stops the
/// others and is named in the error, with the end of its log.
pub fn launch(
    cfg: &NmtTrainConfig,
    run_dir: &Path,
    tok: &Tokenizers,
    opts: &LaunchOptions,
    mut on_event: impl FnMut(&Event, &[f64]),
) -> Result<ClusterSummary> {
    write_job(&run_dir.join("job"), cfg, tok)?;
    launch_job(&cfg.dist, cfg.train.threads, run_dir, opts, |r, rates| {
        if let Some(mut e) = nmt_event(r) {
            if let Event::Step { tokens_per_s, .. } = &mut e {
                *tokens_per_s = rates.iter().sum();
            }
            on_event(&e, rates)
        }
    })
}

/// The NMT progress event of worker 0's report (tokens/s: the job's, added by the
/// caller from the rates).
fn nmt_event(r: &Report) -> Option<Event> {
    Some(match r.clone() {
        Report::Started {
            rank: 0,
            total_steps,
            start_step,
            batches_per_epoch,
            params,
        } => Event::Started {
            total_steps,
            start_step,
            batches_per_epoch,
            params,
        },
        Report::Step {
            rank: 0,
            step,
            epoch,
            loss,
            grad_norm,
            lr,
            tokens,
        } => Event::Step {
            step,
            epoch,
            stats: StepStats {
                loss,
                grad_norm,
                lr,
                tgt_tokens: tokens,
            },
            tokens_per_s: f64::NAN,
        },
        Report::EpochEnd { epoch, valid_loss } => Event::EpochEnd { epoch, valid_loss },
        Report::Checkpoint { step, path } => Event::Checkpoint { step, path },
        _ => return None,
    })
}

/// Starts the processes of a job whose files are already in `RUN/job` (the kind, its
/// configuration): the coordinator, `d.workers` workers and the separate shards, each
/// worker with `threads` engine threads (0: cores / workers); relays every report with
/// the workers' current rates until all have exited.
pub fn launch_job(
    d: &DistSection,
    threads: usize,
    run_dir: &Path,
    opts: &LaunchOptions,
    mut on_report: impl FnMut(&Report, &[f64]),
) -> Result<ClusterSummary> {
    let job = run_dir.join("job");
    let token = new_token();
    let servers = d.separate_servers();
    let world = d.workers + servers;
    let coord = Coordinator::start(
        "127.0.0.1:0".parse().expect("literal address"),
        CoordinatorConfig {
            token: token.clone(),
            world: world as u32,
            heartbeat_timeout: Duration::from_secs_f64(d.heartbeat_timeout_s),
            rendezvous_timeout: Duration::from_secs(180),
        },
    )?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = match threads {
        0 => (cores / d.workers).max(1),
        t => t,
    };
    let mut roles: Vec<(String, String, usize)> = Vec::new();
    for i in 0..d.workers {
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
        let err = std::fs::File::create(&log).map_err(crate::error::io_err(&log))?;
        let mut cmd = Command::new(&opts.exe);
        cmd.args(&opts.args)
            .env(ENV_COORDINATOR, format!("http://{}", coord.addr))
            .env(ENV_TOKEN, &token)
            .env(ENV_ROLE, role)
            .env(ENV_JOB, &job)
            .env(ENV_RUN, run_dir)
            .env("RAYON_NUM_THREADS", threads.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err));
        if let Some(r) = &opts.resume {
            cmd.env(ENV_RESUME, r);
        }
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
            log,
        });
    }
    drop(tx);
    let result = supervise(&mut procs, &coord, &rx, d.workers, &mut on_report);
    if result.is_err() {
        kill_all(&mut procs);
    }
    result
}

/// Relays reports until every process has exited; fails on the first process that
/// fails (or that the coordinator declares failed).
fn supervise(
    procs: &mut [Proc],
    coord: &Coordinator,
    rx: &mpsc::Receiver<(usize, String)>,
    workers: usize,
    on_report: &mut impl FnMut(&Report, &[f64]),
) -> Result<ClusterSummary> {
    let start = Instant::now();
    let mut tokens = vec![0usize; workers];
    let mut rates = vec![0.0f64; workers];
    let mut done: Vec<Option<Report>> = vec![None; workers];
    let mut exited = vec![false; procs.len()];
    let mut first_step: Option<Instant> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((idx, line)) => {
                let Ok(r) = serde_json::from_str::<Report>(&line) else {
                    // Anything else a process prints goes to our stderr.
                    eprintln!("[{}] {line}", procs[idx].name);
                    continue;
                };
                match &r {
                    Report::Step {
                        rank, tokens: t, ..
                    } if *rank < workers => {
                        let t0 = *first_step.get_or_insert_with(Instant::now);
                        tokens[*rank] += t;
                        let el = t0.elapsed().as_secs_f64().max(1e-3);
                        rates[*rank] = tokens[*rank] as f64 / el;
                    }
                    Report::Done { rank, .. } if *rank < workers => done[*rank] = Some(r.clone()),
                    _ => {}
                }
                on_report(&r, &rates);
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Some(e) = poll_exits(procs, &mut exited)? {
            return Err(e);
        }
        if let Some((rank, why)) = coord.failures().into_iter().next() {
            return Err(Error::Cluster(format!(
                "the coordinator declared process {rank} failed: {why}"
            )));
        }
        if exited.iter().all(|&e| e) {
            // Drain what is left of the reports.
            while let Ok((_, line)) = rx.try_recv() {
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
    Ok(summary)
}

/// Notes processes that exited; for a failure, waits a moment for the failures it
/// causes and names the cause first (a process killed by a signal, else the first one
/// seen) with the end of its log.
fn poll_exits(procs: &mut [Proc], exited: &mut [bool]) -> Result<Option<Error>> {
    use std::os::unix::process::ExitStatusExt;
    let mut failed: Vec<(usize, std::process::ExitStatus)> = Vec::new();
    let mut deadline: Option<Instant> = None;
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
    let (i, st) = failed[0];
    let p = &procs[i];
    let tail = log_tail(&p.log);
    let mut msg = format!(
        "{} (pid {}) {}; its log {}{}",
        p.name,
        p.child.id(),
        describe(st),
        p.log.display(),
        if tail.is_empty() {
            " is empty".to_string()
        } else {
            format!(" ends:\n    {tail}")
        }
    );
    if failed.len() > 1 {
        let then: Vec<String> = failed[1..]
            .iter()
            .map(|(j, s)| format!("{} {}", procs[*j].name, describe(*s)))
            .collect();
        msg.push_str(&format!("\n  then: {}", then.join("; ")));
    }
    Ok(Some(Error::Cluster(msg)))
}

fn env(name: &str) -> Result<String> {
    std::env::var(name)
        .map_err(|_| Error::Cluster(format!("environment variable {name} is not set")))
}

/// Stops this process if the control plane reports a failed member (or loses the
/// coordinator), so that no process of a broken job waits for ever.
struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(ctl: Arc<ControlClient>, me: String) -> Self {
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

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn emit(r: &Report) {
    if let Ok(line) = serde_json::to_string(r) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

fn bind(host: &str) -> Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind((host, 0))
        .map_err(|e| Error::Cluster(format!("binding a data-plane listener on {host}: {e}")))?;
    let a = l
        .local_addr()
        .map_err(|e| Error::Cluster(format!("reading the listener address: {e}")))?;
    Ok((l, a))
}

fn parse_addr(s: &str, who: &str) -> Result<SocketAddr> {
    s.parse()
        .map_err(|_| Error::Cluster(format!("{who} advertised a bad data-plane address '{s}'")))
}

/// The shard settings of a job.
pub fn shard_config(cfg: &NmtTrainConfig, token: &str) -> ShardConfig {
    let d = &cfg.dist;
    ShardConfig {
        workers: d.workers,
        mode: match d.mode {
            DistMode::PsAsync => PsMode::Async {
                max_staleness: (d.max_staleness > 0).then_some(d.max_staleness),
            },
            _ => PsMode::Sync,
        },
        optimizer: cfg.train.optimizer_config(),
        lr: cfg.train.lr as f32,
        average: true,
        sparse_dim: 0,
        token: token.into(),
        // Pulls wait while rank 0 validates or checkpoints; dead peers are found by
        // their closed connections and the heartbeat, not by this.
        timeout: Duration::from_secs(600),
        ..Default::default()
    }
}

/// This process's index within its role, from [`ENV_INDEX`] or what a scheduler sets.
fn role_index() -> Result<Option<u32>> {
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

/// Reads a job's training configuration (`kind` nmt: the `train nmt` TOML; ctr: a
/// [`CtrTrainConfig`] as TOML), lets `adjust` change its `[dist]` section, validates
/// it, and returns it as TOML text with the resulting job shape.
pub fn job_config(
    kind: &str,
    path: &Path,
    adjust: impl FnOnce(&mut DistSection),
) -> Result<(String, DistSection)> {
    match kind {
        "nmt" => {
            let mut cfg = NmtTrainConfig::load(Some(path), &[])?;
            adjust(&mut cfg.dist);
            cfg.validate()?;
            Ok((cfg.to_toml(), cfg.dist))
        }
        "ctr" => {
            let mut cfg = read_ctr_config(path)?;
            adjust(&mut cfg.dist);
            cfg.validate()?;
            let text = toml::to_string(&cfg).map_err(|e| Error::Config(e.to_string()))?;
            Ok((text, cfg.dist))
        }
        other => Err(Error::Config(format!(
            "unknown job kind '{other}'; expected nmt or ctr"
        ))),
    }
}

fn read_ctr_config(path: &Path) -> Result<CtrTrainConfig> {
    let text = std::fs::read_to_string(path).map_err(crate::error::io_err(path))?;
    toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// Prepares `RUN/job` for the processes of a job from its configuration file (NMT:
/// learns the subword vocabularies; CTR: worker 0 saves the model to `RUN/model`);
/// returns the job's shape.
pub fn prepare_job(kind: &str, config: &Path, run_dir: &Path) -> Result<DistSection> {
    let job = run_dir.join("job");
    match kind {
        "nmt" => {
            let cfg = NmtTrainConfig::load(Some(config), &[])?;
            let tok = NmtTrainer::learn_tokenizers(&cfg)?;
            write_job(&job, &cfg, &tok)?;
            Ok(cfg.dist)
        }
        "ctr" => {
            let cfg = read_ctr_config(config)?;
            cfg.validate()?;
            let d = cfg.dist.clone();
            let out = run_dir.join("model");
            write_ctr_job(run_dir, &CtrJob { cfg, out })?;
            Ok(d)
        }
        other => Err(Error::Config(format!(
            "unknown job kind '{other}'; expected nmt or ctr"
        ))),
    }
}

/// Serves as the coordinator of a job whose processes a scheduler starts: prepares the
/// job directory, serves on `listen` (port 0: one the system picks; the address bound is
/// printed on stderr as `coordinator listening on ADDR`), and returns when every process
/// has left in order (an error if one fails or the job does not assemble within
/// `rendezvous`).
pub fn run_coordinator(
    kind: &str,
    config: &Path,
    run_dir: &Path,
    listen: SocketAddr,
    token: &str,
    rendezvous: Duration,
) -> Result<()> {
    let d = prepare_job(kind, config, run_dir)?;
    let world = d.workers + d.separate_servers();
    let coord = Coordinator::start(
        listen,
        CoordinatorConfig {
            token: token.into(),
            world: world as u32,
            heartbeat_timeout: Duration::from_secs_f64(d.heartbeat_timeout_s),
            rendezvous_timeout: rendezvous,
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

/// Runs this process's part of a job, its role and the job taken from the environment
/// (see the `ENV_*` constants). A worker prints [`Report`]s on stdout.
pub fn run_role() -> Result<()> {
    let mut role = env(ENV_ROLE)?;
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
    // The coordinator prepares the job directory before it serves, so once it answers
    // the job's files are there (on a cluster: on the shared volume).
    let mut ctl = ControlClient::connect(&coordinator, &token, Duration::from_secs_f64(wait))?;
    let kind = std::fs::read_to_string(job.join("kind")).unwrap_or_else(|_| "nmt".into());
    let spec = match kind.trim() {
        "nmt" => {
            let (cfg, tok) = read_job(&job)?;
            Job::Nmt(Box::new(cfg), Box::new(tok))
        }
        "ctr" => Job::Ctr(Box::new(read_ctr_job(&job)?)),
        other => {
            return Err(Error::Cluster(format!(
                "{}: unknown job kind '{other}'",
                job.join("kind").display()
            )))
        }
    };
    let d = match &spec {
        Job::Nmt(cfg, _) => cfg.dist.clone(),
        Job::Ctr(j) => j.cfg.dist.clone(),
    };
    // A scheduler starts all workers from one template: with colocated shards, the
    // workers with the lowest indexes host them.
    if role == "worker" && d.mode != DistMode::Allreduce && d.placement == Placement::Colocated {
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
        )));
    }
    // Listeners are bound before registering, so the advertised addresses are live.
    let shard_listener = if hosts_shard {
        Some(bind(&host)?)
    } else {
        None
    };
    let ring_listener =
        if is_worker && d.mode == DistMode::Allreduce && d.transport == DataPlane::Tcp {
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
    if worker_ranks.len() != d.workers {
        return Err(Error::Cluster(format!(
            "{} workers registered, the configuration asks for {}",
            worker_ranks.len(),
            d.workers
        )));
    }
    // This process's shard, if it hosts one.
    let (total, width, shard_cfg) = match &spec {
        Job::Nmt(cfg, tok) => (param_count(cfg, tok)?, 0, shard_config(cfg, &token)),
        Job::Ctr(j) => {
            let (total, width) = ctr_shape(&j.cfg)?;
            let mode = match d.mode {
                DistMode::PsAsync => PsMode::Async {
                    max_staleness: (d.max_staleness > 0).then_some(d.max_staleness),
                },
                _ => PsMode::Sync,
            };
            let c = crate::ctr::ctr_shard_config(&j.cfg, width, d.workers, mode, &token);
            (total, width, c)
        }
    };
    let shards = shard_hosts.len();
    let server = match shard_listener {
        Some((l, _)) => {
            let idx = shard_hosts
                .iter()
                .position(|m| m.rank == reg.rank)
                .ok_or_else(|| Error::Cluster(format!("{me}: not in the shard table")))?;
            let (a, b) = shard_range(total, shards, idx);
            Some(PsServer::start(l, b - a, shard_cfg)?)
        }
        None => None,
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
        let (cfg, tok) = match spec {
            Job::Nmt(cfg, tok) => (*cfg, *tok),
            Job::Ctr(j) => {
                let client = PsClient::connect(&shard_addrs()?, rank, total, width, &token)?;
                let r = ctr_worker(*j, resume.as_deref(), rank, d.workers, client);
                return finish(r, server, dog, ctl);
            }
        };
        let exchange = match d.mode {
            DistMode::Allreduce => {
                let t: Box<dyn Transport> = match ring_listener {
                    None => Box::new(ShmTransport::connect(
                        &format!("shoal-{token}"),
                        rank,
                        d.workers,
                        8 << 20,
                        Duration::from_secs(60),
                    )?),
                    Some((l, _)) => {
                        let addrs = members
                            .iter()
                            .filter(|m| m.role.starts_with("worker"))
                            .map(|m| parse_addr(&m.data_addr, &format!("worker {}", m.rank)))
                            .collect::<Result<Vec<_>>>()?;
                        let opts = TcpOptions {
                            token: token.clone(),
                            ..Default::default()
                        };
                        Box::new(TcpTransport::connect(rank, &addrs, l, &opts)?)
                    }
                };
                let mut comm = Communicator::new(t);
                // Ranks on several hosts: the two-level allreduce.
                let workers: Vec<&shoal_control::proto::Member> = members
                    .iter()
                    .copied()
                    .filter(|m| m.role.starts_with("worker"))
                    .collect();
                let host_of: Vec<usize> = workers
                    .iter()
                    .map(|m| workers.iter().position(|x| x.host == m.host).unwrap_or(0))
                    .collect();
                comm.set_hosts(&host_of)?;
                Exchange::Allreduce(comm)
            }
            DistMode::PsSync | DistMode::PsAsync => {
                Exchange::Ps(PsClient::connect(&shard_addrs()?, rank, total, 0, &token)?)
            }
        };
        worker(cfg, &run_dir, tok, resume.as_deref(), rank, exchange)
    } else {
        Ok(())
    };
    finish(result, server, dog, ctl)
}

/// Waits for this process's shard (if any) to be released by every worker, then leaves
/// the job (or abandons it after a failure).
fn finish(
    result: Result<()>,
    server: Option<PsServer>,
    dog: Watchdog,
    ctl: Arc<ControlClient>,
) -> Result<()> {
    let result = result.and_then(|()| match server {
        Some(s) => s.join().map_err(Error::from),
        None => Ok(()),
    });
    dog.stop();
    match (&result, Arc::try_unwrap(ctl)) {
        (Ok(()), Ok(c)) => c.leave()?,
        (_, Ok(c)) => c.abandon(),
        (_, Err(_)) => {}
    }
    result
}

/// A CTR worker against the job's shards; worker 0 evaluates and saves the model.
fn ctr_worker(
    j: CtrJob,
    resume: Option<&Path>,
    rank: usize,
    workers: usize,
    client: PsClient,
) -> Result<()> {
    let mut t = match resume {
        Some(p) => CtrTrainer::resume(p, |c| {
            c.epochs = j.cfg.epochs;
            c.max_steps = j.cfg.max_steps;
        })?,
        None => CtrTrainer::new(j.cfg)?,
    };
    t.attach_ps(rank, workers, client)?;
    let start = Instant::now();
    let mut pending = 0usize;
    let mut steps = 0u64;
    let mut last_emit = Instant::now();
    let e = t.run(|ev| match ev {
        CtrEvent::Started {
            steps_per_epoch, ..
        } => emit(&Report::Started {
            rank,
            total_steps: 0,
            start_step: 0,
            batches_per_epoch: *steps_per_epoch,
            params: 0,
        }),
        CtrEvent::Step {
            step, epoch, loss, ..
        } => {
            steps = *step;
            pending += 1;
            // A report every half second, not every update.
            if last_emit.elapsed().as_millis() >= 500 {
                last_emit = Instant::now();
                emit(&Report::Step {
                    rank,
                    step: *step,
                    epoch: *epoch,
                    loss: *loss as f32,
                    grad_norm: 0.0,
                    lr: 0.0,
                    tokens: std::mem::take(&mut pending),
                });
            }
        }
        CtrEvent::Eval { epoch, eval } => emit(&Report::CtrEval {
            epoch: *epoch,
            auc: eval.auc,
            logloss: eval.logloss,
            planted_auc: eval.planted_auc,
        }),
    })?;
    let _ = e;
    if rank == 0 {
        t.save(&j.out)?;
    }
    let examples_per_s = t.examples_trained as f64 / t.train_seconds.max(1e-9);
    t.detach_ps()?;
    emit(&Report::Done {
        rank,
        steps,
        seconds: start.elapsed().as_secs_f64(),
        tokens_per_s: examples_per_s,
        timing: PhaseTimes::default(),
        checkpoint: j.out.clone(),
    });
    Ok(())
}

fn worker(
    cfg: NmtTrainConfig,
    run_dir: &Path,
    tok: Tokenizers,
    resume: Option<&Path>,
    rank: usize,
    exchange: Exchange,
) -> Result<()> {
    let mut t = match resume {
        Some(p) => NmtTrainer::resume(p, |_| Ok(cfg.clone()))?,
        None => NmtTrainer::with_tokenizers(cfg, run_dir, Some(tok))?,
    };
    t.attach(rank, exchange)?;
    let summary = t.run(|e| match e {
        Event::Started {
            total_steps,
            start_step,
            batches_per_epoch,
            params,
        } => emit(&Report::Started {
            rank,
            total_steps: *total_steps,
            start_step: *start_step,
            batches_per_epoch: *batches_per_epoch,
            params: *params,
        }),
        Event::Step {
            step, epoch, stats, ..
        } => emit(&Report::Step {
            rank,
            step: *step,
            epoch: *epoch,
            loss: stats.loss,
            grad_norm: stats.grad_norm,
            lr: stats.lr,
            tokens: stats.tgt_tokens,
        }),
        Event::EpochEnd { epoch, valid_loss } => emit(&Report::EpochEnd {
            epoch: *epoch,
            valid_loss: *valid_loss,
        }),
        Event::Checkpoint { step, path } => emit(&Report::Checkpoint {
            step: *step,
            path: path.clone(),
        }),
    })?;
    if let Some(Exchange::Ps(c)) = t.detach() {
        c.close()?;
    }
    emit(&Report::Done {
        rank,
        steps: summary.steps,
        seconds: summary.seconds,
        tokens_per_s: summary.tokens_per_s,
        timing: t.timing(),
        checkpoint: if rank == 0 {
            summary.last_checkpoint
        } else {
            checkpoint::step_dir(run_dir, t.position().step)
        },
    });
    Ok(())
}
