//! `shoal translate`: lines from stdin translated by an NMT checkpoint.

use anyhow::{Context, Result};
use clap::Args;
use shoal_nmt::Translator;
use std::io::{BufRead, Write};
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct TranslateArgs {
    /// A checkpoint directory or a run directory (its latest checkpoint).
    #[arg(long)]
    pub(crate) checkpoint: PathBuf,
    /// Beam width (1 = greedy).
    #[arg(long, default_value_t = 1)]
    pub(crate) beam: usize,
    /// Length-penalty exponent for beam search.
    #[arg(long, default_value_t = 0.6)]
    pub(crate) alpha: f32,
}

pub(crate) fn run(a: TranslateArgs) -> Result<()> {
    let t = Translator::load(&a.checkpoint)
        .map_err(|e| crate::cli::info::as_kind(&a.checkpoint, "nmt", "an NMT checkpoint", e))?;
    let stdin = std::io::stdin();
    let mut lines = Vec::new();
    for (i, l) in stdin.lock().lines().enumerate() {
        lines.push(l.with_context(|| format!("stdin line {}", i + 1))?);
    }
    let outs = with_progress(&t, &lines, a.beam, a.alpha)?;
    let mut so = std::io::stdout().lock();
    for o in outs {
        writeln!(so, "{o}")?;
    }
    Ok(())
}

/// Translates `lines` with a count of the sentences done on stderr (a bar on a
/// terminal, a line every few seconds otherwise).
pub(crate) fn with_progress(
    t: &Translator,
    lines: &[String],
    beam: usize,
    alpha: f32,
) -> Result<Vec<String>> {
    let mut bar = shoal_runtime::progress::StepBar::new();
    bar.start(lines.len() as u64);
    let outs = t.translate_with(lines, beam, alpha, |n| {
        bar.step(n as u64, "sentences translated".into())
    });
    bar.finish();
    Ok(outs?)
}
