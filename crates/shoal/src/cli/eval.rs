//! `shoal eval`: BLEU of a hypothesis file, or of a checkpoint's translations.

use anyhow::{bail, Context, Result};
use clap::Args;
use shoal_nmt::Translator;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct EvalArgs {
    /// Hypothesis file, one translation per line (or use --checkpoint and --src).
    #[arg(long)]
    pub(crate) hyp: Option<PathBuf>,
    /// Reference file, one line per hypothesis.
    #[arg(long = "ref")]
    pub(crate) reference: PathBuf,
    /// Translate --src with this checkpoint, then score.
    #[arg(long)]
    pub(crate) checkpoint: Option<PathBuf>,
    /// Source file to translate (with --checkpoint).
    #[arg(long)]
    pub(crate) src: Option<PathBuf>,
    /// Beam width when translating (1 = greedy).
    #[arg(long, default_value_t = 1)]
    pub(crate) beam: usize,
    /// Length-penalty exponent for beam search (GNMT's alpha).
    #[arg(long, default_value_t = 0.6)]
    pub(crate) alpha: f32,
    /// Also write the translations here.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Print the score as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(a: EvalArgs) -> Result<()> {
    // Paths under shared/data are found from any directory (shoal_runtime::data).
    let locate = |p: &std::path::Path, flag| shoal_runtime::data::locate(p, flag);
    let refs = shoal_data::read_lines(&locate(&a.reference, "--ref")?)?;
    let hyps = match (&a.hyp, &a.checkpoint, &a.src) {
        (Some(h), None, None) => shoal_data::read_lines(&locate(h, "--hyp")?)?,
        (None, Some(c), Some(s)) => {
            let t = Translator::load(c)
                .map_err(|e| crate::cli::info::as_kind(c, "nmt", "an NMT checkpoint", e))?;
            let src = shoal_data::read_lines(&locate(s, "--src")?)?;
            let outs = crate::cli::translate::with_progress(&t, &src, a.beam, a.alpha)?;
            if let Some(o) = &a.out {
                std::fs::write(o, outs.join("\n") + "\n")
                    .with_context(|| format!("writing {}", o.display()))?;
            }
            outs
        }
        _ => bail!("give either --hyp FILE, or --checkpoint DIR and --src FILE"),
    };
    let bleu = shoal_data::corpus_bleu(&hyps, &refs)
        .with_context(|| format!("scoring against {}", a.reference.display()))?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"bleu": bleu.score, "precisions": bleu.precisions, "bp": bleu.bp,
                "sys_len": bleu.sys_len, "ref_len": bleu.ref_len})
        );
    } else {
        println!("{bleu}");
    }
    Ok(())
}
