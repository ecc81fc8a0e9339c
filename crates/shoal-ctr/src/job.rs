//! CTR training as a job of several processes: the job's file (`RUN/job/ctr.json`: the
//! configuration and where worker 0 saves the model) and the CTR worker a process of
//! the job runs against the parameter-server shards that hold the rows ([`CtrJob`], the
//! runtime's [`JobKind`]).

use crate::model::{CtrConfig, CtrModel};
use crate::trainer::{ctr_shard_config, CtrEvent, CtrTrainConfig, CtrTrainer};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use shoal_comm::ps::{PsMode, ShardConfig};
use shoal_data::ctr::BadRows;
use shoal_runtime::dist::{DistMode, DistSection};
use shoal_runtime::exchange::{Attachment, PhaseTimes};
use shoal_runtime::launch::{write_kind, Report};
use shoal_runtime::role::{emit, JobKind, Worker};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

impl JobKind for CtrJob {
    type Error = Error;
    const KIND: &'static str = "ctr";
    const UNIT: &'static str = "rows";

    fn read(job: &Path) -> Result<Self> {
        read_ctr_job(job)
    }

    /// Worker 0 saves the model to `RUN/model`.
    fn prepare(config: &Path, run_dir: &Path) -> Result<DistSection> {
        let cfg = read_ctr_config(config)?;
        cfg.validate()?;
        let d = cfg.dist.clone();
        let out = run_dir.join("model");
        write_ctr_job(run_dir, &CtrJob { cfg, out })?;
        Ok(d)
    }

    fn dist(&self) -> &DistSection {
        &self.cfg.dist
    }

    /// The rows live on the shards whatever the mode.
    fn needs_shards(&self) -> bool {
        true
    }

    fn shard_shape(&self) -> Result<(usize, usize)> {
        ctr_shape(&self.cfg)
    }

    fn shard_config(&self, width: usize, token: &str) -> ShardConfig {
        let d = &self.cfg.dist;
        let mode = match d.mode {
            DistMode::PsAsync => PsMode::Async {
                max_staleness: (d.max_staleness > 0).then_some(d.max_staleness),
            },
            _ => PsMode::Sync,
        };
        ctr_shard_config(&self.cfg, width, d.workers, mode, token)
    }

    fn run_worker(self, w: Worker) -> Result<()> {
        ctr_worker(self, w.resume.as_deref(), w.attachment)
    }
}

/// Reads a CTR job's training configuration (a [`CtrTrainConfig`] as TOML), lets
/// `adjust` change its `[dist]` section, validates it, and returns it as TOML text with
/// the resulting job shape (`shoal launch --k8s`).
pub fn job_config(
    path: &Path,
    adjust: impl FnOnce(&mut DistSection),
) -> Result<(String, DistSection)> {
    let mut cfg = read_ctr_config(path)?;
    adjust(&mut cfg.dist);
    cfg.validate()?;
    let text = toml::to_string(&cfg).map_err(|e| Error::Config(e.to_string()))?;
    Ok((text, cfg.dist))
}

/// A CTR job: its configuration and where worker 0 saves the model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CtrJob {
    pub cfg: CtrTrainConfig,
    pub out: PathBuf,
}

/// Writes a CTR job's files into `RUN/job`.
pub fn write_ctr_job(run_dir: &Path, j: &CtrJob) -> Result<()> {
    let job = run_dir.join("job");
    std::fs::create_dir_all(job.join("logs")).map_err(crate::error::io_err(&job))?;
    write_kind(&job, "ctr")?;
    let p = job.join("ctr.json");
    let text = serde_json::to_string_pretty(j).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(&p, text).map_err(crate::error::io_err(&p))
}

fn read_ctr_job(job: &Path) -> Result<CtrJob> {
    let p = job.join("ctr.json");
    let text = std::fs::read_to_string(&p).map_err(crate::error::io_err(&p))?;
    serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", p.display())))
}

/// The dense length and row width of a CTR job's model (fields from the data header).
fn ctr_shape(cfg: &CtrTrainConfig) -> Result<(usize, usize)> {
    let f = std::fs::File::open(&cfg.data).map_err(crate::error::io_err(&cfg.data))?;
    let mut header = String::new();
    BufReader::new(f)
        .read_line(&mut header)
        .map_err(crate::error::io_err(&cfg.data))?;
    let fields = if header.contains(',') {
        shoal_data::ctr::Schema::from_header(&header).fields.len()
    } else {
        // libffm/libsvm: the field count comes from the rows.
        shoal_data::ctr::read_click_log(&cfg.data, BadRows::Skip)?
            .0
            .fields
    };
    let m = CtrModel::new(CtrConfig {
        kind: cfg.kind,
        fields,
        dim: cfg.dim,
        hidden: cfg.hidden.clone(),
    })?;
    Ok((m.dense_len(), m.cfg.row_width()))
}

fn read_ctr_config(path: &Path) -> Result<CtrTrainConfig> {
    let text = std::fs::read_to_string(path).map_err(crate::error::io_err(path))?;
    toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// A CTR worker against the job's shards; worker 0 evaluates and saves the model.
fn ctr_worker(j: CtrJob, resume: Option<&Path>, attachment: Attachment) -> Result<()> {
    let mut t = match resume {
        Some(p) => CtrTrainer::resume(p, |c| {
            c.epochs = j.cfg.epochs;
            c.max_steps = j.cfg.max_steps;
        })?,
        None => CtrTrainer::new(j.cfg)?,
    };
    let rank = attachment.rank();
    t.attach(attachment)?;
    let start = Instant::now();
    let mut pending = 0usize;
    let mut steps = 0u64;
    let mut last_emit = Instant::now();
    let e = t.run(|ev| match ev {
        CtrEvent::Started {
            steps_per_epoch,
            first_step,
            last_step,
            ..
        } => emit(&Report::Started {
            rank,
            total_steps: 0,
            last_step: *last_step,
            time_limit_s: None,
            start_step: *first_step,
            batches_per_epoch: *steps_per_epoch,
            params: 0,
        }),
        CtrEvent::Step {
            step,
            epoch,
            loss,
            rows,
            ..
        } => {
            steps = *step;
            pending += rows;
            // A report every half second, not every update.
            if last_emit.elapsed().as_millis() >= 500 {
                last_emit = Instant::now();
                emit(&Report::Step {
                    rank,
                    step: *step,
                    epoch: *epoch,
                    loss: *loss as f32,
                    grad_norm: 0.0,
                    lr: 0.0,
                    tokens: std::mem::take(&mut pending),
                });
            }
        }
        CtrEvent::Eval { epoch, eval } => {
            let mut scores = BTreeMap::from([
                ("auc".to_string(), eval.auc),
                ("logloss".to_string(), eval.logloss),
            ]);
            if let Some(p) = eval.planted_auc {
                scores.insert("planted_auc".into(), p);
            }
            emit(&Report::Scores {
                epoch: *epoch,
                scores,
            })
        }
    })?;
    let _ = e;
    if rank == 0 {
        t.save(&j.out)?;
    }
    let examples_per_s = t.examples_trained as f64 / t.train_seconds.max(1e-9);
    t.detach()?;
    emit(&Report::Done {
        rank,
        steps,
        seconds: start.elapsed().as_secs_f64(),
        tokens_per_s: examples_per_s,
        timing: PhaseTimes::default(),
        checkpoint: j.out.clone(),
    });
    Ok(())
}
