//! The shape of a data-parallel job, shared by every workload's configuration: how
//! many workers, parameter-server shards and where they run, how gradients meet, and the
//! health timeout.

use serde::{Deserialize, Serialize};

/// How the gradients of data-parallel workers are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum DistMode {
    /// Ring/recursive-doubling allreduce; every worker runs the optimizer (like DDP).
    Allreduce,
    /// Parameter servers apply the weighted mean of all workers' gradients each step.
    PsSync,
    /// Parameter servers apply each worker's gradient on arrival (bounded staleness).
    PsAsync,
}

/// Where parameter-server shards run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// Shard `i` runs inside worker `i`'s process.
    Colocated,
    /// Each shard is a process of its own.
    Separate,
}

/// The data plane between workers for allreduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum DataPlane {
    /// Shared-memory rings (processes on one host).
    Shm,
    /// TCP (any hosts).
    Tcp,
}

/// The shape of a data-parallel job (`workers = 1`: one process, no cluster).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistSection {
    /// Data-parallel workers; `train.batch_size` is per worker, so the global batch is
    /// `workers * batch_size`. In an elastic job (`min_workers` below it) the most
    /// workers: the global batch stays `workers * batch_size` whatever the job's size
    /// (each worker's share grows when it shrinks), so a membership change does not
    /// change what is computed.
    pub workers: usize,
    /// The fewest workers an elastic job goes on with (0: `workers`, not elastic). When
    /// a worker fails the survivors restart from the last checkpoint without it, and a
    /// replacement joins at the next checkpoint (`--workers MIN:MAX`).
    pub min_workers: usize,
    /// How many times a failed job restarts from its last checkpoint before it stops
    /// (0: the first failure stops it).
    pub max_restarts: u32,
    /// Parameter-server shards (ps modes).
    pub ps: usize,
    pub mode: DistMode,
    pub placement: Placement,
    pub transport: DataPlane,
    /// ps-async: a worker's pull may run at most this many updates ahead of the
    /// shards (0 = unbounded).
    pub max_staleness: u64,
    /// A process silent (or a peer unresponsive) for this long fails the job.
    pub heartbeat_timeout_s: f64,
    /// TLS on the control plane, the TCP data plane and the parameter-server links
    /// (shared memory stays on the host): certificates from `tls_dir`, or a per-job CA
    /// the launcher makes.
    pub tls: bool,
    /// A directory with `ca.pem`, `cert.pem` and `key.pem` (empty: a per-job CA).
    pub tls_dir: String,
}

impl Default for DistSection {
    fn default() -> Self {
        Self {
            workers: 1,
            min_workers: 0,
            max_restarts: 0,
            ps: 0,
            mode: DistMode::Allreduce,
            placement: Placement::Separate,
            transport: DataPlane::Shm,
            max_staleness: 0,
            heartbeat_timeout_s: 10.0,
            tls: false,
            tls_dir: String::new(),
        }
    }
}

/// The most processes of either kind a job may have (a bound on what a configuration can
/// ask the launcher to start).
pub const MAX_PROCESSES: usize = 4096;

/// The most restarts a job may ask for.
pub const MAX_RESTARTS: u32 = 1000;

/// The longest heartbeat timeout (a day); longer ones are surely a mistake, and a
/// silent peer would hold the job for ever.
pub const MAX_HEARTBEAT_S: f64 = 86_400.0;

impl DistSection {
    /// Checks every value against the others (fields named as `dist.FIELD`).
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |f: &str, why: String| Err(crate::Error::Config(format!("dist.{f}: {why}")));
        if self.workers == 0 || self.workers > MAX_PROCESSES {
            return bad("workers", format!("must be in 1..={MAX_PROCESSES}"));
        }
        if self.min_workers > self.workers {
            return bad(
                "min_workers",
                format!(
                    "{} is more than dist.workers ({}), the most workers",
                    self.min_workers, self.workers
                ),
            );
        }
        if self.max_restarts > MAX_RESTARTS {
            return bad("max_restarts", format!("must be at most {MAX_RESTARTS}"));
        }
        if self.ps > MAX_PROCESSES {
            return bad("ps", format!("must be at most {MAX_PROCESSES}"));
        }
        match self.mode {
            DistMode::Allreduce if self.ps > 0 => {
                return bad(
                    "ps",
                    "parameter servers need mode ps-sync or ps-async".into(),
                )
            }
            DistMode::PsSync | DistMode::PsAsync if self.ps == 0 => {
                return bad("ps", "must be at least 1 in a ps mode".into())
            }
            _ => {}
        }
        if self.placement == Placement::Colocated && self.ps > self.workers {
            return bad(
                "ps",
                "colocated placement puts one shard in each of the first workers: at most \
                 dist.workers"
                    .into(),
            );
        }
        if self.placement == Placement::Colocated
            && self.mode != DistMode::Allreduce
            && self.fewest_workers() < self.ps
        {
            return bad(
                "min_workers",
                format!(
                    "{}: with colocated placement every shard lives in a worker, so an \
                     elastic job keeps at least dist.ps ({}) workers",
                    self.min_workers, self.ps
                ),
            );
        }
        if !(self.heartbeat_timeout_s > 0.0 && self.heartbeat_timeout_s <= MAX_HEARTBEAT_S) {
            return bad(
                "heartbeat_timeout_s",
                format!(
                    "{:?} is not a number of seconds in (0, {MAX_HEARTBEAT_S}]",
                    self.heartbeat_timeout_s
                ),
            );
        }
        if !self.tls && !self.tls_dir.is_empty() {
            return bad(
                "tls_dir",
                "is set but dist.tls is off (set dist.tls = true to use it)".into(),
            );
        }
        Ok(())
    }

    /// How long one receive or send on the data plane may wait for a peer before the job
    /// fails: six heartbeat timeouts, at least a minute (a worker may wait that long on
    /// one that validates or saves a checkpoint; a peer that is gone is found sooner, by
    /// its closed connection or by the heartbeats).
    pub fn data_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64((6.0 * self.heartbeat_timeout_s).max(60.0))
    }

    /// The fewest workers the job goes on with (`min_workers`, or `workers` when 0).
    pub fn fewest_workers(&self) -> usize {
        match self.min_workers {
            0 => self.workers,
            m => m,
        }
    }

    /// Checks that a job of `world` workers is one this configuration allows (what a
    /// launcher or scheduler started; `who` names where the number came from).
    pub fn check_world(&self, world: usize, who: &str) -> crate::Result<()> {
        if world < self.fewest_workers() || world > self.workers {
            return Err(crate::Error::Cluster(format!(
                "{who}: {world} workers, but the job's configuration allows {}",
                match self.fewest_workers() == self.workers {
                    true => format!("exactly {} (dist.workers)", self.workers),
                    false => format!(
                        "{} to {} (dist.min_workers to dist.workers)",
                        self.fewest_workers(),
                        self.workers
                    ),
                }
            )));
        }
        Ok(())
    }

    /// True when the job runs as several processes.
    pub fn is_cluster(&self) -> bool {
        self.workers > 1 || self.mode != DistMode::Allreduce
    }

    /// Shards that run as processes of their own.
    pub fn separate_servers(&self) -> usize {
        match (self.mode, self.placement) {
            (DistMode::Allreduce, _) | (_, Placement::Colocated) => 0,
            _ => self.ps,
        }
    }
}
