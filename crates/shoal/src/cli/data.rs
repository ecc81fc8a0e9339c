//! `shoal data`: data tools (synthetic click logs).

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub(crate) enum DataCmd {
    /// Synthetic click logs with Zipf-distributed ids drawn from a planted FM model.
    GenCtr {
        /// Rows to write.
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        /// Categorical fields per row.
        #[arg(long, default_value_t = 20)]
        fields: usize,
        /// Possible ids per field (up to 10^10 and more).
        #[arg(long, default_value_t = 1_000_000)]
        ids_per_field: u64,
        /// Zipf exponent of the ids' popularity within a field.
        #[arg(long, default_value_t = 1.1)]
        zipf: f64,
        /// Seed of the planted model and the draws.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output CSV; the planted probabilities go to OUT.p.
        #[arg(long)]
        out: PathBuf,
    },
}

pub(crate) fn run(
    rows: usize,
    fields: usize,
    ids: u64,
    zipf: f64,
    seed: u64,
    out: PathBuf,
) -> Result<()> {
    if fields == 0 || ids == 0 || zipf <= 0.0 {
        bail!("--fields, --ids-per-field and --zipf must be positive");
    }
    let cfg = shoal_data::ctr::SynthConfig {
        rows,
        fields,
        ids_per_field: ids,
        zipf,
        seed,
        ..Default::default()
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating {} for --out", dir.display()))?;
    }
    let probs = PathBuf::from(format!("{}.p", out.display()));
    let (n, auc) = shoal_data::ctr::write_synth(&cfg, &out, &probs)?;
    println!(
        "wrote {n} rows to {} and their planted probabilities to {}; the planted model's AUC on them is {auc:.4}",
        out.display(),
        probs.display()
    );
    Ok(())
}
