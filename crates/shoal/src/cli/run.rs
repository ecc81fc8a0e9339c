//! `shoal run -n N -- CMD ...`: N copies of a command (a PyTorch script with the
//! `shoal` Python package) as one job on this machine, as torchrun or horovodrun start
//! theirs.

use anyhow::{bail, Result};
use clap::Args;
use shoal_runtime::dist::DataPlane;

#[derive(Args)]
pub(crate) struct RunArgs {
    /// How many processes.
    #[arg(short = 'n', long = "np", default_value_t = 1)]
    pub(crate) np: usize,
    /// How many of them host parameter-server shards for the script's sparse
    /// embeddings (`shoal.torch.SparseEmbedding`): the first M (default: all).
    #[arg(long)]
    pub(crate) ps: Option<usize>,
    /// The data plane between them: shared-memory rings or TCP.
    #[arg(long, value_enum, default_value_t = DataPlane::Shm)]
    pub(crate) transport: DataPlane,
    /// Compute threads per process (OMP_NUM_THREADS; 0: the cores shared out).
    #[arg(long, default_value_t = 0)]
    pub(crate) threads_per_process: usize,
    /// A process silent for this long fails the job, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) heartbeat_timeout_s: f64,
    /// TLS on the control plane, the TCP data plane and the sparse tables' links, with a
    /// per-job CA (or the certificates in --tls-dir).
    #[arg(long)]
    pub(crate) tls: bool,
    /// A directory with ca.pem, cert.pem and key.pem for --tls.
    #[arg(long, requires = "tls")]
    pub(crate) tls_dir: Option<std::path::PathBuf>,
    /// After a failed process, stop the others and start all again, up to this many
    /// times (torchrun's --max-restarts; the script resumes from its own checkpoint,
    /// SHOAL_RESTART_COUNT and TORCHELASTIC_RESTART_COUNT tell it which start it is).
    #[arg(long, default_value_t = 0)]
    pub(crate) max_restarts: u32,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    pub(crate) command: Vec<String>,
}

pub(crate) fn run(a: RunArgs) -> Result<()> {
    if a.np == 0 || a.np > 1024 {
        bail!("-n {}: a job runs 1 to 1024 processes", a.np);
    }
    if !(a.heartbeat_timeout_s.is_finite() && (0.1..=86_400.0).contains(&a.heartbeat_timeout_s)) {
        bail!("--heartbeat-timeout-s must be 0.1 to 86400 seconds");
    }
    if a.max_restarts > shoal_runtime::dist::MAX_RESTARTS {
        bail!(
            "--max-restarts {}: at most {}",
            a.max_restarts,
            shoal_runtime::dist::MAX_RESTARTS
        );
    }
    if let Some(m) = a.ps {
        if m == 0 || m > a.np {
            bail!(
                "--ps {m}: 1 to {} of the {} processes can host shards",
                a.np,
                a.np
            );
        }
    }
    let d = shoal_runtime::dist::DistSection {
        tls: a.tls,
        tls_dir: a
            .tls_dir
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        ..Default::default()
    };
    // A per-job CA in a fresh directory only this user may enter, removed at the end.
    let at =
        std::env::temp_dir().join(format!("shoal-tls-{}", shoal_runtime::launch::new_token()?));
    let tls = shoal_runtime::tls::prepare(&d, &at)?;
    shoal_runtime::launch::run_command(&shoal_runtime::launch::CommandJob {
        n: a.np,
        shards: a.ps,
        command: &a.command,
        transport: a.transport,
        threads: a.threads_per_process,
        heartbeat_timeout: std::time::Duration::from_secs_f64(a.heartbeat_timeout_s),
        tls_dir: tls.as_ref(),
        max_restarts: a.max_restarts,
    })?;
    Ok(())
}
