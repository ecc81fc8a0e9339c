//! `shoal train cnn`: the CNN trainer's flags and the run.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

/// Every field can come from `--config FILE` (TOML, `shoal train cnn --print-config`
/// shows them all with their defaults), a flag below, or `--set key=value`; later ones
/// win.
#[derive(Args)]
pub(crate) struct CnnArgs {
    /// TOML configuration file (the fields of `--print-config`).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Override any configuration field, e.g. --set model.dropout=0.3 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) set: Vec<String>,
    /// Print the resulting configuration as TOML and exit.
    #[arg(long)]
    pub(crate) print_config: bool,
    /// data_dir: directory of the IDX files (train-images-idx3-ubyte[.gz], ...);
    /// Debian's dataset-fashion-mnist installs them in the default,
    /// /usr/share/datasets/fashion-mnist.
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// model.blocks: convolution widths per block, blocks separated by '/', each closed
    /// by 2x2 pooling (default 32,32/64,64).
    #[arg(long)]
    pub(crate) blocks: Option<String>,
    /// model.fc: hidden widths of the fully-connected head (default 512,512).
    #[arg(long)]
    pub(crate) fc: Option<String>,
    /// model.dropout (default 0.25).
    #[arg(long)]
    pub(crate) dropout: Option<f32>,
    /// model.batch_norm = false: no batch normalisation (convolutions get biases).
    #[arg(long)]
    pub(crate) no_batch_norm: bool,
    /// epochs (default 3).
    #[arg(long)]
    pub(crate) epochs: Option<u64>,
    /// max_steps: stop after this many updates (default 0: no limit).
    #[arg(long)]
    pub(crate) max_steps: Option<u64>,
    /// batch_size (default 64).
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// lr: Adam's learning rate, decayed along a cosine (default 1e-3).
    #[arg(long)]
    pub(crate) lr: Option<f32>,
    /// train_limit: use only the first N training images (default 0: all).
    #[arg(long)]
    pub(crate) train_limit: Option<usize>,
    /// test_limit: use only the first N test images (default 0: all).
    #[arg(long)]
    pub(crate) test_limit: Option<usize>,
    /// seed (default 1).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
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

fn int_array(v: &[usize]) -> toml::Value {
    toml::Value::Array(v.iter().map(|&x| toml::Value::Integer(x as i64)).collect())
}

/// The configuration from its layers: defaults, `--config`, the flags, `--set`.
fn config(a: &CnnArgs) -> Result<shoal_cnn::trainer::CnnTrainConfig> {
    use toml::Value;
    let mut flags: Vec<(&str, Value)> = Vec::new();
    if let Some(d) = &a.data_dir {
        flags.push(("data_dir", Value::String(d.display().to_string())));
    }
    if let Some(b) = &a.blocks {
        let blocks = b
            .split('/')
            .map(|b| widths(b, "--blocks").map(|w| int_array(&w)))
            .collect::<Result<Vec<_>>>()?;
        flags.push(("model.blocks", Value::Array(blocks)));
    }
    if let Some(f) = &a.fc {
        flags.push(("model.fc", int_array(&widths(f, "--fc")?)));
    }
    if let Some(v) = a.dropout {
        flags.push(("model.dropout", Value::Float(v as f64)));
    }
    if a.no_batch_norm {
        flags.push(("model.batch_norm", Value::Boolean(false)));
    }
    for (k, v) in [
        ("epochs", a.epochs),
        ("max_steps", a.max_steps),
        ("batch_size", a.batch_size.map(|v| v as u64)),
        ("train_limit", a.train_limit.map(|v| v as u64)),
        ("test_limit", a.test_limit.map(|v| v as u64)),
        ("seed", a.seed),
    ] {
        if let Some(v) = v {
            flags.push((k, Value::Integer(v as i64)));
        }
    }
    if let Some(v) = a.lr {
        flags.push(("lr", Value::Float(v as f64)));
    }
    let set = super::key_values(&a.set)?;
    Ok(shoal_runtime::config::layered(
        a.config.as_deref(),
        &flags,
        &set,
    )?)
}

pub(crate) fn run(a: CnnArgs) -> Result<()> {
    use shoal_cnn::trainer::CnnTrainer;
    let cfg = config(&a)?;
    if a.print_config {
        print!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    let (epochs, batch_size) = (cfg.epochs, cfg.batch_size);
    let mut t = CnnTrainer::new(cfg)?;
    let mut progress = shoal_cnn::progress::CnnProgress::new(epochs);
    progress.record_events(crate::cli::events_in(&a.out)?);
    let started = std::time::Instant::now();
    let eval = t.run(|e| progress.on_event(e));
    progress.finish();
    let eval = eval?;
    let seconds = started.elapsed().as_secs_f64();
    t.model.save(&a.out)?;
    shoal_runtime::info::record_metrics(
        &a.out,
        &[
            ("top1", eval.top1),
            ("top5", eval.top5),
            ("test_loss", eval.loss),
        ],
    )?;
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
                "images_per_s": (t.step as f64 * batch_size as f64) / seconds.max(1e-9),
                "checkpoint": a.out})
        );
    }
    Ok(())
}
