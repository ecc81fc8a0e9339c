//! `shoal train nmt`: the NMT trainer's flags (each a configuration field, laid over
//! the defaults and `--config` and under `--set`), and the run (one process, or the
//! embedded local cluster).

use super::*;
use anyhow::{bail, Context, Result};
use clap::Args;
use shoal_nmt::config::NmtTrainConfig;
use shoal_nmt::progress::Progress;
use shoal_nmt::NmtTrainer;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct NmtArgs {
    /// TOML configuration file (sections [model], [data], [train], [eval]).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Override any configuration field, e.g. --set model.hidden=256 (repeatable; wins
    /// over the flags below, which win over --config).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) set: Vec<String>,
    /// Run directory for checkpoints.
    #[arg(long, default_value = "runs/nmt")]
    pub(crate) out: PathBuf,
    /// Continue the run saved in this run or checkpoint directory.
    #[arg(long)]
    pub(crate) resume: Option<PathBuf>,
    /// Directory with train.{en,de} and val.{en,de} (sets the four data paths).
    #[arg(long)]
    pub(crate) data_dir: Option<PathBuf>,
    /// train.epochs
    #[arg(long)]
    pub(crate) epochs: Option<u64>,
    /// train.max_steps (0 = no limit)
    #[arg(long)]
    pub(crate) max_steps: Option<u64>,
    /// train.max_minutes (0 = no limit)
    #[arg(long)]
    pub(crate) max_minutes: Option<f64>,
    /// train.batch_size
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// train.lr
    #[arg(long)]
    pub(crate) lr: Option<f32>,
    /// train.label_smoothing: the training target is (1 - e) onehot + e / vocabulary
    /// (0.1 is the usual setting; 0 = none).
    #[arg(long)]
    pub(crate) label_smoothing: Option<f64>,
    /// train.seed
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// train.checkpoint_every (updates; 0 = only at the end)
    #[arg(long)]
    pub(crate) checkpoint_every: Option<u64>,
    /// model.cell
    #[arg(long, value_enum)]
    pub(crate) cell: Option<shoal_nmt::CellKind>,
    /// model.attention
    #[arg(long, value_enum)]
    pub(crate) attention: Option<shoal_nmt::AttentionKind>,
    /// model.layer_norm: Layer Normalization inside the recurrent cell.
    #[arg(long)]
    pub(crate) layer_norm: bool,
    /// model.dropout
    #[arg(long)]
    pub(crate) dropout: Option<f32>,
    /// model.tie_embeddings: the output layer shares the target embedding's matrix
    /// (needs model.embed == model.hidden).
    #[arg(long)]
    pub(crate) tie_embeddings: bool,
    /// train.device: where the model trains (cpu, cuda, cuda:N).
    #[arg(long)]
    pub(crate) device: Option<String>,
    /// dist.workers: data-parallel worker processes (train.batch_size is per worker);
    /// MIN:MAX for an elastic job (dist.min_workers, dist.workers): it goes on with as
    /// few as MIN after failures, restarting from its last checkpoint.
    #[arg(long, value_parser = parse_workers, value_name = "N|MIN:MAX")]
    pub(crate) workers: Option<(usize, Option<usize>)>,
    /// train.timeline: write a Chrome trace of every process's phases per step to
    /// FILE (Perfetto, chrome://tracing); train.timeline_steps bounds it.
    #[arg(long, value_name = "FILE")]
    pub(crate) timeline: Option<PathBuf>,
    /// dist.max_restarts: restarts from the last checkpoint after a failed process.
    #[arg(long)]
    pub(crate) max_restarts: Option<u32>,
    /// dist.ps: parameter-server shards (sets --mode ps-sync unless given).
    #[arg(long)]
    pub(crate) ps: Option<usize>,
    /// dist.mode: how workers combine gradients.
    #[arg(long, value_enum)]
    pub(crate) mode: Option<shoal_runtime::dist::DistMode>,
    /// dist.placement: shards in their own processes or inside the first workers.
    #[arg(long, value_enum)]
    pub(crate) ps_placement: Option<shoal_runtime::dist::Placement>,
    /// dist.transport: the data plane of the allreduce and of the links to the shards
    /// (shm: processes of one host; tcp: any hosts).
    #[arg(long, value_enum)]
    pub(crate) transport: Option<shoal_runtime::dist::DataPlane>,
    /// eval.beam for the final BLEU (1 = greedy)
    #[arg(long)]
    pub(crate) beam: Option<usize>,
    /// Skip the BLEU evaluation at the end.
    #[arg(long)]
    pub(crate) no_eval: bool,
    /// Print the final summary as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
    /// Print the effective configuration (TOML) and exit.
    #[arg(long)]
    pub(crate) print_config: bool,
}

/// `--workers N` (N, no minimum) or `--workers MIN:MAX` (MAX, Some(MIN)).
fn parse_workers(v: &str) -> std::result::Result<(usize, Option<usize>), String> {
    let num = |t: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| format!("'{v}' is not N or MIN:MAX (numbers of workers)"))
    };
    match v.split_once(':') {
        None => Ok((num(v)?, None)),
        Some((min, max)) => {
            let (min, max) = (num(min)?, num(max)?);
            if min == 0 || min > max {
                return Err(format!("'{v}': MIN must be in 1..=MAX"));
            }
            Ok((max, Some(min)))
        }
    }
}

/// The flags as configuration values (`section.key` and a typed value), laid over the
/// defaults and `--config` and under `--set`, as `shoal train ctr` and `cnn` do.
pub(crate) fn flags(a: &NmtArgs) -> Result<Vec<(&'static str, toml::Value)>> {
    use toml::Value;
    let mut f: Vec<(&'static str, Value)> = Vec::new();
    if let Some(d) = &a.data_dir {
        for (k, name) in [
            ("data.train_src", "train.en"),
            ("data.train_tgt", "train.de"),
            ("data.valid_src", "val.en"),
            ("data.valid_tgt", "val.de"),
        ] {
            f.push((k, Value::String(d.join(name).display().to_string())));
        }
    }
    for (k, v) in [
        ("train.epochs", a.epochs),
        ("train.max_steps", a.max_steps),
        ("train.batch_size", a.batch_size.map(|v| v as u64)),
        ("train.seed", a.seed),
        ("train.checkpoint_every", a.checkpoint_every),
        ("eval.beam", a.beam.map(|v| v as u64)),
        ("dist.workers", a.workers.map(|(max, _)| max as u64)),
        (
            "dist.min_workers",
            a.workers.and_then(|(_, min)| min).map(|v| v as u64),
        ),
        ("dist.max_restarts", a.max_restarts.map(u64::from)),
        ("dist.ps", a.ps.map(|v| v as u64)),
    ] {
        if let Some(v) = v {
            let v = i64::try_from(v).with_context(|| format!("{k}: {v} is too large"))?;
            f.push((k, Value::Integer(v)));
        }
    }
    for (k, v) in [
        ("train.max_minutes", a.max_minutes),
        ("train.lr", a.lr.map(f64::from)),
        ("train.label_smoothing", a.label_smoothing),
        ("model.dropout", a.dropout.map(f64::from)),
    ] {
        if let Some(v) = v {
            f.push((k, Value::Float(v)));
        }
    }
    if let Some(c) = a.cell {
        f.push(("model.cell", Value::try_from(c)?));
    }
    if let Some(at) = a.attention {
        f.push(("model.attention", Value::try_from(at)?));
    }
    if a.layer_norm {
        f.push(("model.layer_norm", Value::Boolean(true)));
    }
    if a.tie_embeddings {
        f.push(("model.tie_embeddings", Value::Boolean(true)));
    }
    if let Some(d) = &a.device {
        f.push(("train.device", Value::String(d.clone())));
    }
    if let Some(t) = &a.timeline {
        f.push(("train.timeline", Value::String(t.display().to_string())));
    }
    // --ps N alone means synchronous shards; --mode ps-* alone means one shard.
    use shoal_runtime::dist::DistMode;
    match (a.mode, a.ps) {
        (Some(m), ps) => {
            f.push(("dist.mode", Value::try_from(m)?));
            if ps.is_none() && m != DistMode::Allreduce {
                f.push(("dist.ps", Value::Integer(1)));
            }
        }
        (None, Some(n)) if n > 0 => f.push(("dist.mode", Value::try_from(DistMode::PsSync)?)),
        _ => {}
    }
    if let Some(p) = a.ps_placement {
        f.push(("dist.placement", Value::try_from(p)?));
    }
    if let Some(p) = a.transport {
        f.push(("dist.transport", Value::try_from(p)?));
    }
    Ok(f)
}

pub(crate) fn run(a: NmtArgs) -> Result<()> {
    let (flags, set) = (flags(&a)?, key_values(&a.set)?);
    if a.resume.is_none() && !a.print_config {
        let cfg = NmtTrainConfig::layered(a.config.as_deref(), &flags, &set)?;
        if cfg.dist.is_cluster() {
            return train_nmt_cluster(&a, cfg, None);
        }
    }
    let mut trainer = match &a.resume {
        Some(dir) => {
            if a.config.is_some() {
                bail!("--resume continues with the run's saved configuration; drop --config");
            }
            let t = NmtTrainer::resume(dir, |saved| saved.with_layers(&flags, &set))?;
            if t.config().dist.is_cluster() {
                let cfg = t.config().clone();
                let tok = t.tokenizers().clone();
                drop(t);
                return train_nmt_cluster(&a, cfg, Some((dir.clone(), tok)));
            }
            t
        }
        None => {
            let cfg = NmtTrainConfig::layered(a.config.as_deref(), &flags, &set)?;
            if a.print_config {
                print!("{}", cfg.to_toml());
                return Ok(());
            }
            let threads = cfg.train.threads;
            if threads > 0 && std::env::var_os("RAYON_NUM_THREADS").is_none() {
                // The thread pool starts with the first parallel operation, after this.
                std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
            }
            eprintln!("preparing data and learning subword vocabularies...");
            NmtTrainer::new(cfg, &a.out)?
        }
    };
    let epochs = trainer.config().train.epochs;
    let mut progress = Progress::new(epochs, false);
    record_events(&mut progress, trainer.run_dir())?;
    let summary = trainer.run(|e| progress.on_event(e));
    progress.finish();
    let summary = summary?;
    eprintln!(
        "trained {} steps in {:.0} s ({:.0} target tokens/s); stopped: {}; checkpoint {}",
        summary.steps,
        summary.seconds,
        summary.tokens_per_s,
        summary.stop,
        summary.last_checkpoint.display()
    );
    let out = serde_json::json!({
        "steps": trainer.position().step,
        "seconds": summary.seconds,
        "tokens_per_s": summary.tokens_per_s,
        "checkpoint": summary.last_checkpoint,
        "params": trainer.num_params(),
        "timing": [trainer.timing()],
    });
    final_report(
        &a,
        &trainer,
        &summary.last_checkpoint,
        progress.events(),
        out,
    )
}

/// TensorBoard event files in the run directory (`tensorboard --logdir RUN`).
fn record_events(progress: &mut Progress, run_dir: &std::path::Path) -> Result<()> {
    progress.record_events(crate::cli::events_in(run_dir)?);
    Ok(())
}

/// Validation loss, BLEU and samples of a trained model, recorded beside its last
/// checkpoint `ckpt` (`metrics.json`, what `shoal info` shows); the JSON summary with
/// `--json`.
pub(crate) fn final_report(
    a: &NmtArgs,
    trainer: &NmtTrainer,
    ckpt: &std::path::Path,
    mut events: Option<&mut shoal_runtime::tensorboard::EventWriter>,
    mut out: serde_json::Value,
) -> Result<()> {
    let step = trainer.position().step;
    let valid_loss = trainer.valid_loss()?;
    shoal_runtime::info::record_metrics(ckpt, &[("valid_loss", valid_loss as f64)])?;
    if let Some(w) = events.as_deref_mut() {
        w.scalar("final/valid_loss", step, valid_loss as f64)?;
        w.flush()?;
    }
    out["valid_loss"] = serde_json::json!(valid_loss);
    println!(
        "validation loss {valid_loss:.3} (perplexity {:.1})",
        valid_loss.exp()
    );
    if !a.no_eval {
        let (bleu, samples) = trainer.valid_bleu()?;
        println!("validation {bleu}");
        let n = trainer.config().eval.samples;
        for s in samples.iter().take(n) {
            println!(
                "  src: {}\n  ref: {}\n  hyp: {}\n",
                s.source, s.reference, s.hypothesis
            );
        }
        out["bleu"] = serde_json::json!(bleu.score);
        shoal_runtime::info::record_metrics(ckpt, &[("bleu", bleu.score)])?;
        if let Some(w) = events {
            w.scalar("final/bleu", step, bleu.score)?;
            w.flush()?;
        }
    }
    if a.json {
        println!("{out}");
    }
    Ok(())
}

/// A distributed run: the launcher starts the coordinator, workers and parameter
/// servers as processes of this program and shows their progress.
pub(crate) fn train_nmt_cluster(
    a: &NmtArgs,
    cfg: NmtTrainConfig,
    resume: Option<(PathBuf, shoal_nmt::trainer::Tokenizers)>,
) -> Result<()> {
    let (run_dir, tok, resume) = match resume {
        Some((dir, tok)) => {
            let ckpt = shoal_runtime::store::resolve(&dir)?;
            let run = ckpt.parent().map(PathBuf::from).unwrap_or_default();
            (run, tok, Some(ckpt))
        }
        None => {
            eprintln!("preparing data and learning subword vocabularies...");
            (a.out.clone(), NmtTrainer::learn_tokenizers(&cfg)?, None)
        }
    };
    let d = &cfg.dist;
    eprintln!(
        "starting {} workers{} on this machine (mode {}); logs in {}",
        d.workers,
        if d.mode == shoal_nmt::config::DistMode::Allreduce {
            String::new()
        } else {
            format!(
                " and {} parameter-server shards ({})",
                d.ps,
                value_name(d.placement)
            )
        },
        value_name(d.mode),
        run_dir.join("job/logs").display()
    );
    if d.max_restarts > 0 || d.fewest_workers() < d.workers {
        eprintln!(
            "elastic: goes on with {} to {} workers, restarting from its last checkpoint up to \
             {} time(s); changes in {}",
            d.fewest_workers(),
            d.workers,
            d.max_restarts,
            run_dir.join("membership.jsonl").display()
        );
    }
    let opts = shoal_runtime::launch::LaunchOptions {
        exe: std::env::current_exe().context("finding this program's path")?,
        args: vec!["role".into()],
        resume,
        timeline: (!cfg.train.timeline.is_empty()).then(|| PathBuf::from(&cfg.train.timeline)),
    };
    let mut progress = Progress::new(cfg.train.epochs, false);
    record_events(&mut progress, &run_dir)?;
    let summary = shoal_nmt::job::launch(&cfg, &run_dir, &tok, &opts, |e, rates| {
        let per: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
        progress.set_detail(format!(" (workers: {})", per.join(" + ")));
        progress.on_event(e);
    });
    progress.finish();
    let summary = summary?;
    let per: Vec<String> = summary
        .worker_tokens_per_s
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect();
    eprintln!(
        "trained {} steps in {:.0} s: {:.0} target tokens/s ({} per worker); checkpoint {}",
        summary.steps,
        summary.seconds,
        summary.tokens_per_s,
        per.join(" + "),
        summary.last_checkpoint.display()
    );
    let trainer = NmtTrainer::resume(&summary.last_checkpoint, |c| Ok(c.clone()))?;
    let out = serde_json::json!({
        "steps": trainer.position().step,
        "seconds": summary.seconds,
        "tokens_per_s": summary.tokens_per_s,
        "params": trainer.num_params(),
        "worker_tokens_per_s": summary.worker_tokens_per_s,
        "timing": summary.timing,
        "checkpoint": summary.last_checkpoint,
    });
    final_report(
        a,
        &trainer,
        &summary.last_checkpoint,
        progress.events(),
        out,
    )
}
