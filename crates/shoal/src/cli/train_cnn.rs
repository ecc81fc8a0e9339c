//! `shoal train cnn`: the CNN trainer's flags and the run.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct CnnArgs {
    /// Directory of the IDX files (train-images-idx3-ubyte[.gz], ...); Debian's
    /// dataset-fashion-mnist installs them in the default.
    #[arg(long, default_value = shoal_data::images::FASHION_MNIST_DIR)]
    pub(crate) data_dir: PathBuf,
    /// Convolution widths per block, blocks separated by '/', each closed by 2x2 pooling.
    #[arg(long, default_value = "32,32/64,64")]
    pub(crate) blocks: String,
    /// Hidden widths of the fully-connected head.
    #[arg(long, default_value = "512,512")]
    pub(crate) fc: String,
    #[arg(long, default_value_t = 0.25)]
    pub(crate) dropout: f32,
    /// No batch normalisation (convolutions get biases).
    #[arg(long)]
    pub(crate) no_batch_norm: bool,
    #[arg(long, default_value_t = 3)]
    pub(crate) epochs: u64,
    /// Stop after this many updates (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub(crate) max_steps: u64,
    #[arg(long, default_value_t = 64)]
    pub(crate) batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub(crate) lr: f32,
    /// Use only the first N training / test images (0: all).
    #[arg(long, default_value_t = 0)]
    pub(crate) train_limit: usize,
    #[arg(long, default_value_t = 0)]
    pub(crate) test_limit: usize,
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Where the model is saved.
    #[arg(long, default_value = "runs/cnn")]
    pub(crate) out: PathBuf,
    /// Print a JSON summary as the last line.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Widths like "32,32/64,64" (blocks) or "512,512".
pub(crate) fn widths(s: &str, flag: &str) -> Result<Vec<usize>> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| x.trim().parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .with_context(|| format!("{flag} '{s}': expected widths like 64,64"))
}

pub(crate) fn run(a: CnnArgs) -> Result<()> {
    use shoal_cnn::trainer::{CnnTrainConfig, CnnTrainer};
    let blocks = a
        .blocks
        .split('/')
        .map(|b| widths(b, "--blocks"))
        .collect::<Result<Vec<_>>>()?;
    let cfg = CnnTrainConfig {
        model: shoal_cnn::model::CnnConfig {
            blocks,
            fc: widths(&a.fc, "--fc")?,
            dropout: a.dropout,
            batch_norm: !a.no_batch_norm,
            ..Default::default()
        },
        data_dir: a.data_dir.clone(),
        train_limit: a.train_limit,
        test_limit: a.test_limit,
        epochs: a.epochs,
        max_steps: a.max_steps,
        batch_size: a.batch_size,
        lr: a.lr,
        seed: a.seed,
    };
    let mut t = CnnTrainer::new(cfg)?;
    let mut progress = shoal_cnn::progress::CnnProgress::new(a.epochs);
    let started = std::time::Instant::now();
    let eval = t.run(|e| progress.on_event(e));
    progress.finish();
    let eval = eval?;
    let seconds = started.elapsed().as_secs_f64();
    t.model.save(&a.out)?;
    println!(
        "test top-1 {:.2}%, top-5 {:.2}% after {} steps ({seconds:.0} s); model saved to {}",
        eval.top1 * 100.0,
        eval.top5 * 100.0,
        t.step,
        a.out.display()
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({"top1": eval.top1, "top5": eval.top5, "loss": eval.loss,
                "steps": t.step, "seconds": seconds, "params": t.model.net.len(),
                "images_per_s": (t.step as f64 * a.batch_size as f64) / seconds.max(1e-9),
                "checkpoint": a.out})
        );
    }
    Ok(())
}
