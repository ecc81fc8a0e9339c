//! The command line: one module per command (its arguments and what runs them); the
//! flags' choices are the library crates' own enums (their `clap` feature).

pub mod average;
pub mod bench;
pub mod compress;
pub mod coordinator;
pub mod data;
pub mod eval;
pub mod info;
pub mod launch;
pub mod plan;
pub mod predict;
pub mod run;
pub mod train_cnn;
pub mod train_ctr;
pub mod train_nmt;
pub mod translate;

use anyhow::{bail, Result};
use clap::ValueEnum;

/// A command-line choice's value name: kebab-case, as the configuration spells it.
pub(crate) fn value_name(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

/// A new TensorBoard event file in `dir`, its place said on stderr.
pub(crate) fn events_in(dir: &std::path::Path) -> Result<shoal_runtime::tensorboard::EventWriter> {
    let w = shoal_runtime::tensorboard::EventWriter::create(dir)?;
    eprintln!(
        "TensorBoard events: {} (tensorboard --logdir {})",
        w.path().display(),
        dir.display()
    );
    Ok(w)
}

/// `shoal role`: one process of a distributed job, for the workload its job directory
/// names (`RUN/job/kind`).
pub(crate) fn run_role() -> Result<()> {
    use shoal_runtime::role::{self, JobKind};
    let joined = role::connect()?;
    let kind = joined.kind().to_string();
    if kind == shoal_nmt::job::NmtJob::KIND {
        role::run::<shoal_nmt::job::NmtJob>(joined)?;
    } else if kind == shoal_ctr::CtrJob::KIND {
        role::run::<shoal_ctr::CtrJob>(joined)?;
    } else {
        bail!(
            "cluster: {}: unknown job kind '{kind}'; expected nmt or ctr",
            joined.job_dir().join("kind").display()
        );
    }
    Ok(())
}

/// A job's training configuration for `kind` (`nmt`: the `train nmt` TOML; `ctr`: a
/// CTR configuration as TOML) with its `[dist]` section adjusted: its TOML text and
/// shape.
pub(crate) fn job_config(
    kind: &str,
    path: &std::path::Path,
    adjust: impl FnOnce(&mut shoal_runtime::dist::DistSection),
) -> Result<(String, shoal_runtime::dist::DistSection)> {
    Ok(match kind {
        "nmt" => shoal_nmt::job::job_config(path, adjust)?,
        "ctr" => shoal_ctr::job::job_config(path, adjust)?,
        other => bail!("config: unknown job kind '{other}'; expected nmt or ctr"),
    })
}

/// `--set` arguments (`key=value`) as pairs; a missing `=` is an error naming the argument.
pub(crate) fn key_values(set: &[String]) -> Result<Vec<(String, String)>> {
    set.iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => Ok((k.trim().to_string(), v.trim().to_string())),
            None => bail!("--set '{kv}': expected KEY=VALUE"),
        })
        .collect()
}
