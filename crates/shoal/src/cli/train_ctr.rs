//! `shoal train ctr`: the CTR trainer's flags and the run (one process, or workers and
//! parameter-server shards as local processes).

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use shoal_nmt::config::DistMode;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum SparseOpt {
    Sgd,
    Adagrad,
    RowAdagrad,
    LazyAdam,
    Ftrl,
}

pub(crate) fn sparse_rule(o: SparseOpt) -> shoal_optim::SparseRule {
    use shoal_optim::SparseRule;
    match o {
        SparseOpt::Sgd => SparseRule::Sgd,
        SparseOpt::Adagrad => SparseRule::Adagrad { eps: 1e-8 },
        SparseOpt::RowAdagrad => SparseRule::RowAdagrad { eps: 1e-8 },
        SparseOpt::LazyAdam => SparseRule::LazyAdam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        SparseOpt::Ftrl => SparseRule::Ftrl {
            beta: 1.0,
            l1: 0.0,
            l2: 0.0,
        },
    }
}

/// Every field can come from `--config FILE` (TOML, `shoal train ctr --print-config`
/// shows them all with their defaults), a flag below, or `--set key=value`; later ones
/// win.
#[derive(Args)]
pub(crate) struct CtrArgs {
    /// TOML configuration file (the fields of `--print-config`).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Override any configuration field, e.g. --set dim=16 or --set dist.ps=2
    /// (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) set: Vec<String>,
    /// Print the resulting configuration as TOML and exit.
    #[arg(long)]
    pub(crate) print_config: bool,
    /// kind (default deepfm).
    #[arg(long, value_enum)]
    pub(crate) model: Option<shoal_ctr::CtrKind>,
    /// data: the click log: CSV with a header (Criteo: label,I1..I13,C1..C26; Avazu:
    /// id,click,...), libffm (`label field:feature:value ...`) or libsvm with one feature
    /// per field (`label feature:value ...`).
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Continue the run saved in this model directory with its saved configuration: one
    /// process, or the same workers and parameter-server shards for a distributed run
    /// (--epochs and --max-steps may change).
    #[arg(long)]
    pub(crate) resume: Option<PathBuf>,
    /// skip_bad_rows: skip malformed rows (counted) instead of stopping at the first.
    #[arg(long)]
    pub(crate) skip_bad_rows: bool,
    /// valid_fraction: rows held out for AUC and log loss (default 0.1).
    #[arg(long)]
    pub(crate) valid_fraction: Option<f64>,
    /// planted: probabilities from `shoal data gen-ctr`, to report the best AUC.
    #[arg(long)]
    pub(crate) planted: Option<PathBuf>,
    /// dim: factor dimension (default 8).
    #[arg(long)]
    pub(crate) dim: Option<usize>,
    /// hidden: MLP widths, comma-separated (default 128,64).
    #[arg(long)]
    pub(crate) hidden: Option<String>,
    /// batch_size (default 256).
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// epochs (default 1).
    #[arg(long)]
    pub(crate) epochs: Option<u64>,
    /// max_steps: stop after this many updates (default 0: no limit).
    #[arg(long)]
    pub(crate) max_steps: Option<u64>,
    /// lr: the MLP's learning rate, Adam (default 1e-3).
    #[arg(long)]
    pub(crate) lr: Option<f32>,
    /// sparse_lr: the rows' learning rate (default 0.05).
    #[arg(long)]
    pub(crate) sparse_lr: Option<f32>,
    /// sparse_rule: the rows' update rule (default adagrad).
    #[arg(long, value_enum)]
    pub(crate) sparse_opt: Option<SparseOpt>,
    /// min_count: keys seen in fewer training rows share a per-field row (default 1).
    #[arg(long)]
    pub(crate) min_count: Option<u32>,
    /// evict_idle_steps: every N updates, drop the rows not updated in the last N
    /// (default 0: off).
    #[arg(long)]
    pub(crate) evict_idle_steps: Option<u64>,
    /// seed (default 1).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Where to save the model.
    #[arg(long, default_value = "runs/ctr")]
    pub(crate) out: PathBuf,
    /// dist.workers: worker processes (the rows then live on parameter servers: give
    /// --ps).
    #[arg(long)]
    pub(crate) workers: Option<usize>,
    /// dist.ps: parameter-server shards (sets --mode ps-sync unless given).
    #[arg(long)]
    pub(crate) ps: Option<usize>,
    /// dist.mode.
    #[arg(long, value_enum)]
    pub(crate) mode: Option<shoal_runtime::dist::DistMode>,
    /// dist.placement (default separate).
    #[arg(long, value_enum)]
    pub(crate) ps_placement: Option<shoal_runtime::dist::Placement>,
    /// dist.transport: the workers' links to the shards (default shm, processes of one
    /// host; tcp otherwise).
    #[arg(long, value_enum)]
    pub(crate) transport: Option<shoal_runtime::dist::DataPlane>,
    /// Print the final scores as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The configuration from its layers: defaults, `--config`, the flags, `--set`.
fn config(a: &CtrArgs) -> Result<shoal_ctr::trainer::CtrTrainConfig> {
    use toml::Value;
    let mut flags: Vec<(&str, Value)> = Vec::new();
    if let Some(m) = a.model {
        flags.push(("kind", Value::try_from(m)?));
    }
    if let Some(d) = &a.data {
        flags.push(("data", Value::String(d.display().to_string())));
    }
    if a.skip_bad_rows {
        flags.push(("skip_bad_rows", Value::Boolean(true)));
    }
    if let Some(v) = a.valid_fraction {
        flags.push(("valid_fraction", Value::Float(v)));
    }
    if let Some(p) = &a.planted {
        flags.push(("planted", Value::String(p.display().to_string())));
    }
    if let Some(v) = a.dim {
        flags.push(("dim", Value::Integer(v as i64)));
    }
    if let Some(h) = &a.hidden {
        let widths = h
            .split(',')
            .filter(|x| !x.trim().is_empty())
            .map(|x| x.trim().parse::<i64>().map(Value::Integer))
            .collect::<std::result::Result<Vec<_>, _>>()
            .with_context(|| format!("--hidden '{h}': expected widths like 128,64"))?;
        flags.push(("hidden", Value::Array(widths)));
    }
    for (k, v) in [
        ("batch_size", a.batch_size.map(|v| v as u64)),
        ("epochs", a.epochs),
        ("max_steps", a.max_steps),
        ("min_count", a.min_count.map(u64::from)),
        ("evict_idle_steps", a.evict_idle_steps),
        ("seed", a.seed),
        ("dist.workers", a.workers.map(|v| v as u64)),
        ("dist.ps", a.ps.map(|v| v as u64)),
    ] {
        if let Some(v) = v {
            flags.push((k, Value::Integer(v as i64)));
        }
    }
    if let Some(v) = a.lr {
        flags.push(("lr", Value::Float(v as f64)));
    }
    if let Some(v) = a.sparse_lr {
        flags.push(("sparse_lr", Value::Float(v as f64)));
    }
    if let Some(o) = a.sparse_opt {
        flags.push(("sparse_rule", Value::try_from(sparse_rule(o))?));
    }
    match (a.mode, a.ps) {
        (Some(m), _) => flags.push(("dist.mode", Value::try_from(m)?)),
        (None, Some(n)) if n > 0 => flags.push(("dist.mode", Value::try_from(DistMode::PsSync)?)),
        _ => {}
    }
    if let Some(p) = a.ps_placement {
        flags.push(("dist.placement", Value::try_from(p)?));
    }
    if let Some(p) = a.transport {
        flags.push(("dist.transport", Value::try_from(p)?));
    }
    let set = super::key_values(&a.set)?;
    Ok(shoal_runtime::config::layered(
        a.config.as_deref(),
        &flags,
        &set,
    )?)
}

pub(crate) fn run(a: CtrArgs) -> Result<()> {
    use shoal_ctr::trainer::CtrTrainer;
    let cfg = config(&a)?;
    if a.print_config {
        print!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    let mut t = match &a.resume {
        Some(dir) => {
            let saved = shoal_ctr::trainer::CtrTrainConfig::saved_in(dir)?;
            // Only the stopping rules may change (the flags that say so, else the run's
            // own; the flags' defaults are the configuration's).
            let (epochs, max_steps) = (cfg.epochs, cfg.max_steps);
            if saved.dist.is_cluster() {
                let cfg = shoal_ctr::trainer::CtrTrainConfig {
                    epochs,
                    max_steps,
                    ..saved
                };
                return train_ctr_cluster(&a, cfg, Some(dir.clone()));
            }
            eprintln!("resuming {}...", dir.display());
            CtrTrainer::resume(dir, |c| {
                c.epochs = epochs;
                c.max_steps = max_steps;
            })?
        }
        None => {
            if a.data.is_none() && a.config.is_none() {
                bail!("give the click log: --data FILE (or data in --config)");
            }
            cfg.validate()?;
            if cfg.dist.is_cluster() {
                return train_ctr_cluster(&a, cfg, None);
            }
            eprintln!("reading {}...", cfg.data.display());
            CtrTrainer::new(cfg)?
        }
    };
    let mut progress = shoal_ctr::progress::CtrProgress::new(t.cfg.epochs);
    progress.record_events(crate::cli::events_in(&a.out)?);
    let eval = t.run(|e| progress.on_event(e));
    progress.finish();
    let eval = eval?;
    t.save(&a.out)?;
    record_scores(&a.out, eval.auc, eval.logloss, eval.planted_auc)?;
    println!(
        "held-out AUC {:.4}, logloss {:.4}; {} sparse rows; model saved to {}",
        eval.auc,
        eval.logloss,
        t.table.len(),
        a.out.display()
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({"auc": eval.auc, "logloss": eval.logloss, "planted_auc": eval.planted_auc,
                "examples_per_s": t.examples_trained as f64 / t.train_seconds.max(1e-9),
                "train_seconds": t.train_seconds,
                "rows_touched": t.table.len(), "table_bytes": t.table.bytes(), "checkpoint": a.out})
        );
    }
    Ok(())
}

/// CTR training as worker and shard processes of this program.
pub(crate) fn train_ctr_cluster(
    a: &CtrArgs,
    cfg: shoal_ctr::trainer::CtrTrainConfig,
    resume: Option<PathBuf>,
) -> Result<()> {
    use shoal_ctr::job::{write_ctr_job, CtrJob};
    use shoal_runtime::launch::{launch_job, LaunchOptions, Report};
    let run_dir = PathBuf::from(format!("{}.cluster", a.out.display()));
    let d = cfg.dist.clone();
    write_ctr_job(
        &run_dir,
        &CtrJob {
            cfg,
            out: a.out.clone(),
        },
    )?;
    eprintln!(
        "starting {} workers and {} parameter-server shards ({}, {}); logs in {}",
        d.workers,
        d.ps,
        super::value_name(d.mode),
        super::value_name(d.placement),
        run_dir.join("job/logs").display()
    );
    // A resumed job reads its checkpoint before the model is saved over it.
    let resume = match resume {
        Some(dir) if dir == a.out => {
            let copy = run_dir.join("resume-from");
            let _ = std::fs::remove_dir_all(&copy);
            std::fs::create_dir_all(&copy)?;
            std::fs::copy(
                dir.join("model.safetensors"),
                copy.join("model.safetensors"),
            )
            .with_context(|| format!("copying {}", dir.display()))?;
            Some(copy)
        }
        other => other,
    };
    let opts = LaunchOptions {
        exe: std::env::current_exe().context("finding this program's path")?,
        args: vec!["role".into()],
        resume,
        timeline: None,
    };
    let mut last = std::time::Instant::now();
    let mut eval = None;
    let mut report = |r: &Report, rates: &[f64]| match r {
        Report::Step {
            rank: 0,
            step,
            epoch,
            loss,
            ..
        } if last.elapsed().as_secs_f64() >= 5.0 => {
            last = std::time::Instant::now();
            let per: Vec<String> = rates.iter().map(|x| format!("{x:.0}")).collect();
            eprintln!(
                "epoch {} step {step}: logloss {loss:.4}, {:.0} examples/s (workers: {})",
                epoch + 1,
                rates.iter().sum::<f64>(),
                per.join(" + ")
            );
        }
        Report::Scores { epoch, scores } => {
            let (Some(auc), Some(logloss)) = (scores.get("auc"), scores.get("logloss")) else {
                return;
            };
            let planted_auc = scores.get("planted_auc");
            eprintln!(
                "epoch {} held-out AUC {auc:.4}, logloss {logloss:.4}{}",
                epoch + 1,
                planted_auc
                    .map(|p| format!(" (planted model's AUC {p:.4})"))
                    .unwrap_or_default()
            );
            eval = Some((*auc, *logloss, planted_auc.copied()));
        }
        _ => {}
    };
    // The job's scalars from worker 0's reports, beside the model (as one process).
    let mut events = shoal_runtime::tensorboard::Recorder::new(crate::cli::events_in(&a.out)?);
    let mut last_step = 0;
    let summary = launch_job(&d, 1, &run_dir, &opts, |r, rates| {
        let e = match r {
            Report::Step {
                rank: 0,
                step,
                loss,
                ..
            } => {
                last_step = *step;
                let speed = rates.iter().sum::<f64>();
                let s = [
                    ("train/logloss", *loss as f64),
                    ("train/examples_per_s", speed),
                ];
                events.record(*step, &s, false)
            }
            Report::Scores { scores, .. } => {
                let pick = |k: &str| scores.get(k).copied().unwrap_or(f64::NAN);
                let s = [
                    ("valid/auc", pick("auc")),
                    ("valid/logloss", pick("logloss")),
                ];
                events.record(last_step, &s, true)
            }
            _ => None,
        };
        if let Some(e) = e {
            eprintln!("{e}");
        }
        report(r, rates)
    })?;
    if let Some(e) = events.record(last_step, &[], true) {
        eprintln!("{e}");
    }
    let (auc, logloss, planted_auc) = eval.context("worker 0 reported no evaluation")?;
    record_scores(&a.out, auc, logloss, planted_auc)?;
    println!(
        "held-out AUC {auc:.4}, logloss {logloss:.4}; {:.0} examples/s ({} per worker); model saved to {}",
        summary.tokens_per_s,
        summary
            .worker_tokens_per_s
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" + "),
        a.out.display()
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({"auc": auc, "logloss": logloss, "planted_auc": planted_auc,
                "examples_per_s": summary.tokens_per_s, "worker_examples_per_s": summary.worker_tokens_per_s,
                "checkpoint": a.out})
        );
    }
    Ok(())
}

/// The held-out scores, beside the saved model (`metrics.json`, what `shoal info` shows).
fn record_scores(dir: &Path, auc: f64, logloss: f64, planted_auc: Option<f64>) -> Result<()> {
    let mut m = vec![("auc", auc), ("logloss", logloss)];
    m.extend(planted_auc.map(|p| ("planted_auc", p)));
    Ok(shoal_runtime::info::record_metrics(dir, &m)?)
}
