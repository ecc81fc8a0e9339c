//! `shoal average`: checkpoint averaging of NMT checkpoints (the element-wise mean of
//! their parameters), as OpenNMT's `average_models.py` and fairseq's
//! `average_checkpoints.py`.

use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct AverageArgs {
    /// Checkpoint directories, or one run directory with --last.
    #[arg(required = true)]
    pub(crate) paths: Vec<PathBuf>,
    /// Average the newest N checkpoints of the run directory given.
    #[arg(long)]
    pub(crate) last: Option<usize>,
    /// Where the averaged checkpoint goes (a new checkpoint directory).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

pub(crate) fn run(a: AverageArgs) -> Result<()> {
    let dirs = match a.last {
        Some(0) => bail!("--last: at least 1"),
        Some(n) => {
            let [run] = a.paths.as_slice() else {
                bail!("--last N takes one run directory");
            };
            let mut all: Vec<PathBuf> = std::fs::read_dir(run)
                .map_err(|e| anyhow::anyhow!("{}: {e}", run.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.join("meta.json").is_file()
                        && p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("ckpt-"))
                })
                .collect();
            all.sort();
            if all.len() < n {
                bail!(
                    "{}: {} checkpoints, --last asks for {n} (train.keep_checkpoints keeps \
                     that many)",
                    run.display(),
                    all.len()
                );
            }
            all.split_off(all.len() - n)
        }
        None => a
            .paths
            .iter()
            .map(|p| shoal_runtime::store::resolve(p))
            .collect::<std::result::Result<_, _>>()?,
    };
    if a.out.exists() {
        bail!(
            "--out {}: already exists (averaging writes a new checkpoint)",
            a.out.display()
        );
    }
    let avg = shoal_nmt::checkpoint::average(&dirs, &a.out)?;
    eprintln!(
        "averaged {} checkpoints ({}) into {} (step {}); translate with `shoal translate --checkpoint {}`",
        dirs.len(),
        dirs.iter()
            .map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
            .collect::<Vec<_>>()
            .join(", "),
        a.out.display(),
        avg.meta.step,
        a.out.display()
    );
    Ok(())
}
