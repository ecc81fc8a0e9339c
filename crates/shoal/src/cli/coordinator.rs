//! `shoal coordinator`: the coordinator of a job whose processes a cluster scheduler
//! starts.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct CoordinatorArgs {
    /// What the job trains.
    #[arg(long, value_parser = ["nmt", "ctr"])]
    pub(crate) kind: String,
    /// Its training configuration (TOML; for ctr the fields of `train ctr`).
    #[arg(long)]
    pub(crate) config: PathBuf,
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
    let run_dir = match a.run_dir {
        Some(d) => d,
        None => PathBuf::from(
            std::env::var(ENV_RUN)
                .with_context(|| format!("the run directory: pass --run-dir or set {ENV_RUN}"))?,
        ),
    };
    if !(a.rendezvous_timeout_s.is_finite() && a.rendezvous_timeout_s > 0.0) {
        bail!("--rendezvous-timeout-s must be a positive number of seconds");
    }
    let rendezvous = std::time::Duration::from_secs_f64(a.rendezvous_timeout_s);
    use shoal_runtime::role::run_coordinator;
    match a.kind.as_str() {
        "nmt" => run_coordinator::<shoal_nmt::job::NmtJob>(
            &a.config, &run_dir, a.listen, &token, rendezvous,
        )?,
        "ctr" => {
            run_coordinator::<shoal_ctr::CtrJob>(&a.config, &run_dir, a.listen, &token, rendezvous)?
        }
        other => bail!("config: unknown job kind '{other}'; expected nmt or ctr"),
    }
    Ok(())
}
