//! CTR training in one process: a click log split into training and held-out rows,
//! batches whose keys are deduplicated, their rows pulled from the sparse table (created
//! on first touch), the model's forward and backward on the host, the summed gradient
//! of each distinct key applied to its row only, the dense parameters updated by Adam;
//! AUC and log loss on the held-out rows after every epoch; checkpoints holding the
//! dense parameters and every touched row with its optimizer state.
//!
//! With parameter servers ([`CtrTrainer::attach`]) the rows and the dense parameters
//! live on the shards instead: each of `N` workers trains on its share of every global
//! batch of `N x batch_size` rows, pulls only the rows its keys touch, and pushes its
//! gradients (dense, and one per distinct key) weighted by its share; in sync mode this
//! is the same computation as one process on the global batch.

use crate::model::{CtrConfig, CtrKind, CtrModel, Workspace};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use shoal_comm::ps::{PsClient, PsMode, PsState, ShardConfig, SparseState};
use shoal_data::ctr::{read_click_log, BadRows, CtrData};
use shoal_data::metrics::{auc, logloss};
use shoal_optim::{Optimizer, OptimizerConfig, SparseRule, SparseTable};
use shoal_runtime::exchange::Attachment;
use shoal_runtime::store::{
    bytes_f32, bytes_u32, bytes_u64, f32_bytes, u32_bytes, u64_bytes, write_dir_atomically,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything a CTR run is configured by (saved in its checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CtrTrainConfig {
    pub kind: CtrKind,
    pub dim: usize,
    pub hidden: Vec<usize>,
    pub data: PathBuf,
    /// Skip malformed rows (counted) instead of failing.
    pub skip_bad_rows: bool,
    /// Fraction of rows held out for AUC and log loss.
    pub valid_fraction: f64,
    /// Planted click probabilities of the rows (from `shoal data gen-ctr`), to report
    /// the best achievable held-out AUC.
    pub planted: Option<PathBuf>,
    pub batch_size: usize,
    pub epochs: u64,
    /// Stop after this many updates (0: no limit).
    pub max_steps: u64,
    /// Dense parameters' learning rate (Adam).
    pub lr: f32,
    /// Sparse rows' learning rate (`sparse_rule`'s).
    pub sparse_lr: f32,
    pub sparse_rule: SparseRule,
    /// Sparse rows start uniform in +-init_scale.
    pub init_scale: f32,
    /// Frequency filter: a key seen in fewer training rows than this shares its field's
    /// "rare" row (1: off). Unseen keys map to it too when scoring.
    #[serde(default = "one")]
    pub min_count: u32,
    /// Eviction: every this many updates, rows not updated during the last this many
    /// are removed (0: off; on parameter servers each shard counts its own updates).
    #[serde(default)]
    pub evict_idle_steps: u64,
    pub seed: u64,
    /// Workers and parameter servers (`shoal train ctr --workers N --ps M`); CTR across
    /// workers needs a ps mode: the rows live on the shards.
    #[serde(default)]
    pub dist: shoal_runtime::dist::DistSection,
}

fn one() -> u32 {
    1
}

/// The key all rare (and unseen) values of field `f` share under the frequency filter.
pub fn rare_key(f: usize) -> u64 {
    shoal_data::ctr::feature_key(f, b"\x00rare")
}

/// Replaces in rows `which` of `data` every key for which `keep` is false by its
/// field's rare key.
fn map_rare(data: &mut CtrData, which: impl Iterator<Item = usize>, keep: impl Fn(u64) -> bool) {
    let f = data.fields;
    for i in which {
        for (j, k) in data.keys[i * f..(i + 1) * f].iter_mut().enumerate() {
            if !keep(*k) {
                *k = rare_key(j);
            }
        }
    }
}

impl Default for CtrTrainConfig {
    fn default() -> Self {
        Self {
            kind: CtrKind::Deepfm,
            dim: 8,
            hidden: vec![128, 64],
            data: PathBuf::from("../shared/data/ctr/criteo_sample.txt"),
            skip_bad_rows: false,
            valid_fraction: 0.1,
            planted: None,
            batch_size: 256,
            epochs: 1,
            max_steps: 0,
            lr: 1e-3,
            sparse_lr: 0.05,
            sparse_rule: SparseRule::Adagrad { eps: 1e-8 },
            init_scale: 0.01,
            seed: 1,
            min_count: 1,
            evict_idle_steps: 0,
            dist: Default::default(),
        }
    }
}

impl CtrTrainConfig {
    /// The configuration saved in a model directory.
    pub fn saved_in(dir: &Path) -> Result<Self> {
        Ok(CtrCheckpoint::configs(dir)?.0)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: &str| Err(Error::Config(format!("{f}: {why}")));
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if !(0.0..1.0).contains(&self.valid_fraction) {
            return bad("valid_fraction", "must be in [0, 1)");
        }
        if !(self.lr > 0.0 && self.sparse_lr > 0.0) {
            return bad("lr/sparse_lr", "must be positive");
        }
        if self.epochs == 0 && self.max_steps == 0 {
            return bad("epochs", "must be at least 1 when max_steps is 0");
        }
        let d = &self.dist;
        if self.evict_idle_steps > u32::MAX as u64 {
            return bad("evict_idle_steps", "too large");
        }
        d.validate()?;
        if d.min_workers > 0 || d.max_restarts > 0 {
            return Err(Error::Config(
                "dist.min_workers, dist.max_restarts: CTR jobs do not restart yet (their \
                 sparse rows have no periodic checkpoint); elastic jobs are NMT's for now"
                    .into(),
            ));
        }
        if d.is_cluster() && (d.mode == shoal_runtime::dist::DistMode::Allreduce || d.ps == 0) {
            return bad(
                "workers",
                "CTR across workers keeps its rows on parameter servers: give --ps M (and a ps mode)",
            );
        }
        Ok(())
    }
}

/// What the trainer reports.
#[derive(Debug, Clone)]
pub enum CtrEvent {
    Started {
        train_rows: usize,
        valid_rows: usize,
        skipped_rows: usize,
        steps_per_epoch: usize,
        /// The step this run starts at (a resumed run's) and the one it stops at (the
        /// epochs or `max_steps`, whichever comes first).
        first_step: u64,
        last_step: u64,
    },
    Step {
        step: u64,
        epoch: u64,
        /// Running mean log loss (exponential, 0.99).
        loss: f64,
        /// This update's mean log loss over its batch (this worker's share).
        batch_loss: f64,
        /// The rows of this worker's share of the update.
        rows: usize,
        examples_per_s: f64,
    },
    Eval {
        epoch: u64,
        eval: Eval,
    },
}

/// Held-out scores.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Eval {
    pub auc: f64,
    pub logloss: f64,
    /// The planted model's AUC on the same rows, when known.
    pub planted_auc: Option<f64>,
}

/// Reused per-batch buffers.
#[derive(Default)]
struct Batch {
    keys: Vec<u64>,
    labels: Vec<f32>,
    uniq: Vec<u64>,
    inv: Vec<u32>,
    slot: HashMap<u64, u32>,
    uniq_rows: Vec<f32>,
    rows: Vec<f32>,
    row_grad: Vec<f32>,
    uniq_grad: Vec<f32>,
}

impl Batch {
    /// Gathers examples `idx` of `data` and deduplicates their keys.
    fn fill(&mut self, data: &CtrData, idx: &[usize]) {
        self.keys.clear();
        self.labels.clear();
        for &i in idx {
            self.keys.extend_from_slice(data.row(i));
            self.labels.push(data.labels[i]);
        }
        self.slot.clear();
        self.uniq.clear();
        self.inv.clear();
        for &k in &self.keys {
            let n = self.uniq.len() as u32;
            let s = *self.slot.entry(k).or_insert(n);
            if s == n {
                self.uniq.push(k);
            }
            self.inv.push(s);
        }
    }

    /// Expands the distinct rows into one row per (example, field).
    fn expand(&mut self, w: usize) {
        self.rows.resize(self.inv.len() * w, 0.0);
        for (i, &s) in self.inv.iter().enumerate() {
            let s = s as usize;
            self.rows[i * w..(i + 1) * w].copy_from_slice(&self.uniq_rows[s * w..(s + 1) * w]);
        }
    }

    /// Sums the per-occurrence row gradients into one per distinct key.
    fn reduce(&mut self, w: usize) {
        self.uniq_grad.clear();
        self.uniq_grad.resize(self.uniq.len() * w, 0.0);
        for (i, &s) in self.inv.iter().enumerate() {
            let s = s as usize;
            for (d, g) in self.uniq_grad[s * w..(s + 1) * w]
                .iter_mut()
                .zip(&self.row_grad[i * w..(i + 1) * w])
            {
                *d += g;
            }
        }
    }
}

/// A CTR model being trained.
pub struct CtrTrainer {
    pub cfg: CtrTrainConfig,
    pub model: CtrModel,
    pub dense: Vec<f32>,
    pub table: SparseTable,
    opt: Optimizer,
    data: CtrData,
    train_idx: Vec<usize>,
    valid_idx: Vec<usize>,
    planted: Option<Vec<f32>>,
    skipped: usize,
    step: u64,
    ws: Workspace,
    batch: Batch,
    dense_grad: Vec<f32>,
    /// This worker's place in a job of several (its rows on the shards); None: one
    /// process with a local table.
    ps: Option<Attachment>,
    /// Seconds spent in updates (evaluation excluded) and the examples they trained on.
    pub train_seconds: f64,
    pub examples_trained: usize,
}

/// The shard settings that hold a CTR model: the dense optimizer (Adam) and the sparse
/// rule, learning rate and initialisation of `cfg`.
pub fn ctr_shard_config(
    cfg: &CtrTrainConfig,
    row_width: usize,
    workers: usize,
    mode: PsMode,
    token: &str,
) -> ShardConfig {
    ShardConfig {
        workers,
        mode,
        optimizer: OptimizerConfig::default(),
        lr: cfg.lr,
        average: true,
        sparse_dim: row_width,
        sparse_rule: Some(cfg.sparse_rule),
        sparse_lr: Some(cfg.sparse_lr),
        sparse_init: (cfg.init_scale, cfg.seed),
        sparse_evict_idle: cfg.evict_idle_steps,
        token: token.into(),
        ..Default::default()
    }
}

fn read_planted(path: &Path, rows: usize) -> Result<Vec<f32>> {
    let text = std::fs::read_to_string(path).map_err(crate::error::io_err(path))?;
    let mut out = Vec::with_capacity(rows);
    for (i, l) in text.lines().enumerate() {
        out.push(l.trim().parse::<f32>().map_err(|_| {
            Error::Config(format!(
                "{}:{}: '{l}' is not a probability",
                path.display(),
                i + 1
            ))
        })?);
    }
    if out.len() != rows {
        return Err(Error::Config(format!(
            "{}: {} probabilities for {rows} rows",
            path.display(),
            out.len()
        )));
    }
    Ok(out)
}

impl CtrTrainer {
    /// Reads the data and sets up a fresh model.
    pub fn new(cfg: CtrTrainConfig) -> Result<Self> {
        cfg.validate()?;
        let bad = if cfg.skip_bad_rows {
            BadRows::Skip
        } else {
            BadRows::Fail
        };
        let path = shoal_runtime::data::locate(&cfg.data, "--data")?;
        let (data, schema, report) = read_click_log(&path, bad)?;
        if schema.label_col.is_none() {
            return Err(Error::Config(format!(
                "{}: no label column (label, click or y) to train on",
                cfg.data.display()
            )));
        }
        if data.is_empty() {
            return Err(Error::Config(format!(
                "{}: no usable rows",
                cfg.data.display()
            )));
        }
        let planted = match &cfg.planted {
            Some(p) => Some(read_planted(p, data.len())?),
            None => None,
        };
        let (train_idx, valid_idx) = data.split(cfg.valid_fraction, cfg.seed);
        let mut data = data;
        if cfg.min_count > 1 {
            // Count each key's training rows, then send the rare ones (and, in the
            // held-out rows, the unseen ones) to their field's rare row.
            let mut counts: HashMap<u64, u32> = HashMap::new();
            for &i in &train_idx {
                for &k in data.row(i) {
                    *counts.entry(k).or_insert(0) += 1;
                }
            }
            let min = cfg.min_count;
            let n = data.len();
            map_rare(&mut data, 0..n, |k| {
                counts.get(&k).is_some_and(|&c| c >= min)
            });
        }
        let model = CtrModel::new(CtrConfig {
            kind: cfg.kind,
            fields: data.fields,
            dim: cfg.dim,
            hidden: cfg.hidden.clone(),
        })?;
        let dense = model.init_dense(cfg.seed);
        let opt = Optimizer::new(OptimizerConfig::default(), model.dense_len())?;
        let mut table = SparseTable::new(
            model.cfg.row_width(),
            cfg.sparse_rule,
            cfg.init_scale,
            cfg.seed,
        )?;
        if cfg.evict_idle_steps > 0 {
            table.track_updates();
        }
        let dense_grad = vec![0.0; model.dense_len()];
        Ok(Self {
            cfg,
            model,
            dense,
            table,
            opt,
            data,
            train_idx,
            valid_idx,
            planted,
            skipped: report.skipped,
            step: 0,
            ws: Workspace::default(),
            batch: Batch::default(),
            dense_grad,
            ps: None,
            train_seconds: 0.0,
            examples_trained: 0,
        })
    }

    /// Trains in the place `a` gives in a job of several workers, against the
    /// parameter-server shards that hold the rows (made with [`ctr_shard_config`]):
    /// rank 0 sets the shards' state, and every worker starts from it. An attachment
    /// to an allreduce is refused: CTR's rows live on the shards.
    pub fn attach(&mut self, mut a: Attachment) -> Result<()> {
        let rank = a.rank();
        let Some(client) = a.shards() else {
            return Err(Error::Cluster(
                "a CTR worker needs the parameter-server shards that hold the rows, not an allreduce".into(),
            ));
        };
        if rank == 0 {
            // The shards start from this trainer's state (a resumed run's included). The
            // rows go first: the other workers wait for the dense parameters, so by the
            // time those arrive on a shard (on this same connection, in order) its rows
            // are back too, and no worker can pull a row before it is restored.
            if !self.table.is_empty() {
                let (keys, values) = self.table.rows();
                let (state, steps) = self.table.state();
                client.restore_sparse(&SparseState {
                    keys,
                    values,
                    state,
                    steps,
                })?;
            }
            client.init_state(&PsState {
                applied: self.step,
                optimizer_steps: self.opt.steps(),
                params: self.dense.clone(),
                buffers: self.opt.state_owned(),
            })?;
        }
        client.pull(self.step, &mut self.dense)?;
        self.ps = Some(a);
        Ok(())
    }

    /// Leaves the job (every worker, at the end): the shards are told this worker is
    /// done.
    pub fn detach(&mut self) -> Result<()> {
        if let Some(a) = self.ps.take() {
            a.close()?;
        }
        Ok(())
    }

    /// The shards' client, when attached.
    fn shards(&mut self) -> Option<&mut PsClient> {
        self.ps.as_mut().and_then(Attachment::shards)
    }

    /// The rows of `keys`, from the shards with parameter servers (created there if
    /// new), else from the local table (not created).
    pub fn pull_rows(&mut self, keys: &[u64], out: &mut [f32]) -> Result<()> {
        match self.shards() {
            Some(c) => c.pull_sparse(keys, out)?,
            None => self.table.peek(keys, out),
        }
        Ok(())
    }

    /// One update on examples `idx` (this worker's share of the global batch; it may
    /// be empty with parameter servers); returns the share's summed log loss.
    fn update(&mut self, idx: &[usize]) -> Result<f64> {
        let w = self.model.cfg.row_width();
        let b = &mut self.batch;
        b.fill(&self.data, idx);
        b.uniq_rows.resize(b.uniq.len() * w, 0.0);
        match self.ps.as_mut().and_then(Attachment::shards) {
            Some(c) => c.pull_sparse(&b.uniq, &mut b.uniq_rows)?,
            None => self.table.pull(&b.uniq, &mut b.uniq_rows)?,
        }
        b.expand(w);
        b.row_grad.resize(b.rows.len(), 0.0);
        let loss = if idx.is_empty() {
            self.dense_grad.fill(0.0);
            0.0
        } else {
            self.model.forward_backward(
                &self.dense,
                &b.rows,
                &b.labels,
                idx.len(),
                &mut self.ws,
                &mut self.dense_grad,
                &mut b.row_grad,
            )?
        };
        b.reduce(w);
        match self.ps.as_mut().and_then(Attachment::shards) {
            Some(c) => {
                c.push_weighted(
                    self.step,
                    self.cfg.lr,
                    idx.len() as f32,
                    &self.dense_grad,
                    Some((&b.uniq, &b.uniq_grad)),
                )?;
                c.pull(self.step + 1, &mut self.dense)?;
            }
            None => {
                self.table
                    .apply(&b.uniq, &b.uniq_grad, self.cfg.sparse_lr)?;
                self.opt
                    .step(self.cfg.lr, &mut self.dense, &self.dense_grad)?;
                let every = self.cfg.evict_idle_steps;
                if every > 0 {
                    self.table.tick();
                    if (self.step + 1).is_multiple_of(every) {
                        self.table.evict_idle(every as u32)?;
                    }
                }
            }
        }
        self.step += 1;
        Ok(loss)
    }

    /// Click probabilities of rows `idx` of `data`: rows not in the local table read as
    /// their initial values (nothing is created); with parameter servers the rows come
    /// from the shards.
    pub fn predict(&mut self, data: &CtrData, idx: &[usize]) -> Result<Vec<f32>> {
        let Self {
            model,
            dense,
            table,
            ws,
            batch,
            ps,
            ..
        } = self;
        score(model, dense, ws, batch, data, idx, |keys, out| {
            match ps.as_mut().and_then(Attachment::shards) {
                Some(c) => c.peek_sparse(keys, out)?,
                None => table.peek(keys, out),
            }
            Ok(())
        })
    }

    /// Click probabilities of the held-out rows, in split order.
    pub fn predict_held_out(&mut self) -> Result<Vec<f32>> {
        let idx = self.valid_idx.clone();
        let data = std::mem::take(&mut self.data);
        let probs = self.predict(&data, &idx);
        self.data = data;
        probs
    }

    /// AUC and log loss on the held-out rows.
    pub fn evaluate(&mut self) -> Result<Eval> {
        let idx = self.valid_idx.clone();
        let data = std::mem::take(&mut self.data);
        let probs = self.predict(&data, &idx);
        self.data = data;
        let probs = probs?;
        let labels: Vec<f32> = idx.iter().map(|&i| self.data.labels[i]).collect();
        let planted_auc = self.planted.as_ref().and_then(|p| {
            let pp: Vec<f32> = idx.iter().map(|&i| p[i]).collect();
            auc(&pp, &labels)
        });
        Ok(Eval {
            auc: auc(&probs, &labels).unwrap_or(f64::NAN),
            logloss: logloss(&probs, &labels),
            planted_auc,
        })
    }

    /// The current dense parameters.
    pub fn dense(&self) -> &[f32] {
        &self.dense
    }

    /// Trains for the configured epochs (or steps), evaluating after each epoch (with
    /// parameter servers, only worker 0 evaluates).
    pub fn run(&mut self, mut on_event: impl FnMut(&CtrEvent)) -> Result<Eval> {
        let (rank, workers) = self.ps.as_ref().map_or((0, 1), |a| (a.rank(), a.workers()));
        let bs = self.cfg.batch_size * workers;
        let per_epoch = self.train_idx.len().div_ceil(bs);
        let max_steps = if self.cfg.max_steps > 0 {
            self.cfg.max_steps
        } else {
            u64::MAX
        };
        let epochs = if self.cfg.epochs > 0 {
            self.cfg.epochs
        } else {
            u64::MAX
        };
        on_event(&CtrEvent::Started {
            train_rows: self.train_idx.len(),
            valid_rows: self.valid_idx.len(),
            skipped_rows: self.skipped,
            steps_per_epoch: per_epoch,
            first_step: self.step,
            last_step: epochs.saturating_mul(per_epoch as u64).min(max_steps),
        });
        let mut ema: Option<f64> = None;
        let start = Instant::now();
        let mut seen = 0usize;
        let mut last = None;
        // Where a resumed run left off: its epoch, and the global batches done in it.
        let per = per_epoch.max(1) as u64;
        let (first_epoch, mut skip) = (self.step / per, (self.step % per) as usize);
        'epochs: for epoch in first_epoch..epochs {
            // A seeded shuffle per epoch.
            let mut order = self.train_idx.clone();
            let mut s = self.cfg.seed ^ (epoch + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            for i in (1..order.len()).rev() {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                order.swap(i, ((s >> 33) % (i as u64 + 1)) as usize);
            }
            for global in order.chunks(bs).skip(std::mem::take(&mut skip)) {
                if self.step >= max_steps {
                    if rank == 0 {
                        last = Some(self.evaluate()?);
                        on_event(&CtrEvent::Eval {
                            epoch,
                            eval: last.expect("just set"),
                        });
                    }
                    break 'epochs;
                }
                let (a, b) = shoal_comm::collective::split_range(global.len(), workers, rank);
                let chunk = &global[a..b];
                let t0 = Instant::now();
                let loss = self.update(chunk)? / chunk.len().max(1) as f64;
                self.train_seconds += t0.elapsed().as_secs_f64();
                self.examples_trained += chunk.len();
                if !loss.is_finite() {
                    return Err(Error::Diverged {
                        step: self.step,
                        loss: loss as f32,
                    });
                }
                seen += chunk.len();
                let m = ema.map_or(loss, |e| 0.99 * e + 0.01 * loss);
                ema = Some(m);
                on_event(&CtrEvent::Step {
                    step: self.step,
                    epoch,
                    loss: m,
                    batch_loss: loss,
                    rows: chunk.len(),
                    examples_per_s: seen as f64 / start.elapsed().as_secs_f64().max(1e-9),
                });
            }
            if rank == 0 {
                let e = self.evaluate()?;
                on_event(&CtrEvent::Eval { epoch, eval: e });
                last = Some(e);
            }
        }
        if rank != 0 {
            return Ok(Eval {
                auc: f64::NAN,
                logloss: f64::NAN,
                planted_auc: None,
            });
        }
        last.ok_or_else(|| Error::Config("no training happened".into()))
    }

    /// Writes the model (config, dense parameters, every touched row and its optimizer
    /// state) to `dir` atomically; with parameter servers the rows are fetched from the
    /// shards first (call it on one worker).
    pub fn save(&mut self, dir: &Path) -> Result<()> {
        if let Some(c) = self.shards() {
            // The rows and the MLP's optimizer state live on the shards.
            let st = c.sparse_state()?;
            let dense = c.state()?;
            let mut t = SparseTable::new(
                self.model.cfg.row_width(),
                self.cfg.sparse_rule,
                self.cfg.init_scale,
                self.cfg.seed,
            )?;
            t.restore(&st.keys, &st.values, &st.state, &st.steps)?;
            let extra = Resumable {
                opt_state: dense.buffers,
                opt_steps: dense.optimizer_steps,
                step: self.step,
            };
            return save_ctr(
                dir,
                &self.cfg,
                &self.model.cfg,
                &self.dense,
                &t,
                Some(extra),
            );
        }
        let extra = Resumable {
            opt_state: self.opt.state_owned(),
            opt_steps: self.opt.steps(),
            step: self.step,
        };
        save_ctr(
            dir,
            &self.cfg,
            &self.model.cfg,
            &self.dense,
            &self.table,
            Some(extra),
        )
    }

    /// Continues the run saved at `dir` (one process): the dense parameters, the rows,
    /// both optimizers' state and the position in the data; `adjust` may change the
    /// saved configuration's stopping rules (epochs, max_steps).
    pub fn resume(dir: &Path, adjust: impl FnOnce(&mut CtrTrainConfig)) -> Result<Self> {
        let ck = CtrCheckpoint::load(dir)?;
        let mut cfg = ck.cfg.clone();
        adjust(&mut cfg);
        let mut t = Self::new(cfg)?;
        let fail = |why: String| Error::Checkpoint {
            path: dir.to_path_buf(),
            why,
        };
        if t.model.cfg != ck.model.cfg {
            return Err(fail(
                "its model does not fit the data it was trained on".into(),
            ));
        }
        let Some(step) = ck.step else {
            return Err(fail(
                "it holds no optimizer state (saved from parameter servers)".into(),
            ));
        };
        t.dense = ck.dense;
        t.table = ck.table;
        if t.cfg.evict_idle_steps > 0 {
            t.table.track_updates();
        }
        let bufs: Vec<(&str, &[f32])> = ck
            .dense_opt
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        t.opt.load_state(ck.dense_opt_steps, &bufs)?;
        t.step = step;
        Ok(t)
    }
}

fn save_ctr(
    dir: &Path,
    cfg: &CtrTrainConfig,
    mcfg: &CtrConfig,
    dense: &[f32],
    table: &SparseTable,
    extra: Option<Resumable>,
) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let (keys, values) = table.rows();
    let (state, steps) = table.state();
    let w = table.dim();
    let n = keys.len();
    let (dense_b, keys_b, values_b) = (f32_bytes(dense), u64_bytes(&keys), f32_bytes(&values));
    let (state_b, steps_b) = (f32_bytes(&state), u32_bytes(&steps));
    let err = |e: safetensors::SafeTensorError| Error::Checkpoint {
        path: dir.to_path_buf(),
        why: e.to_string(),
    };
    let mut tensors = vec![
        (
            "dense",
            TensorView::new(Dtype::F32, vec![dense.len()], &dense_b).map_err(err)?,
        ),
        (
            "sparse.keys",
            TensorView::new(Dtype::U64, vec![n], &keys_b).map_err(err)?,
        ),
        (
            "sparse.values",
            TensorView::new(Dtype::F32, vec![n, w], &values_b).map_err(err)?,
        ),
        (
            "sparse.state",
            TensorView::new(Dtype::F32, vec![state.len()], &state_b).map_err(err)?,
        ),
    ];
    if !steps.is_empty() {
        tensors.push((
            "sparse.steps",
            TensorView::new(Dtype::U32, vec![n], &steps_b).map_err(err)?,
        ));
    }
    let empty = Vec::new();
    let opt_state = extra.as_ref().map_or(&empty, |e| &e.opt_state);
    let names: Vec<String> = opt_state
        .iter()
        .map(|(n, _)| format!("dense_opt.{n}"))
        .collect();
    let opt_b: Vec<Vec<u8>> = opt_state.iter().map(|(_, b)| f32_bytes(b)).collect();
    for (((_, b), bytes), name) in opt_state.iter().zip(&opt_b).zip(&names) {
        tensors.push((
            name.as_str(),
            TensorView::new(Dtype::F32, vec![b.len()], bytes).map_err(err)?,
        ));
    }
    let mut meta = HashMap::new();
    let crc = tensors_crc(tensors.iter().map(|(n, t)| (*n, t.data())));
    meta.insert("crc32".to_string(), format!("{crc:08x}"));
    if let Some(e) = &extra {
        meta.insert("step".to_string(), e.step.to_string());
        meta.insert("dense_opt_steps".to_string(), e.opt_steps.to_string());
    }
    meta.insert(
        "train_config".to_string(),
        serde_json::to_string(cfg).map_err(|e| Error::Config(e.to_string()))?,
    );
    meta.insert(
        "model_config".to_string(),
        serde_json::to_string(mcfg).map_err(|e| Error::Config(e.to_string()))?,
    );
    meta.insert(
        "meta_crc32".to_string(),
        format!("{:08x}", metadata_crc(&meta)),
    );
    let bytes = safetensors::serialize(tensors, Some(meta)).map_err(err)?;
    Ok(write_dir_atomically(dir, &[(MODEL_FILE, &bytes)])?)
}

/// CRC32 of a saved model's metadata, every key but `meta_crc32` with its value, in key
/// order: what `meta_crc32` holds (files written before it have none and load
/// unchecked).
fn metadata_crc(md: &HashMap<String, String>) -> u32 {
    let mut all: Vec<(&String, &String)> = md.iter().filter(|(k, _)| *k != "meta_crc32").collect();
    all.sort();
    let mut h = crc32fast::Hasher::new();
    for (k, v) in all {
        for part in [k, v] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
    }
    h.finalize()
}

/// CRC32 of tensors as (name, bytes), taken in name order (the file's own order is the
/// format's business): what `crc32` in a saved model's metadata holds.
fn tensors_crc<'a>(tensors: impl Iterator<Item = (&'a str, &'a [u8])>) -> u32 {
    let mut all: Vec<(&str, &[u8])> = tensors.collect();
    all.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = crc32fast::Hasher::new();
    for (name, data) in all {
        h.update(name.as_bytes());
        h.update(&(data.len() as u64).to_le_bytes());
        h.update(data);
    }
    h.finalize()
}

/// What a resumable checkpoint adds to the model.
struct Resumable {
    opt_state: Vec<(String, Vec<f32>)>,
    opt_steps: u64,
    step: u64,
}

/// A saved CTR model.
struct CtrCheckpoint {
    cfg: CtrTrainConfig,
    model: CtrModel,
    dense: Vec<f32>,
    table: SparseTable,
    dense_opt: Vec<(String, Vec<f32>)>,
    dense_opt_steps: u64,
    /// Updates done (None: saved without optimizer state).
    step: Option<u64>,
}

/// The one file of a saved CTR model.
const MODEL_FILE: &str = "model.safetensors";

fn model_file(dir: &Path) -> PathBuf {
    dir.join(MODEL_FILE)
}

fn checkpoint_error(file: &Path) -> impl Fn(String) -> Error + '_ {
    move |why| Error::Checkpoint {
        path: file.to_path_buf(),
        why,
    }
}

/// The string metadata of a safetensors header.
fn parse_meta(bytes: &[u8], file: &Path) -> Result<HashMap<String, String>> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| checkpoint_error(file)(e.to_string()))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

impl CtrCheckpoint {
    /// The training and model configurations and the rest of the metadata, reading only
    /// the file's header (a table of 10^8 rows is not loaded to learn its settings).
    fn configs(dir: &Path) -> Result<(CtrTrainConfig, CtrConfig, HashMap<String, String>)> {
        use std::io::Read;
        let file = model_file(dir);
        let fail = checkpoint_error(&file);
        let mut f = std::fs::File::open(&file).map_err(crate::error::io_err(&file))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len)
            .map_err(|e| fail(format!("reading its header: {e}")))?;
        let n = u64::from_le_bytes(len);
        if n > 100 << 20 {
            return Err(fail(format!("a header of {n} bytes")));
        }
        let mut head = vec![0u8; n as usize];
        f.read_exact(&mut head)
            .map_err(|e| fail(format!("reading its header: {e}")))?;
        // The header is JSON; its "__metadata__" holds our strings.
        #[derive(serde::Deserialize)]
        struct Header {
            #[serde(rename = "__metadata__", default)]
            metadata: HashMap<String, String>,
        }
        let h: Header =
            serde_json::from_slice(&head).map_err(|e| fail(format!("its header: {e}")))?;
        Self::configs_of(h.metadata, &file)
    }

    fn configs_of(
        md: HashMap<String, String>,
        file: &Path,
    ) -> Result<(CtrTrainConfig, CtrConfig, HashMap<String, String>)> {
        let fail = checkpoint_error(file);
        if let Some(want) = md.get("meta_crc32") {
            let got = metadata_crc(&md);
            if format!("{got:08x}") != *want {
                return Err(fail(format!(
                    "its metadata is corrupt (CRC32 {got:08x}, the file says {want})"
                )));
            }
        }
        let get = |k: &str| {
            md.get(k)
                .cloned()
                .ok_or_else(|| fail(format!("no '{k}' in its metadata")))
        };
        let cfg: CtrTrainConfig =
            serde_json::from_str(&get("train_config")?).map_err(|e| fail(e.to_string()))?;
        let mcfg: CtrConfig =
            serde_json::from_str(&get("model_config")?).map_err(|e| fail(e.to_string()))?;
        Ok((cfg, mcfg, md))
    }

    /// Reads a model saved by [`CtrTrainer::save`].
    pub fn load(dir: &Path) -> Result<Self> {
        let file = model_file(dir);
        let fail = checkpoint_error(&file);
        let bytes = std::fs::read(&file).map_err(crate::error::io_err(&file))?;
        let (cfg, mcfg, md) = Self::configs_of(parse_meta(&bytes, &file)?, &file)?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| fail(e.to_string()))?;
        // Models saved since the checksum exist carry one; older ones load unchecked.
        if let Some(want) = md.get("crc32") {
            let views = st.tensors();
            let got = tensors_crc(views.iter().map(|(n, t)| (n.as_str(), t.data())));
            if format!("{got:08x}") != *want {
                return Err(fail(format!(
                    "its tensors are corrupt (CRC32 {got:08x}, the file says {want})"
                )));
            }
        }
        let model = CtrModel::new(mcfg)?;
        // Weights that are not finite would predict NaN: refused, naming the tensor.
        let f32s = |name: &str| -> Result<Vec<f32>> {
            let t = st.tensor(name).map_err(|e| fail(format!("{name}: {e}")))?;
            let v = bytes_f32(t.data());
            match shoal_runtime::store::first_non_finite(&v) {
                Some((i, x)) => Err(fail(format!(
                    "tensor '{name}' holds a value that is not finite ({x} at index {i})"
                ))),
                None => Ok(v),
            }
        };
        let dense = f32s("dense")?;
        if dense.len() != model.dense_len() {
            return Err(fail(format!(
                "{} dense values for a model of {}",
                dense.len(),
                model.dense_len()
            )));
        }
        let keys = bytes_u64(
            st.tensor("sparse.keys")
                .map_err(|e| fail(format!("sparse.keys: {e}")))?
                .data(),
        );
        let steps = st
            .tensor("sparse.steps")
            .map_or_else(|_| Vec::new(), |t| bytes_u32(t.data()));
        let mut table = SparseTable::new(
            model.cfg.row_width(),
            cfg.sparse_rule,
            cfg.init_scale,
            cfg.seed,
        )?;
        table
            .restore(
                &keys,
                &f32s("sparse.values")?,
                &f32s("sparse.state")?,
                &steps,
            )
            .map_err(|e| fail(e.to_string()))?;
        let mut dense_opt = Vec::new();
        for name in st.names() {
            if let Some(n) = name.strip_prefix("dense_opt.") {
                dense_opt.push((n.to_string(), f32s(name)?));
            }
        }
        let num = |k: &str| -> Result<Option<u64>> {
            md.get(k)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| fail(format!("'{k}' is '{v}'")))
                })
                .transpose()
        };
        Ok(Self {
            cfg,
            model,
            dense,
            table,
            dense_opt,
            dense_opt_steps: num("dense_opt_steps")?.unwrap_or(0),
            step: num("step")?,
        })
    }
}

/// A trained CTR model loaded for scoring.
pub struct CtrPredictor {
    pub model: CtrModel,
    min_count: u32,
    dense: Vec<f32>,
    table: SparseTable,
    ws: Workspace,
    batch: Batch,
}

impl CtrPredictor {
    /// Loads a model saved by [`CtrTrainer::save`].
    pub fn load(dir: &Path) -> Result<Self> {
        let ck = CtrCheckpoint::load(dir)?;
        Ok(Self {
            min_count: ck.cfg.min_count,
            model: ck.model,
            dense: ck.dense,
            table: ck.table,
            ws: Workspace::default(),
            batch: Batch::default(),
        })
    }

    /// Click probabilities of every row of `data`.
    pub fn predict(&mut self, data: &CtrData) -> Result<Vec<f32>> {
        if data.fields != self.model.cfg.fields {
            return Err(Error::Config(format!(
                "the data has {} fields, the model {}",
                data.fields, self.model.cfg.fields
            )));
        }
        let idx: Vec<usize> = (0..data.len()).collect();
        let mut mapped;
        let data = if self.min_count > 1 {
            // Keys the model never kept share their field's rare row.
            mapped = data.clone();
            let n = mapped.len();
            let t = &self.table;
            map_rare(&mut mapped, 0..n, |k| t.get(k).is_some());
            &mapped
        } else {
            data
        };
        let table = &self.table;
        score(
            &self.model,
            &self.dense,
            &mut self.ws,
            &mut self.batch,
            data,
            &idx,
            |keys, out| {
                table.peek(keys, out);
                Ok(())
            },
        )
    }
}

/// Click probabilities of rows `idx` of `data`, in batches of 1,024, the sparse rows of
/// each batch's distinct keys read by `rows`.
fn score(
    model: &CtrModel,
    dense: &[f32],
    ws: &mut Workspace,
    b: &mut Batch,
    data: &CtrData,
    idx: &[usize],
    mut rows: impl FnMut(&[u64], &mut [f32]) -> Result<()>,
) -> Result<Vec<f32>> {
    let w = model.cfg.row_width();
    let mut out = Vec::with_capacity(idx.len());
    for chunk in idx.chunks(1024) {
        b.fill(data, chunk);
        b.uniq_rows.resize(b.uniq.len() * w, 0.0);
        rows(&b.uniq, &mut b.uniq_rows)?;
        b.expand(w);
        model.forward(dense, &b.rows, chunk.len(), ws)?;
        out.extend(ws.logits.iter().map(|z| 1.0 / (1.0 + (-z).exp())));
    }
    Ok(out)
}

/// `shoal info` for a CTR model directory (`None`: not one: no `model.safetensors`
/// with a CTR configuration in its metadata): the model, the data, how far training
/// went, the held-out scores recorded beside it and the commands that use it.
pub fn describe(dir: &Path) -> Result<Option<shoal_runtime::info::Info>> {
    use shoal_runtime::info::config_name as name;
    let file = model_file(dir);
    let Ok(bytes) = std::fs::read(&file) else {
        return Ok(None);
    };
    match parse_meta(&bytes, &file) {
        Ok(md) if md.contains_key("train_config") && md.contains_key("model_config") => {}
        _ => return Ok(None),
    }
    let ck = CtrCheckpoint::load(dir)?;
    let c = &ck.cfg;
    let mut i =
        shoal_runtime::info::Info::new(dir, "ctr-model", "a CTR model (from `shoal train ctr`)");
    let m = &ck.model.cfg;
    i.made(
        "model",
        format!(
            "{} over {} fields, embedding {}, MLP {:?}; {} dense parameters",
            name(&m.kind),
            m.fields,
            m.dim,
            m.hidden,
            ck.dense.len()
        ),
    );
    i.made(
        "rows",
        format!(
            "{} sparse rows of {} values ({} rule, lr {})",
            ck.table.len(),
            m.row_width(),
            name(&c.sparse_rule),
            c.sparse_lr
        ),
    );
    i.made(
        "data",
        format!(
            "{} ({}% held out)",
            c.data.display(),
            c.valid_fraction * 100.0
        ),
    );
    i.made(
        "recipe",
        format!(
            "batch {} x {} worker(s), lr {}, {} epochs, seed {}",
            c.batch_size, c.dist.workers, c.lr, c.epochs, c.seed
        ),
    );
    if c.dist.ps > 0 {
        i.made(
            "distributed",
            format!(
                "{} workers, {} parameter-server shards, mode {}",
                c.dist.workers,
                c.dist.ps,
                name(&c.dist.mode)
            ),
        );
    }
    i.made(
        "trained",
        match ck.step {
            Some(s) => format!("{s} updates"),
            None => "saved without optimizer state (it scores, it does not resume)".into(),
        },
    );
    i.metrics = shoal_runtime::info::read_metrics(dir)?;
    let d = dir.display();
    i.usage = vec![
        format!("shoal predict --checkpoint {d} --data clicks.csv"),
        format!("shoal train ctr --resume {d} --epochs N"),
    ];
    Ok(Some(i))
}
