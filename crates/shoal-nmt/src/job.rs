//! NMT training as a job of several processes: the job's files (configuration and
//! tokenizers in `RUN/job`), the launcher of the embedded local cluster for an NMT run
//! (the runtime's, with worker 0's reports turned into the trainer's events), and the
//! NMT worker a process of the job runs ([`NmtJob`], the runtime's [`JobKind`]).

use crate::checkpoint;
use crate::config::NmtTrainConfig;
use crate::trainer::{Event, NmtTrainer, StepStats, Tokenizers};
use crate::{Cpu, Error, FlatLayout, Result};
use shoal_comm::ps::{PsMode, ShardConfig};
use shoal_data::SubwordTokenizer;
use shoal_runtime::dist::{DistMode, DistSection};
use shoal_runtime::exchange::Attachment;
use shoal_runtime::launch::{launch_job, write_kind, ClusterSummary, LaunchOptions, Report};
use shoal_runtime::role::{emit, JobKind, Worker};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An NMT job: its configuration and the tokenizers every process shares.
pub struct NmtJob {
    pub cfg: NmtTrainConfig,
    pub tok: Tokenizers,
}

impl JobKind for NmtJob {
    type Error = Error;
    const KIND: &'static str = "nmt";
    const UNIT: &'static str = "target tokens";

    fn read(job: &Path) -> Result<Self> {
        let (cfg, tok) = read_job(job)?;
        Ok(Self { cfg, tok })
    }

    /// Learns the subword vocabularies and writes the job's files.
    fn prepare(config: &Path, run_dir: &Path) -> Result<DistSection> {
        let cfg = NmtTrainConfig::load(Some(config), &[])?;
        let tok = NmtTrainer::learn_tokenizers(&cfg)?;
        write_job(&run_dir.join("job"), &cfg, &tok)?;
        Ok(cfg.dist)
    }

    fn dist(&self) -> &DistSection {
        &self.cfg.dist
    }

    fn shard_shape(&self) -> Result<(usize, usize)> {
        Ok((param_count(&self.cfg, &self.tok)?, 0))
    }

    fn shard_config(&self, _width: usize, token: &str) -> ShardConfig {
        shard_config(&self.cfg, token)
    }

    fn run_worker(self, w: Worker) -> Result<()> {
        worker(
            self.cfg,
            &w.run_dir,
            self.tok,
            w.resume.as_deref(),
            w.attachment,
        )
    }
}

/// Reads an NMT job's training configuration, lets `adjust` change its `[dist]`
/// section, validates it, and returns it as TOML text with the resulting job shape
/// (`shoal launch --k8s`).
pub fn job_config(
    path: &Path,
    adjust: impl FnOnce(&mut DistSection),
) -> Result<(String, DistSection)> {
    let mut cfg = NmtTrainConfig::load(Some(path), &[])?;
    adjust(&mut cfg.dist);
    cfg.validate()?;
    Ok((cfg.to_toml(), cfg.dist))
}

fn job_files(job: &Path) -> [PathBuf; 3] {
    [
        job.join("config.toml"),
        job.join("src_tokenizer.json"),
        job.join("tgt_tokenizer.json"),
    ]
}

fn write_job(job: &Path, cfg: &NmtTrainConfig, tok: &Tokenizers) -> Result<()> {
    std::fs::create_dir_all(job.join("logs")).map_err(crate::error::io_err(job))?;
    write_kind(job, "nmt")?;
    let [c, s, t] = job_files(job);
    for (path, text) in [
        (c, cfg.to_toml()),
        (s, tok.src.to_json()?),
        (t, tok.tgt.to_json()?),
    ] {
        std::fs::write(&path, text).map_err(crate::error::io_err(&path))?;
    }
    Ok(())
}

fn read_job(job: &Path) -> Result<(NmtTrainConfig, Tokenizers)> {
    let [c, s, t] = job_files(job);
    let cfg = NmtTrainConfig::load(Some(&c), &[])?;
    let read = |p: &Path| std::fs::read_to_string(p).map_err(crate::error::io_err(p));
    let tok = Tokenizers {
        src: SubwordTokenizer::from_json(&read(&s)?)?,
        tgt: SubwordTokenizer::from_json(&read(&t)?)?,
    };
    Ok((cfg, tok))
}

/// Number of values in the model's flat parameter buffer.
fn param_count(cfg: &NmtTrainConfig, tok: &Tokenizers) -> Result<usize> {
    let model = cfg
        .model_config(tok.src.vocab_size(), tok.tgt.vocab_size())
        .init::<Cpu>(&Default::default())?;
    Ok(FlatLayout::of(&model).total)
}

/// Runs a distributed job on this machine: writes the job directory, starts the
/// coordinator, `dist.workers` worker processes and the separate parameter servers,
/// and relays their progress to `on_event` (with the per-worker target tokens/s).
/// Returns when every process has finished; the first process that fails stops the
/// others and is named in the error, with the end of its log.
pub fn launch(
    cfg: &NmtTrainConfig,
    run_dir: &Path,
    tok: &Tokenizers,
    opts: &LaunchOptions,
    mut on_event: impl FnMut(&Event, &[f64]),
) -> Result<ClusterSummary> {
    write_job(&run_dir.join("job"), cfg, tok)?;
    Ok(launch_job(
        &cfg.dist,
        cfg.train.threads,
        run_dir,
        opts,
        |r, rates| {
            if let Some(mut e) = nmt_event(r) {
                if let Event::Step { tokens_per_s, .. } = &mut e {
                    *tokens_per_s = rates.iter().sum();
                }
                on_event(&e, rates)
            }
        },
    )?)
}

/// The NMT progress event of worker 0's report (tokens/s: the job's, added by the
/// caller from the rates).
fn nmt_event(r: &Report) -> Option<Event> {
    if let Some(text) = r.membership_text() {
        return Some(Event::Membership { text });
    }
    Some(match r.clone() {
        Report::Started {
            rank: 0,
            total_steps,
            last_step,
            time_limit_s,
            start_step,
            batches_per_epoch,
            params,
        } => Event::Started {
            total_steps,
            last_step,
            time_limit_s,
            start_step,
            batches_per_epoch,
            params,
        },
        Report::Step {
            rank: 0,
            step,
            epoch,
            loss,
            grad_norm,
            lr,
            tokens,
        } => Event::Step {
            step,
            epoch,
            stats: StepStats {
                loss,
                grad_norm,
                lr,
                tgt_tokens: tokens,
            },
            tokens_per_s: f64::NAN,
        },
        Report::EpochEnd { epoch, valid_loss } => Event::EpochEnd { epoch, valid_loss },
        Report::Checkpoint { step, path } => Event::Checkpoint { step, path },
        _ => return None,
    })
}

/// The shard settings of a job.
pub fn shard_config(cfg: &NmtTrainConfig, token: &str) -> ShardConfig {
    let d = &cfg.dist;
    ShardConfig {
        workers: d.workers,
        mode: match d.mode {
            DistMode::PsAsync => PsMode::Async {
                max_staleness: (d.max_staleness > 0).then_some(d.max_staleness),
            },
            _ => PsMode::Sync,
        },
        optimizer: cfg.train.optimizer_config(),
        lr: cfg.train.lr as f32,
        average: true,
        sparse_dim: 0,
        token: token.into(),
        // Pulls wait while rank 0 validates or checkpoints; dead peers are found by
        // their closed connections and the heartbeat, not by this.
        timeout: Duration::from_secs(600),
        ..Default::default()
    }
}

fn worker(
    cfg: NmtTrainConfig,
    run_dir: &Path,
    tok: Tokenizers,
    resume: Option<&Path>,
    attachment: Attachment,
) -> Result<()> {
    let mut t = match resume {
        Some(p) => NmtTrainer::resume(p, |_| Ok(cfg.clone()))?,
        None => NmtTrainer::with_tokenizers(cfg, run_dir, Some(tok))?,
    };
    let rank = attachment.rank();
    t.attach(attachment)?;
    let summary = t.run(|e| match e {
        Event::Started {
            total_steps,
            last_step,
            time_limit_s,
            start_step,
            batches_per_epoch,
            params,
        } => emit(&Report::Started {
            rank,
            total_steps: *total_steps,
            last_step: *last_step,
            time_limit_s: *time_limit_s,
            start_step: *start_step,
            batches_per_epoch: *batches_per_epoch,
            params: *params,
        }),
        Event::Step {
            step, epoch, stats, ..
        } => emit(&Report::Step {
            rank,
            step: *step,
            epoch: *epoch,
            loss: stats.loss,
            grad_norm: stats.grad_norm,
            lr: stats.lr,
            tokens: stats.tgt_tokens,
        }),
        Event::EpochEnd { epoch, valid_loss } => emit(&Report::EpochEnd {
            epoch: *epoch,
            valid_loss: *valid_loss,
        }),
        Event::Checkpoint { step, path } => emit(&Report::Checkpoint {
            step: *step,
            path: path.clone(),
        }),
        // Refused in distributed jobs (config validation); the launcher's own.
        Event::Validation { .. } | Event::Membership { .. } => {}
    })?;
    if let Some(a) = t.detach() {
        a.close()?;
    }
    emit(&Report::Done {
        rank,
        steps: summary.steps,
        seconds: summary.seconds,
        tokens_per_s: summary.tokens_per_s,
        timing: t.timing(),
        checkpoint: if rank == 0 {
            summary.last_checkpoint
        } else {
            checkpoint::step_dir(run_dir, t.position().step)
        },
    });
    Ok(())
}
