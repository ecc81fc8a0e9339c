//! `shoal coordinator`: the coordinator of a job whose processes a cluster scheduler
//! starts.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct CoordinatorArgs {
    /// What the job trains (`python`: processes of a script using the `shoal` Python
    /// package, with no configuration to prepare).
    #[arg(long, value_parser = ["nmt", "ctr", "python"])]
    pub(crate) kind: String,
    /// Its training configuration (TOML; for ctr the fields of `train ctr`; nmt and ctr).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// How many processes join (python jobs; the others take it from the configuration).
    #[arg(long)]
    pub(crate) workers: Option<u32>,
    /// Address to serve the control plane on (port 0: a free port, picked by the
    /// system). Once bound, stderr says `coordinator listening on ADDR`.
    #[arg(long, default_value = "0.0.0.0:7070")]
    pub(crate) listen: std::net::SocketAddr,
    /// The run directory shared by the job's processes (default: $SHOAL_RUN_DIR).
    #[arg(long)]
    pub(crate) run_dir: Option<PathBuf>,
    /// Fail if the job's processes have not all registered within this many seconds.
    #[arg(long, default_value_t = 900.0)]
    pub(crate) rendezvous_timeout_s: f64,
}

pub(crate) fn run(a: CoordinatorArgs) -> Result<()> {
    use shoal_runtime::launch::{ENV_RUN, ENV_TOKEN};
    let token =
        std::env::var(ENV_TOKEN).with_context(|| format!("the job token: set {ENV_TOKEN}"))?;
    if !(a.rendezvous_timeout_s.is_finite() && a.rendezvous_timeout_s > 0.0) {
        bail!("--rendezvous-timeout-s must be a positive number of seconds");
    }
    let rendezvous = std::time::Duration::from_secs_f64(a.rendezvous_timeout_s);
    if a.kind == "python" {
        let workers = match (a.workers, &a.config) {
            (_, Some(_)) => bail!("--config is for nmt and ctr jobs; a python job has none"),
            (Some(w), None) if (1..=100_000).contains(&w) => w,
            (Some(w), None) => bail!("--workers {w}: expected 1 to 100000"),
            (None, None) => bail!("a python job's coordinator needs --workers N"),
        };
        shoal_runtime::group::serve_coordinator(a.listen, &token, workers, rendezvous)?;
        return Ok(());
    }
    if a.workers.is_some() {
        bail!(
            "--workers is for python jobs; an {} job takes it from --config",
            a.kind
        );
    }
    let Some(config) = a.config else {
        bail!(
            "an {} job's coordinator needs --config (its training configuration)",
            a.kind
        );
    };
    let run_dir = match a.run_dir {
        Some(d) => d,
        None => PathBuf::from(
            std::env::var(ENV_RUN)
                .with_context(|| format!("the run directory: pass --run-dir or set {ENV_RUN}"))?,
        ),
    };
    use shoal_runtime::role::run_coordinator;
    match a.kind.as_str() {
        "nmt" => run_coordinator::<shoal_nmt::job::NmtJob>(
            &config, &run_dir, a.listen, &token, rendezvous,
        )?,
        "ctr" => {
            run_coordinator::<shoal_ctr::CtrJob>(&config, &run_dir, a.listen, &token, rendezvous)?
        }
        other => bail!("config: unknown job kind '{other}'; expected nmt or ctr"),
    }
    Ok(())
}
