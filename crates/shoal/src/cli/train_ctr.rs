//! `shoal train ctr`: the CTR trainer's flags and the run (one process, or workers and
//! parameter-server shards as local processes).

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use shoal_nmt::config::DistMode;
use std::path::PathBuf;

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

#[derive(Args)]
pub(crate) struct CtrArgs {
    #[arg(long, value_enum, default_value = "deepfm")]
    pub(crate) model: shoal_ctr::CtrKind,
    /// Click log: CSV with a header (Criteo: label,I1..I13,C1..C26; Avazu: id,click,...)
    /// libffm (`label field:feature:value ...`) or libsvm with one feature per field
    /// (`label feature:value ...`).
    #[arg(long, required_unless_present = "resume")]
    pub(crate) data: Option<PathBuf>,
    /// Continue the run saved in this model directory (one process; --epochs and
    /// --max-steps may change).
    #[arg(long)]
    pub(crate) resume: Option<PathBuf>,
    /// Skip malformed rows (counted) instead of stopping at the first.
    #[arg(long)]
    pub(crate) skip_bad_rows: bool,
    /// Fraction of rows held out for AUC and log loss.
    #[arg(long, default_value_t = 0.1)]
    pub(crate) valid_fraction: f64,
    /// Planted probabilities (from `shoal data gen-ctr`) to report the best AUC.
    #[arg(long)]
    pub(crate) planted: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub(crate) dim: usize,
    /// MLP hidden widths, comma-separated.
    #[arg(long, default_value = "128,64")]
    pub(crate) hidden: String,
    #[arg(long, default_value_t = 256)]
    pub(crate) batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub(crate) epochs: u64,
    #[arg(long, default_value_t = 0)]
    pub(crate) max_steps: u64,
    /// Dense (MLP) learning rate, Adam.
    #[arg(long, default_value_t = 1e-3)]
    pub(crate) lr: f32,
    /// Sparse rows' learning rate.
    #[arg(long, default_value_t = 0.05)]
    pub(crate) sparse_lr: f32,
    #[arg(long, value_enum, default_value = "adagrad")]
    pub(crate) sparse_opt: SparseOpt,
    /// Frequency filter: keys seen in fewer training rows share a per-field row.
    #[arg(long, default_value_t = 1)]
    pub(crate) min_count: u32,
    /// Eviction: every N updates, drop the rows not updated in the last N (0: off).
    #[arg(long, default_value_t = 0)]
    pub(crate) evict_idle_steps: u64,
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Where to save the model.
    #[arg(long, default_value = "runs/ctr")]
    pub(crate) out: PathBuf,
    /// Worker processes (the rows then live on parameter servers: give --ps).
    #[arg(long, default_value_t = 1)]
    pub(crate) workers: usize,
    /// Parameter-server shards (sets --mode ps-sync unless given).
    #[arg(long, default_value_t = 0)]
    pub(crate) ps: usize,
    #[arg(long, value_enum)]
    pub(crate) mode: Option<shoal_runtime::dist::DistMode>,
    #[arg(long, value_enum, default_value = "separate")]
    pub(crate) ps_placement: shoal_runtime::dist::Placement,
    /// Print the final scores as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(a: CtrArgs) -> Result<()> {
    use shoal_ctr::trainer::{CtrTrainConfig, CtrTrainer};
    let hidden = a
        .hidden
        .split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| x.trim().parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .with_context(|| format!("--hidden '{}': expected widths like 128,64", a.hidden))?;
    let cfg = CtrTrainConfig {
        kind: a.model,
        dim: a.dim,
        hidden,
        data: a.data.clone().unwrap_or_default(),
        skip_bad_rows: a.skip_bad_rows,
        valid_fraction: a.valid_fraction,
        planted: a.planted.clone(),
        batch_size: a.batch_size,
        epochs: a.epochs,
        max_steps: a.max_steps,
        lr: a.lr,
        sparse_lr: a.sparse_lr,
        sparse_rule: sparse_rule(a.sparse_opt),
        min_count: a.min_count,
        evict_idle_steps: a.evict_idle_steps,
        dist: shoal_runtime::dist::DistSection {
            workers: a.workers,
            ps: a.ps,
            mode: match (a.mode, a.ps) {
                (Some(m), _) => m,
                (None, 0) => DistMode::Allreduce,
                (None, _) => DistMode::PsSync,
            },
            placement: a.ps_placement,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut t = match &a.resume {
        Some(dir) => {
            let saved = shoal_ctr::trainer::CtrTrainConfig::saved_in(dir)?;
            if saved.dist.is_cluster() {
                let cfg = shoal_ctr::trainer::CtrTrainConfig {
                    epochs: a.epochs,
                    max_steps: a.max_steps,
                    ..saved
                };
                return train_ctr_cluster(&a, cfg, Some(dir.clone()));
            }
            eprintln!("resuming {}...", dir.display());
            let (epochs, max_steps) = (a.epochs, a.max_steps);
            CtrTrainer::resume(dir, |c| {
                c.epochs = epochs;
                c.max_steps = max_steps;
            })?
        }
        None => {
            cfg.validate()?;
            if cfg.dist.is_cluster() {
                return train_ctr_cluster(&a, cfg, None);
            }
            eprintln!("reading {}...", cfg.data.display());
            CtrTrainer::new(cfg)?
        }
    };
    let mut progress = shoal_ctr::progress::CtrProgress::new(a.epochs);
    let eval = t.run(|e| progress.on_event(e));
    progress.finish();
    let eval = eval?;
    t.save(&a.out)?;
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
        "starting {} workers and {} parameter-server shards ({:?}, {:?}); logs in {}",
        d.workers,
        d.ps,
        d.mode,
        d.placement,
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
    };
    let mut last = std::time::Instant::now();
    let mut eval = None;
    let summary = launch_job(&d, 1, &run_dir, &opts, |r, rates| match r {
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
    })?;
    let (auc, logloss, planted_auc) = eval.context("worker 0 reported no evaluation")?;
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
