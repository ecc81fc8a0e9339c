//! `shoal predict`: a trained CTR model scores the rows of a click log.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct PredictArgs {
    /// A model saved by `shoal train ctr`.
    #[arg(long)]
    pub(crate) checkpoint: PathBuf,
    /// Rows to score (CSV with the training file's columns; a label column is optional).
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// Write one probability per row here (default: stdout).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Skip malformed rows (counted, and no probability printed for them) instead of
    /// stopping at the first.
    #[arg(long)]
    pub(crate) skip_bad_rows: bool,
}

pub(crate) fn run(a: PredictArgs) -> Result<()> {
    let mut p = shoal_ctr::trainer::CtrPredictor::load(&a.checkpoint)
        .map_err(|e| crate::cli::info::as_kind(&a.checkpoint, "ctr", "a CTR model", e))?;
    let bad = if a.skip_bad_rows {
        shoal_data::ctr::BadRows::Skip
    } else {
        shoal_data::ctr::BadRows::Fail
    };
    let path = shoal_runtime::data::locate(&a.data, "--data")?;
    let (data, schema, report) = shoal_data::ctr::read_click_log(&path, bad)?;
    let probs = p.predict(&data)?;
    let text: String = probs.iter().map(|p| format!("{p}\n")).collect();
    match &a.out {
        Some(o) => std::fs::write(o, text).with_context(|| format!("writing {}", o.display()))?,
        None => print!("{text}"),
    }
    if schema.label_col.is_some() {
        eprintln!(
            "{} rows: AUC {:.4}, logloss {:.4}{}",
            data.len(),
            shoal_data::metrics::auc(&probs, &data.labels).unwrap_or(f64::NAN),
            shoal_data::metrics::logloss(&probs, &data.labels),
            if report.skipped > 0 {
                format!(" ({} rows skipped)", report.skipped)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
