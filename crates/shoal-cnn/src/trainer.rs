//! Image classification with the VGG-style CNN of [`crate::model`] on Fashion-MNIST
//! (or any IDX image set): training with Adam and a cosine learning rate, test top-1 and
//! top-5, and saved models (`model.safetensors` with PyTorch-style tensor names, and
//! `meta.json`). Compression fine-tunes through [`CnnTrainer::train_steps`], whose hooks
//! see every gradient and every update.

use crate::model::{Cnn, CnnConfig, CnnWork};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use shoal_data::images::{load_mnist_dir, ImageSet, FASHION_MNIST_DIR};
use shoal_optim::hash::mix64;
use shoal_optim::{Optimizer, OptimizerConfig};
use shoal_runtime::store::{serialize_tensors, write_dir_atomically};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Fashion-MNIST's training-set pixel mean and standard deviation (of p / 255).
pub const PIXEL_MEAN: f32 = 0.2860;
pub const PIXEL_STD: f32 = 0.3530;

/// Everything a CNN run is configured by (saved with the model).
/// The file of a saved model that holds the other files' CRC32s.
const CHECKSUMS: &str = "crc32.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CnnTrainConfig {
    pub model: CnnConfig,
    /// A directory with the IDX files (`train-images-idx3-ubyte[.gz]`, ...).
    pub data_dir: PathBuf,
    /// Use only the first N training / test images (0: all).
    pub train_limit: usize,
    pub test_limit: usize,
    pub epochs: u64,
    /// Stop after this many updates (0: no limit).
    pub max_steps: u64,
    pub batch_size: usize,
    /// Adam's learning rate, decayed along a cosine to a tenth of it by the last step.
    pub lr: f32,
    pub seed: u64,
}

impl Default for CnnTrainConfig {
    fn default() -> Self {
        Self {
            model: CnnConfig::default(),
            data_dir: FASHION_MNIST_DIR.into(),
            train_limit: 0,
            test_limit: 0,
            epochs: 3,
            max_steps: 0,
            batch_size: 64,
            lr: 1e-3,
            seed: 1,
        }
    }
}

impl CnnTrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: &str| Err(Error::Config(format!("{f}: {why}")));
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", "must be a positive number");
        }
        if self.epochs == 0 && self.max_steps == 0 {
            return bad("epochs", "must be at least 1 when max_steps is 0");
        }
        Cnn::new(self.model.clone())?;
        Ok(())
    }
}

/// Test-set scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CnnEval {
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
}

/// What a run reports as it goes.
#[derive(Debug, Clone)]
pub enum CnnEvent {
    Started {
        train_images: usize,
        test_images: usize,
        steps: u64,
        params: usize,
    },
    Step {
        step: u64,
        epoch: u64,
        /// Running mean loss (exponential, 0.98).
        loss: f64,
        /// This update's batch loss.
        batch_loss: f32,
        images_per_s: f64,
    },
    Eval {
        epoch: u64,
        eval: CnnEval,
    },
}

/// A trained network: configuration, parameters and BN statistics.
#[derive(Debug, Clone)]
pub struct CnnModel {
    pub cfg: CnnTrainConfig,
    pub net: Cnn,
    pub params: Vec<f32>,
    pub stats: Vec<f32>,
}

impl CnnModel {
    /// The values and shape of the parameter or statistic called `name`.
    pub fn tensor(&self, name: &str) -> Result<(&[f32], &[usize])> {
        self.net
            .params
            .iter()
            .map(|t| (t, &self.params))
            .chain(self.net.stats.iter().map(|t| (t, &self.stats)))
            .find(|(t, _)| t.name == name)
            .map(|(t, buf)| (&buf[t.range()], t.shape.as_slice()))
            .ok_or_else(|| Error::Config(format!("the model has no tensor {name}")))
    }

    /// The model of `cfg` with every parameter and statistic taken from `tensor` (the
    /// values of a tensor by name and shape; an error for a missing or misshapen one).
    pub fn assemble(
        cfg: CnnTrainConfig,
        mut tensor: impl FnMut(&crate::model::Tensor) -> Result<Vec<f32>>,
    ) -> Result<Self> {
        let net = Cnn::new(cfg.model.clone())?;
        let mut params = vec![0.0f32; net.len()];
        let mut stats = vec![0.0f32; net.stats_len()];
        for (t, is_param) in net
            .params
            .iter()
            .map(|t| (t, true))
            .chain(net.stats.iter().map(|t| (t, false)))
        {
            let buf = if is_param { &mut params } else { &mut stats };
            let v = tensor(t)?;
            if v.len() != t.len() {
                return Err(Error::Config(format!(
                    "tensor {}: {} values, the network needs {:?}",
                    t.name,
                    v.len(),
                    t.shape
                )));
            }
            buf[t.range()].copy_from_slice(&v);
        }
        Ok(Self {
            cfg,
            net,
            params,
            stats,
        })
    }

    /// Saves `model.safetensors` (every parameter and statistic under its name),
    /// `meta.json` (the configuration) and `crc32.json` (both files' CRC32) as directory
    /// `dir`, atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        for t in &self.net.params {
            tensors.push((t.name.clone(), t.shape.clone(), &self.params[t.range()]));
        }
        for t in &self.net.stats {
            tensors.push((t.name.clone(), t.shape.clone(), &self.stats[t.range()]));
        }
        let st = serialize_tensors(&tensors, dir)?;
        let meta =
            serde_json::to_vec_pretty(&self.cfg).map_err(|e| Error::Config(e.to_string()))?;
        let sums = serde_json::to_vec_pretty(&std::collections::BTreeMap::from([
            ("meta.json", crc32fast::hash(&meta)),
            ("model.safetensors", crc32fast::hash(&st)),
        ]))
        .map_err(|e| Error::Config(e.to_string()))?;
        Ok(write_dir_atomically(
            dir,
            &[
                ("model.safetensors", &st),
                ("meta.json", &meta),
                (CHECKSUMS, &sums),
            ],
        )?)
    }

    /// Loads a model saved by [`CnnModel::save`]; a missing, truncated or mismatched
    /// file is an error naming it.
    pub fn load(dir: &Path) -> Result<Self> {
        let fail = |why: String| Error::Checkpoint {
            path: dir.to_path_buf(),
            why,
        };
        let meta_path = dir.join("meta.json");
        let meta = std::fs::read(&meta_path).map_err(crate::error::io_err(&meta_path))?;
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).map_err(crate::error::io_err(&path))?;
        // Both files' CRC32s (models saved before the checksums existed load unchecked).
        let sums_path = dir.join(CHECKSUMS);
        if sums_path.exists() {
            let text = std::fs::read(&sums_path).map_err(crate::error::io_err(&sums_path))?;
            let sums: std::collections::BTreeMap<String, u32> =
                serde_json::from_slice(&text).map_err(|e| fail(format!("{CHECKSUMS}: {e}")))?;
            for (file, data) in [("meta.json", &meta), ("model.safetensors", &bytes)] {
                let got = crc32fast::hash(data);
                match sums.get(file) {
                    Some(&want) if want == got => {}
                    Some(want) => {
                        return Err(fail(format!(
                            "{file} is corrupt or truncated ({} bytes, CRC32 {got:08x}, {CHECKSUMS} says {want:08x})",
                            data.len()
                        )))
                    }
                    None => return Err(fail(format!("{CHECKSUMS} has no checksum for {file}"))),
                }
            }
        }
        let cfg: CnnTrainConfig =
            serde_json::from_slice(&meta).map_err(|e| fail(format!("meta.json: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| fail(format!("model.safetensors: {e}")))?;
        let m = Self::assemble(cfg, |t| {
            let v = st
                .tensor(&t.name)
                .map_err(|e| fail(format!("tensor {}: {e}", t.name)))?;
            if v.dtype() != safetensors::Dtype::F32 || v.shape() != t.shape.as_slice() {
                return Err(fail(format!(
                    "tensor {}: {:?} {:?}, the configuration says F32 {:?}",
                    t.name,
                    v.dtype(),
                    v.shape(),
                    t.shape
                )));
            }
            Ok(v.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        })
        .map_err(|e| match e {
            Error::Config(why) => fail(why),
            other => other,
        })?;
        if m.params.iter().chain(&m.stats).any(|v| !v.is_finite()) {
            return Err(fail("model.safetensors holds non-finite values".into()));
        }
        Ok(m)
    }
}

/// Scores of `params` on `set` (batches of 256): top-1, top-5, mean loss.
pub fn evaluate(net: &Cnn, params: &[f32], stats: &[f32], set: &ImageSet) -> Result<CnnEval> {
    check_images(&net.cfg, set)?;
    let mut ws = CnnWork::default();
    score(set, net.cfg.classes, |x, n| {
        Ok(net.predict(params, stats, x, n, &mut ws)?.to_vec())
    })
}

/// Top-1, top-5 and mean loss over `set`, in batches of 256 normalized images whose
/// logits `logits(x, n)` gives (whatever computes them: the network, an engine).
pub fn score(
    set: &ImageSet,
    classes: usize,
    mut logits: impl FnMut(&[f32], usize) -> Result<Vec<f32>>,
) -> Result<CnnEval> {
    let mut x = Vec::new();
    let (mut top1, mut top5, mut loss) = (0usize, 0usize, 0.0f64);
    let n = set.len();
    let mut start = 0;
    while start < n {
        let idx: Vec<usize> = (start..(start + 256).min(n)).collect();
        set.normalized(&idx, PIXEL_MEAN, PIXEL_STD, &mut x);
        let out = logits(&x, idx.len())?;
        for (row, &i) in out.chunks(classes).zip(&idx) {
            let y = set.labels[i] as usize;
            let above = row.iter().filter(|&&v| v > row[y]).count();
            top1 += (above == 0) as usize;
            top5 += (above < 5) as usize;
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let s: f32 = row.iter().map(|v| (v - m).exp()).sum();
            loss += (s.ln() + m - row[y]) as f64;
        }
        start += idx.len();
    }
    let n = n.max(1) as f64;
    Ok(CnnEval {
        top1: top1 as f64 / n,
        top5: top5 as f64 / n,
        loss: loss / n,
    })
}

/// A training run (or a fine-tuning one) over a training and a test set.
pub struct CnnTrainer {
    pub model: CnnModel,
    pub train: ImageSet,
    pub test: ImageSet,
    opt: Optimizer,
    grad: Vec<f32>,
    ws: CnnWork,
    x: Vec<f32>,
    labels: Vec<u8>,
    order: Vec<usize>,
    /// Updates made so far, and the position in the current epoch's order.
    pub step: u64,
    cursor: usize,
    epoch: u64,
}

impl CnnTrainer {
    /// A fresh network on the configured data.
    pub fn new(cfg: CnnTrainConfig) -> Result<Self> {
        cfg.validate()?;
        let net = Cnn::new(cfg.model.clone())?;
        let (params, stats) = net.init(cfg.seed);
        let (train, test) = load_data(&cfg)?;
        Self::with(
            CnnModel {
                cfg,
                net,
                params,
                stats,
            },
            train,
            test,
        )
    }

    /// Continues from `model` (fine-tuning) on the given data.
    pub fn with(model: CnnModel, train: ImageSet, test: ImageSet) -> Result<Self> {
        check_images(&model.cfg.model, &train)?;
        check_images(&model.cfg.model, &test)?;
        if train.is_empty() || test.is_empty() {
            return Err(Error::Config("no training or no test images".into()));
        }
        let opt = Optimizer::new(OptimizerConfig::default(), model.net.len())?;
        let grad = vec![0.0; model.net.len()];
        Ok(Self {
            model,
            train,
            test,
            opt,
            grad,
            ws: CnnWork::default(),
            x: Vec::new(),
            labels: Vec::new(),
            order: Vec::new(),
            step: 0,
            cursor: 0,
            epoch: 0,
        })
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.train.len().div_ceil(self.model.cfg.batch_size) as u64
    }

    /// A seeded shuffle of the training set for epoch `e`.
    fn shuffle(&mut self, e: u64) {
        let n = self.train.len();
        self.order = (0..n).collect();
        let mut s = mix64(self.model.cfg.seed ^ e.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for i in (1..n).rev() {
            s = mix64(s);
            self.order.swap(i, (s % (i as u64 + 1)) as usize);
        }
        self.cursor = 0;
    }

    /// Makes `steps` updates at learning rate `lr(step)`; `on_grad` may change each
    /// gradient before the update (e.g. zero pruned weights'), `after` each update's
    /// parameters (e.g. re-apply a mask); `on_step` sees (step, epoch, loss, images/s).
    pub fn train_steps(
        &mut self,
        steps: u64,
        lr: impl Fn(u64) -> f32,
        mut on_grad: impl FnMut(&mut [f32]),
        mut after: impl FnMut(&mut [f32]),
        mut on_step: impl FnMut(u64, u64, f32, f64),
    ) -> Result<()> {
        let bs = self.model.cfg.batch_size;
        let t0 = Instant::now();
        let mut seen = 0usize;
        for _ in 0..steps {
            if self.order.is_empty() || self.cursor >= self.order.len() {
                if !self.order.is_empty() {
                    self.epoch += 1;
                }
                self.shuffle(self.epoch);
            }
            let end = (self.cursor + bs).min(self.order.len());
            let idx = &self.order[self.cursor..end];
            self.train
                .normalized(idx, PIXEL_MEAN, PIXEL_STD, &mut self.x);
            self.labels.clear();
            self.labels
                .extend(idx.iter().map(|&i| self.train.labels[i]));
            let m = &mut self.model;
            let loss = m.net.loss_and_grad(
                &m.params,
                &mut m.stats,
                &self.x,
                &self.labels,
                mix64(m.cfg.seed ^ self.step),
                &mut self.ws,
                &mut self.grad,
            )?;
            if !loss.is_finite() {
                return Err(Error::Diverged {
                    step: self.step,
                    loss,
                });
            }
            on_grad(&mut self.grad);
            self.opt.step(lr(self.step), &mut m.params, &self.grad)?;
            after(&mut m.params);
            seen += self.labels.len();
            self.cursor = end;
            self.step += 1;
            on_step(
                self.step,
                self.epoch,
                loss,
                seen as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            );
        }
        Ok(())
    }

    /// Trains for the configured epochs (or steps), evaluating after each epoch.
    pub fn run(&mut self, mut on_event: impl FnMut(&CnnEvent)) -> Result<CnnEval> {
        let cfg = self.model.cfg.clone();
        let per = self.steps_per_epoch();
        let total = match (cfg.epochs, cfg.max_steps) {
            (e, 0) => e * per,
            (0, m) => m,
            (e, m) => (e * per).min(m),
        };
        on_event(&CnnEvent::Started {
            train_images: self.train.len(),
            test_images: self.test.len(),
            steps: total,
            params: self.model.net.len(),
        });
        let lr = |s: u64| {
            let t = s as f32 / total.max(1) as f32;
            cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f32::consts::PI * t).cos()))
        };
        let mut ema: Option<f64> = None;
        let mut eval = None;
        while self.step < total {
            let n = (per - self.step % per).min(total - self.step);
            let epoch = self.step / per;
            self.train_steps(
                n,
                lr,
                |_| {},
                |_| {},
                |step, ep, loss, ips| {
                    let e = ema.map_or(loss as f64, |e| 0.98 * e + 0.02 * loss as f64);
                    ema = Some(e);
                    on_event(&CnnEvent::Step {
                        step,
                        epoch: ep,
                        loss: e,
                        batch_loss: loss,
                        images_per_s: ips,
                    });
                },
            )?;
            let e = self.evaluate()?;
            on_event(&CnnEvent::Eval { epoch, eval: e });
            eval = Some(e);
        }
        match eval {
            Some(e) => Ok(e),
            None => self.evaluate(),
        }
    }

    /// Test-set scores of the current parameters.
    pub fn evaluate(&self) -> Result<CnnEval> {
        evaluate(
            &self.model.net,
            &self.model.params,
            &self.model.stats,
            &self.test,
        )
    }
}

/// Fails unless the network takes the set's images (one channel, same size).
pub fn check_images(cfg: &CnnConfig, set: &ImageSet) -> Result<()> {
    let [c, h, w] = cfg.input;
    if c != 1 || (set.rows, set.cols) != (h, w) {
        return Err(Error::Config(format!(
            "the network takes {c}x{h}x{w} images, the data has 1x{}x{}",
            set.rows, set.cols
        )));
    }
    Ok(())
}

/// The configured training and test sets (limited as configured).
pub fn load_data(cfg: &CnnTrainConfig) -> Result<(ImageSet, ImageSet)> {
    let (mut train, mut test) = load_mnist_dir(&cfg.data_dir)?;
    if cfg.train_limit > 0 {
        train.truncate(cfg.train_limit);
    }
    if cfg.test_limit > 0 {
        test.truncate(cfg.test_limit);
    }
    Ok((train, test))
}
