//! Compression of a trained CNN, each technique alone or chained in Deep Compression's
//! order (SVD of the hidden fully-connected layers, then pruning, then quantization,
//! then entropy coding in the file), with fine-tuning between: factorized layers train
//! as such, pruning follows the gradual (AGP) schedule with masked updates, k-means
//! codebooks fine-tune their shared values. The result is written as a compressed file
//! and scored from that file (what is reported is what is stored), with its size, and
//! its inference latency on the compressed kernels (sparse rows, int8, factors).

use crate::model::{Cnn, CnnWork};
use crate::trainer::{evaluate, CnnEval, CnnModel, CnnTrainer, PIXEL_MEAN, PIXEL_STD};
use crate::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use shoal_compress::format::{self, TensorIn, Values};
use shoal_compress::kmeans::Codebook;
use shoal_compress::prune;
use shoal_compress::sparse::{Csr, Scratch};
use shoal_compress::svd::{factorize, RankBy};
use shoal_data::images::ImageSet;
use shoal_kernels::host::int8::{max_nonneg, requant_relu, ConvI8, ConvU8, QuantI8};
use shoal_optim::{Optimizer, OptimizerConfig};
use std::path::Path;
use std::time::Instant;

/// How to quantize the weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Quant {
    /// Symmetric int8, one scale per output channel.
    Int8,
    /// k-means weight sharing with codes of this many bits (1 to 8); `rate` > 0 makes
    /// the clustering entropy-constrained (see `Codebook::fit_with_rate`): fewer bits
    /// per weight after Huffman coding, for some accuracy.
    Codebook {
        bits: u32,
        #[serde(default, skip_serializing_if = "is_zero")]
        rate: f32,
    },
}

fn is_zero(x: &f32) -> bool {
    *x == 0.0
}

/// One compression configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressSpec {
    /// Factorize the hidden fully-connected layers by SVD at this size ratio per layer
    /// (`svd_energy` instead: the rank keeping that share of the spectrum's energy).
    pub svd_ratio: Option<f64>,
    pub svd_energy: Option<f64>,
    /// Fraction of the fully-connected weights pruned (0: none).
    pub prune_fc: f64,
    /// Fraction of the convolution weights pruned.
    pub prune_conv: f64,
    /// One magnitude threshold over all weights (at `prune_fc`) instead of per layer.
    pub prune_global: bool,
    pub quant: Option<Quant>,
    /// Fine-tuning updates after each stage that changes the weights (0: none).
    pub fine_tune_steps: u64,
    pub lr: f32,
}

impl Default for CompressSpec {
    fn default() -> Self {
        Self {
            svd_ratio: None,
            svd_energy: None,
            prune_fc: 0.0,
            prune_conv: 0.0,
            prune_global: false,
            quant: None,
            fine_tune_steps: 0,
            lr: 2e-4,
        }
    }
}

impl CompressSpec {
    /// Every check that can fail before any work.
    pub fn validate(&self) -> Result<()> {
        prune::check_sparsity(self.prune_fc)?;
        prune::check_sparsity(self.prune_conv)?;
        if let Some(Quant::Codebook { bits, rate }) = self.quant {
            shoal_compress::kmeans::check_bits(bits)?;
            if !(rate >= 0.0 && rate.is_finite()) {
                return Err(Error::Config(format!("codebook rate {rate}: must be >= 0")));
            }
        }
        if self.svd_ratio.is_some() && self.svd_energy.is_some() {
            return Err(Error::Config(
                "give svd_ratio or svd_energy, not both".into(),
            ));
        }
        if let Some(r) = self.svd_ratio {
            if !(r.is_finite() && r >= 1.0) {
                return Err(Error::Config(format!("svd ratio {r}: must be at least 1")));
            }
        }
        if let Some(x) = self.svd_energy {
            if !(x > 0.0 && x <= 1.0) {
                return Err(Error::Config(format!("svd energy {x}: must be in (0, 1]")));
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::Config(format!(
                "fine-tuning lr {}: must be positive",
                self.lr
            )));
        }
        Ok(())
    }

    /// A short name for tables.
    pub fn label(&self) -> String {
        let mut parts = Vec::new();
        if let Some(r) = self.svd_ratio {
            parts.push(format!("svd x{r}"));
        }
        if let Some(e) = self.svd_energy {
            parts.push(format!("svd {:.0}% energy", e * 100.0));
        }
        if self.prune_fc > 0.0 || self.prune_conv > 0.0 {
            parts.push(if self.prune_global {
                format!("prune {:.0}% global", self.prune_fc * 100.0)
            } else {
                format!(
                    "prune fc {:.0}% conv {:.0}%",
                    self.prune_fc * 100.0,
                    self.prune_conv * 100.0
                )
            });
        }
        match self.quant {
            Some(Quant::Int8) => parts.push("int8".into()),
            Some(Quant::Codebook { bits, rate }) if rate > 0.0 => {
                parts.push(format!("{bits}-bit codebook (rate {rate})"))
            }
            Some(Quant::Codebook { bits, .. }) => parts.push(format!("{bits}-bit codebook")),
            None => {}
        }
        if parts.is_empty() {
            "dense".into()
        } else {
            parts.join(" + ")
        }
    }
}

/// What a configuration gave.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompressResult {
    pub label: String,
    pub spec: CompressSpec,
    pub top1: f64,
    pub top5: f64,
    /// Size of the compressed file, and of the dense model in the same format.
    pub bytes: usize,
    pub dense_bytes: usize,
    pub ratio: f64,
    /// Conv and FC weights only: compressed and dense bytes, and their ratio.
    pub weight_bytes: usize,
    pub dense_weight_bytes: usize,
    pub weight_ratio: f64,
    /// Fully-connected weights (or factors) only: dense bytes over compressed.
    pub fc_ratio: f64,
    /// Inference latency of the whole model (ms per batch) at batch 1 and 64, dense
    /// and compressed, and of the fully-connected head alone.
    pub latency_ms: Latency,
}

/// Measured inference times in milliseconds per batch.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Latency {
    pub dense_b1: f64,
    pub dense_b64: f64,
    pub compressed_b1: f64,
    pub compressed_b64: f64,
    pub dense_fc_b1: f64,
    pub dense_fc_b64: f64,
    pub compressed_fc_b1: f64,
    pub compressed_fc_b64: f64,
}

impl Latency {
    pub fn speedup_b1(&self) -> f64 {
        self.dense_b1 / self.compressed_b1
    }
    pub fn speedup_b64(&self) -> f64 {
        self.dense_b64 / self.compressed_b64
    }
    pub fn fc_speedup_b1(&self) -> f64 {
        self.dense_fc_b1 / self.compressed_fc_b1
    }
    pub fn fc_speedup_b64(&self) -> f64 {
        self.dense_fc_b64 / self.compressed_fc_b64
    }
}

/// The shared values of each codebook-quantized tensor, by name.
pub type Codebooks = Vec<(String, Vec<f32>)>;

/// Whether a weight tensor is stored and run sparse: more than half of it pruned.
fn stored_sparse(w: &[f32]) -> bool {
    w.iter().filter(|v| **v == 0.0).count() * 2 > w.len()
}

/// Is this tensor a fully-connected weight (or factor)?
fn is_fc(name: &str) -> bool {
    name.starts_with("fc")
}

/// The model with its hidden fully-connected layers factorized (the output layer is
/// small and stays), each at the rank the rule picks.
fn factorize_model(m: &CnnModel, by: impl Fn(usize, usize) -> RankBy) -> Result<CnnModel> {
    let layers = m.net.fc_layers();
    let mut ranks = vec![0usize; layers.len()];
    let mut factors = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        if i + 1 == layers.len() || l.low_rank.is_some() {
            factors.push(None);
            continue;
        }
        let w = &m.params[l.weight..l.weight + l.out * l.inp];
        let f = factorize(w, l.out, l.inp, by(l.out, l.inp))?;
        ranks[i] = f.rank;
        factors.push(Some(f));
    }
    let mut cfg = m.cfg.clone();
    cfg.model.fc_rank = ranks;
    let net = Cnn::new(cfg.model.clone())?;
    let mut params = vec![0.0f32; net.len()];
    // Everything but the factorized weights carries over by name.
    for t in &net.params {
        if let Some(old) = m.net.params.iter().find(|o| o.name == t.name) {
            params[t.range()].copy_from_slice(&m.params[old.range()]);
        }
    }
    for (l, f) in net.fc_layers().iter().zip(&factors) {
        if let (Some(f), Some((r, v))) = (f, l.low_rank) {
            params[l.weight..l.weight + l.out * r].copy_from_slice(&f.a);
            params[v..v + r * l.inp].copy_from_slice(&f.b);
        }
    }
    Ok(CnnModel {
        cfg,
        net,
        params,
        stats: m.stats.clone(),
    })
}

/// Masks (true = kept) per weight tensor for the spec's sparsity scaled by `frac`
/// (1 = the target), from the current weights.
fn masks(
    m: &CnnModel,
    spec: &CompressSpec,
    frac: f64,
) -> Result<Vec<(std::ops::Range<usize>, Vec<bool>)>> {
    let weights = m.net.weights();
    let global = if spec.prune_global {
        let all: Vec<&[f32]> = weights.iter().map(|t| &m.params[t.range()]).collect();
        Some(prune::global_threshold(&all, spec.prune_fc * frac)?)
    } else {
        None
    };
    weights
        .iter()
        .map(|t| {
            let w = &m.params[t.range()];
            let mask = match global {
                Some(g) => prune::mask_above(w, g),
                None => {
                    let s = if is_fc(&t.name) {
                        spec.prune_fc
                    } else {
                        spec.prune_conv
                    };
                    prune::layer_mask(w, s * frac)?
                }
            };
            Ok((t.range(), mask))
        })
        .collect()
}

/// Per weight tensor, its range in the parameter buffer and which values are kept.
type Masks = Vec<(std::ops::Range<usize>, Vec<bool>)>;

fn apply_masks(p: &mut [f32], masks: &Masks) {
    for (r, m) in masks {
        prune::apply_mask(&mut p[r.clone()], m);
    }
}

/// A fine-tuning run of `steps` updates on `train`.
fn trainer(m: CnnModel, train: &ImageSet, test: &ImageSet) -> Result<CnnTrainer> {
    CnnTrainer::with(m, train.clone(), test.clone())
}

/// Applies `spec` to `model`, fine-tuning on `train`; returns the compressed model (its
/// weights as the compressed file stores them) and the codebooks of quantized tensors.
pub fn compress(
    model: &CnnModel,
    spec: &CompressSpec,
    train: &ImageSet,
    test: &ImageSet,
    mut on_step: impl FnMut(&str, u64, u64, f32),
) -> Result<(CnnModel, Codebooks)> {
    spec.validate()?;
    let steps = spec.fine_tune_steps;
    let lr = spec.lr;
    let mut m = model.clone();
    if spec.svd_ratio.is_some() || spec.svd_energy.is_some() {
        m = factorize_model(&m, |_, _| match (spec.svd_ratio, spec.svd_energy) {
            (Some(r), _) => RankBy::Ratio(r),
            (_, Some(e)) => RankBy::Energy(e),
            _ => RankBy::Energy(1.0),
        })?;
        if steps > 0 {
            let mut t = trainer(m, train, test)?;
            t.train_steps(
                steps,
                |_| lr,
                |_| {},
                |_| {},
                |s, _, l, _| on_step("svd", s, steps, l),
            )?;
            m = t.model;
        }
    }
    let pruning = spec.prune_fc > 0.0 || spec.prune_conv > 0.0;
    let mut final_masks = None;
    if pruning {
        if steps == 0 {
            let mk = masks(&m, spec, 1.0)?;
            apply_masks(&mut m.params, &mk);
            final_masks = Some(mk);
        } else {
            // AGP: the sparsity rises over the first 3/4 of the steps, recomputed every
            // tenth of them; the last quarter fine-tunes at the target.
            let ramp = (steps * 3 / 4).max(1);
            let every = (ramp / 10).max(1);
            let mut t = trainer(m, train, test)?;
            let mut done = 0;
            while done < steps {
                let frac = prune::agp(0.0, 1.0, done.min(ramp), ramp);
                let mk = masks(&t.model, spec, frac)?;
                apply_masks(&mut t.model.params, &mk);
                let n = every.min(steps - done);
                t.train_steps(
                    n,
                    |_| lr,
                    |g| apply_masks(g, &mk),
                    |p| apply_masks(p, &mk),
                    |s, _, l, _| on_step("prune", s, steps, l),
                )?;
                done += n;
            }
            let last = masks(&t.model, spec, 1.0)?;
            apply_masks(&mut t.model.params, &last);
            m = t.model;
            final_masks = Some(last);
        }
    }
    let mut books: Codebooks = Vec::new();
    match spec.quant {
        None => {}
        Some(Quant::Int8) => {
            for t in m.net.weights() {
                let rows = t.shape[0];
                let cols = t.len() / rows;
                let q = QuantI8::from_dense(&m.params[t.range()], rows, cols)?;
                m.params[t.range()].copy_from_slice(&q.to_dense());
            }
        }
        Some(Quant::Codebook { bits, rate }) => {
            let mut cbs: Vec<(std::ops::Range<usize>, String, Codebook)> = Vec::new();
            for t in m.net.weights() {
                let cb = Codebook::fit_with_rate(&m.params[t.range()], bits, pruning, 30, rate)?;
                cbs.push((t.range(), t.name.clone(), cb));
            }
            let decode = |p: &mut [f32], cbs: &[(std::ops::Range<usize>, String, Codebook)]| {
                for (r, _, cb) in cbs {
                    cb.decode(&mut p[r.clone()]);
                }
            };
            decode(&mut m.params, &cbs);
            if steps > 0 {
                // The shared values train by the summed gradients of their weights
                // (Adam over all codebooks); the rest of the network trains as usual.
                let total: usize = cbs.iter().map(|(_, _, c)| c.centroids.len()).sum();
                let mut copt = Optimizer::new(OptimizerConfig::default(), total)?;
                let mut cvals = vec![0.0f32; total];
                let mut cgrad = vec![0.0f32; total];
                let mut t = trainer(m, train, test)?;
                let cbs_cell = std::cell::RefCell::new(cbs);
                t.train_steps(
                    steps,
                    |_| lr,
                    |g| {
                        let mut cbs = cbs_cell.borrow_mut();
                        let mut at = 0;
                        for (r, _, cb) in cbs.iter() {
                            let k = cb.centroids.len();
                            cvals[at..at + k].copy_from_slice(&cb.centroids);
                            cgrad[at..at + k].fill(0.0);
                            for (&q, &d) in cb.codes.iter().zip(&g[r.clone()]) {
                                if cb.zero_code && q == 0 {
                                    continue;
                                }
                                cgrad[at + q as usize - cb.zero_code as usize] += d;
                            }
                            at += k;
                        }
                        if copt.step(lr, &mut cvals, &cgrad).is_ok() {
                            let mut at = 0;
                            for (_, _, cb) in cbs.iter_mut() {
                                let k = cb.centroids.len();
                                cb.centroids.copy_from_slice(&cvals[at..at + k]);
                                at += k;
                            }
                        }
                        for (r, _, _) in cbs.iter() {
                            g[r.clone()].fill(0.0);
                        }
                    },
                    |p| decode(p, &cbs_cell.borrow()),
                    |s, _, l, _| on_step("codebook", s, steps, l),
                )?;
                m = t.model;
                cbs = cbs_cell.into_inner();
            }
            for (_, name, cb) in cbs {
                books.push((name, cb.centroids));
            }
        }
    }
    if let Some(mk) = &final_masks {
        apply_masks(&mut m.params, mk);
    }
    Ok((m, books))
}

/// The compressed file of `m`: weight tensors sparse when pruned, values as quantized
/// (int8 per row, or codes into `books`); biases, BN parameters and statistics f32.
pub fn encode(
    m: &CnnModel,
    spec: &CompressSpec,
    books: &[(String, Vec<f32>)],
    part: Part,
) -> Result<Vec<u8>> {
    let weights_only = part != Part::All;
    let pruned = spec.prune_fc > 0.0 || spec.prune_conv > 0.0;
    let mut tensors = Vec::new();
    for t in &m.net.params {
        let is_weight = m.net.weights().iter().any(|w| w.name == t.name);
        if (weights_only && !is_weight) || (part == Part::FcWeights && !is_fc(&t.name)) {
            continue;
        }
        let data = &m.params[t.range()];
        let zeros = data.iter().filter(|v| **v == 0.0).count();
        let sparse = is_weight && pruned && stored_sparse(data);
        let values = if !is_weight {
            Values::F32
        } else {
            match (spec.quant, books.iter().find(|(n, _)| n == &t.name)) {
                (Some(Quant::Int8), _) => Values::Int8,
                (Some(Quant::Codebook { .. }), Some((_, c))) => {
                    // Stored dense, pruned zeros need a code of their own.
                    let mut centroids = c.clone();
                    if !sparse && zeros > 0 && !centroids.contains(&0.0) {
                        centroids.insert(0, 0.0);
                    }
                    Values::Codebook { centroids }
                }
                _ => Values::F32,
            }
        };
        tensors.push(TensorIn {
            name: t.name.clone(),
            shape: t.shape.clone(),
            data,
            sparse,
            values,
        });
    }
    if !weights_only {
        for t in &m.net.stats {
            tensors.push(TensorIn {
                name: t.name.clone(),
                shape: t.shape.clone(),
                data: &m.stats[t.range()],
                sparse: false,
                values: Values::F32,
            });
        }
    }
    let cfg = serde_json::json!({"cnn": m.cfg, "compression": spec});
    Ok(format::write(cfg, &tensors)?)
}

/// Which tensors a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The whole model (parameters and statistics).
    All,
    /// Convolution and fully-connected weights only (for the weights' ratio).
    Weights,
    /// Fully-connected weights (and factors) only.
    FcWeights,
}

/// Reads a compressed file back into a model (what it computes with) and its spec.
pub fn decode(bytes: &[u8], path: &Path) -> Result<(CnnModel, CompressSpec)> {
    let fail = |why: String| Error::Checkpoint {
        path: path.to_path_buf(),
        why,
    };
    let (cfg, tensors) = format::read(bytes).map_err(|e| fail(e.to_string()))?;
    let cnn_cfg: crate::trainer::CnnTrainConfig = serde_json::from_value(cfg["cnn"].clone())
        .map_err(|e| fail(format!("configuration: {e}")))?;
    let spec: CompressSpec = serde_json::from_value(cfg["compression"].clone())
        .map_err(|e| fail(format!("compression settings: {e}")))?;
    let m = CnnModel::assemble(cnn_cfg, |t| {
        let (_, shape, data) = tensors
            .iter()
            .find(|(n, _, _)| n == &t.name)
            .ok_or_else(|| fail(format!("tensor {} is missing", t.name)))?;
        if shape != &t.shape {
            return Err(fail(format!(
                "tensor {}: shape {shape:?}, expected {:?}",
                t.name, t.shape
            )));
        }
        Ok(data.clone())
    })?;
    Ok((m, spec))
}

/// One fully-connected layer on the kernel that suits how it is stored.
enum Head {
    Dense {
        w: Vec<f32>,
    },
    Sparse(Csr),
    Int8(QuantI8),
    /// `x V^T` then `U`: the factors, their rank and a zero bias for the inner product.
    LowRank {
        v: Box<Head>,
        u: Box<Head>,
        r: usize,
        zeros: Vec<f32>,
    },
}

/// Buffers the head's kernels reuse from call to call.
#[derive(Default)]
struct HeadScratch {
    sc: Scratch,
    qs: shoal_kernels::host::int8::Scratch,
    tmp: Vec<f32>,
}

/// The inference engine of a (compressed) model: convolutions dense, the head on
/// sparse, int8 or factorized kernels.
pub struct Engine {
    m: CnnModel,
    layers: Vec<(Head, Vec<f32>, usize, usize)>,
    /// The int8 convolutions (int8 models), else the network's f32 ones run.
    convs: Option<Vec<Stage>>,
    cs: Vec<ConvScratch>,
    ws: CnnWork,
    hs: HeadScratch,
    bufs: [Vec<f32>; 2],
}

/// A stage of the int8 convolutional part.
enum Stage {
    /// A 3x3 convolution with int8 weights (one scale per output channel), BatchNorm
    /// (or the bias) folded into a per-channel scale and shift, then ReLU.
    Conv {
        conv: ConvI8,
        dims: (usize, usize, usize),
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
    /// The same on activations that are never negative (after a ReLU): unsigned codes
    /// with no offset, convolved in place ([`ConvU8`]).
    Direct {
        conv: ConvU8,
        dims: (usize, usize, usize),
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
    Pool {
        dims: (usize, usize, usize),
    },
}

/// Buffers of the int8 convolutions, reused from call to call.
#[derive(Default, Clone)]
struct ConvScratch {
    xu: Vec<u8>,
    cols: shoal_kernels::host::int8::ConvScratch,
    acc: Vec<i32>,
    a: Vec<f32>,
    b: Vec<f32>,
    /// Packed unsigned images and per-channel output scales of the direct stages.
    xw: Vec<u32>,
    ks: Vec<f32>,
}

/// The int8 stages of `m`'s convolutional part.
fn int8_stages(m: &CnnModel) -> Result<Vec<Stage>> {
    let cfg = &m.cfg.model;
    let get = |name: &str| m.tensor(name).map(|(v, _)| v);
    let [mut c, mut h, mut w] = cfg.input;
    let mut out = Vec::new();
    let mut k = 0;
    for block in &cfg.blocks {
        for &cout in block {
            k += 1;
            let weight = get(&format!("conv{k}.weight"))?;
            let (scale, shift) = if cfg.batch_norm {
                let (g, b) = (get(&format!("bn{k}.weight"))?, get(&format!("bn{k}.bias"))?);
                let (mean, var) = (
                    get(&format!("bn{k}.running_mean"))?,
                    get(&format!("bn{k}.running_var"))?,
                );
                let inv: Vec<f32> = var
                    .iter()
                    .map(|v| 1.0 / (v + crate::model::BN_EPS).sqrt())
                    .collect();
                (
                    (0..cout).map(|i| g[i] * inv[i]).collect(),
                    (0..cout).map(|i| b[i] - mean[i] * g[i] * inv[i]).collect(),
                )
            } else {
                (vec![1.0; cout], get(&format!("conv{k}.bias"))?.to_vec())
            };
            // Every convolution but the first reads the output of a ReLU.
            out.push(if k > 1 && c % 4 == 0 {
                Stage::Direct {
                    conv: ConvU8::new(weight, cout, c)?,
                    dims: (c, h, w),
                    scale,
                    shift,
                }
            } else {
                Stage::Conv {
                    conv: ConvI8::new(weight, cout, c)?,
                    dims: (c, h, w),
                    scale,
                    shift,
                }
            });
            c = cout;
        }
        out.push(Stage::Pool { dims: (c, h, w) });
        h /= 2;
        w /= 2;
    }
    Ok(out)
}

/// The int8 convolutional part on one image `x` (`[C, H, W]`), into `out` (its
/// features); the products on the thread pool when `parallel`.
fn int8_features(
    stages: &[Stage],
    x: &[f32],
    cs: &mut ConvScratch,
    out: &mut [f32],
    parallel: bool,
) {
    let ConvScratch {
        xu,
        cols,
        acc,
        a,
        b,
        xw,
        ks,
    } = cs;
    a.clear();
    a.extend_from_slice(x);
    // The maximum of `a` when a stage knows it (pooling keeps it).
    let mut amax = None;
    for st in stages {
        match st {
            Stage::Conv {
                conv,
                dims,
                scale,
                shift,
            } => {
                let (_, h, w) = *dims;
                let hw = h * w;
                // The image to unsigned int8, one scale for all of it.
                let m = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let s = if m > 0.0 { m / 127.0 } else { 1.0 };
                let inv = 1.0 / s;
                xu.clear();
                // Rounded half away from zero (as f32::round, which is a libm call
                // per value on baseline x86-64): truncation of x + copysign(0.5, x).
                xu.extend(a.iter().map(|v| {
                    let t = (v * inv).clamp(-127.0, 127.0);
                    ((t + 0.5f32.copysign(t)) as i32 + 128) as u8
                }));
                let np = conv.run(xu, (h, w), cols, acc, parallel);
                b.resize(conv.cout * hw, 0.0);
                for co in 0..conv.cout {
                    let k = conv.scale[co] * s * scale[co];
                    let off = 128 * conv.row_sum[co];
                    for (o, &v) in b[co * hw..(co + 1) * hw]
                        .iter_mut()
                        .zip(&acc[co * np..co * np + hw])
                    {
                        *o = ((v - off) as f32 * k + shift[co]).max(0.0);
                    }
                }
                amax = None;
                std::mem::swap(a, b);
            }
            Stage::Direct {
                conv,
                dims,
                scale,
                shift,
            } => {
                let (c, h, w) = *dims;
                let hw = h * w;
                // Unsigned codes, zero as 0: the whole 0..=255 range for values >= 0.
                let m = match amax {
                    Some(m) => m,
                    None => max_nonneg(a),
                };
                let s = if m > 0.0 { m / 255.0 } else { 1.0 };
                ConvU8::pack(a, c, (h, w), 1.0 / s, xw);
                let np = conv.run(xw, (h, w), acc, parallel);
                b.resize(conv.cout * hw, 0.0);
                ks.clear();
                ks.extend((0..conv.cout).map(|co| conv.scale[co] * s * scale[co]));
                amax = Some(requant_relu(acc, np, (h, w), ks, shift, b));
                std::mem::swap(a, b);
            }
            Stage::Pool { dims } => {
                let (c, h, w) = *dims;
                let (oh, ow) = (h / 2, w / 2);
                b.resize(c * oh * ow, 0.0);
                for (ci, o) in b.chunks_exact_mut(oh * ow).enumerate() {
                    let plane = &a[ci * h * w..(ci + 1) * h * w];
                    for (oy, orow) in o.chunks_exact_mut(ow).enumerate() {
                        let r0 = &plane[2 * oy * w..2 * oy * w + 2 * ow];
                        let r1 = &plane[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * ow];
                        for ((v, p0), p1) in orow
                            .iter_mut()
                            .zip(r0.chunks_exact(2))
                            .zip(r1.chunks_exact(2))
                        {
                            *v = p0[0].max(p0[1]).max(p1[0].max(p1[1]));
                        }
                    }
                }
                std::mem::swap(a, b);
            }
        }
    }
    out.copy_from_slice(a);
}

fn head_of(w: &[f32], out: usize, inp: usize, sparse: bool, int8: bool) -> Result<Head> {
    Ok(if sparse {
        Head::Sparse(Csr::from_dense(w, out, inp)?)
    } else if int8 {
        Head::Int8(QuantI8::from_dense(w, out, inp)?)
    } else {
        Head::Dense { w: w.to_vec() }
    })
}

impl Head {
    /// `y = x W^T + bias` for `batch` rows of `inp` values into `out` each.
    fn run(
        &self,
        x: &[f32],
        batch: usize,
        (inp, out): (usize, usize),
        bias: &[f32],
        hs: &mut HeadScratch,
        y: &mut [f32],
    ) {
        match self {
            Head::Dense { w } => {
                for row in y.chunks_mut(out) {
                    row.copy_from_slice(bias);
                }
                let threads = rayon::current_num_threads();
                shoal_kernels::host::sgemm(
                    batch, out, inp, x, inp, 1, w, 1, inp, y, out, true, threads,
                );
            }
            Head::Sparse(c) => c.matmul_t(x, batch, bias, &mut hs.sc, y),
            Head::Int8(q) => q.matmul_t(x, batch, bias, &mut hs.qs, y),
            Head::LowRank { v, u, r, zeros } => {
                let mut t = std::mem::take(&mut hs.tmp);
                t.resize(batch * r, 0.0);
                v.run(x, batch, (inp, *r), zeros, hs, &mut t);
                u.run(&t, batch, (*r, out), bias, hs, y);
                hs.tmp = t;
            }
        }
    }
}

impl Engine {
    /// The engine for `m` as `spec` compressed it (dense when `spec` is the default).
    pub fn new(m: &CnnModel, spec: &CompressSpec) -> Result<Self> {
        let int8 = spec.quant == Some(Quant::Int8);
        let mut layers = Vec::new();
        for l in m.net.fc_layers() {
            let head = match l.low_rank {
                None => {
                    let w = &m.params[l.weight..l.weight + l.out * l.inp];
                    head_of(w, l.out, l.inp, stored_sparse(w), int8)?
                }
                Some((r, v)) => {
                    let vw = &m.params[v..v + r * l.inp];
                    let uw = &m.params[l.weight..l.weight + l.out * r];
                    Head::LowRank {
                        v: Box::new(head_of(vw, r, l.inp, stored_sparse(vw), int8)?),
                        u: Box::new(head_of(uw, l.out, r, stored_sparse(uw), int8)?),
                        r,
                        zeros: vec![0.0; r],
                    }
                }
            };
            layers.push((
                head,
                m.params[l.bias..l.bias + l.out].to_vec(),
                l.inp,
                l.out,
            ));
        }
        Ok(Self {
            m: m.clone(),
            layers,
            convs: if int8 { Some(int8_stages(m)?) } else { None },
            cs: vec![ConvScratch::default()],
            ws: CnnWork::default(),
            hs: HeadScratch::default(),
            bufs: Default::default(),
        })
    }

    /// Logits of `batch` images (`x` normalized, `[batch, 1, H, W]`); with `head_only`,
    /// `x` is already the features and only the head runs.
    pub fn logits(&mut self, x: &[f32], batch: usize, head_only: bool) -> Result<&[f32]> {
        let mut a = std::mem::take(&mut self.bufs[0]);
        if head_only {
            a.clear();
            a.extend_from_slice(x);
        } else {
            self.features_into(x, batch, &mut a)?;
        }
        let b = &mut self.bufs[1];
        let n = self.layers.len();
        for (i, (h, bias, inp, out)) in self.layers.iter().enumerate() {
            b.resize(batch * out, 0.0);
            h.run(&a, batch, (*inp, *out), bias, &mut self.hs, b);
            if i + 1 < n {
                b.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            std::mem::swap(&mut a, b);
        }
        self.bufs[0] = a;
        Ok(&self.bufs[0])
    }

    /// The features of `batch` images (the head's input).
    pub fn features(&mut self, x: &[f32], batch: usize) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.features_into(x, batch, &mut out)?;
        Ok(out)
    }

    fn features_into(&mut self, x: &[f32], batch: usize, out: &mut Vec<f32>) -> Result<()> {
        let Some(stages) = &self.convs else {
            let f = self
                .m
                .net
                .features(&self.m.params, &self.m.stats, x, batch, &mut self.ws)?;
            out.clear();
            out.extend_from_slice(f);
            return Ok(());
        };
        let per = self.m.net.input_len();
        let feats = self.m.net.fc_layers()[0].inp;
        out.resize(batch * feats, 0.0);
        if batch == 1 {
            // One image on one thread: spreading its small products over the pool
            // measured slower (0.78-0.83 ms against 0.48-0.58).
            int8_features(stages, &x[..per], &mut self.cs[0], out, false);
        } else {
            // Images over the threads, each on one thread with its own buffers.
            let threads = rayon::current_num_threads().max(1);
            self.cs.resize(threads, ConvScratch::default());
            let chunk = batch.div_ceil(threads);
            out.par_chunks_mut(chunk * feats)
                .zip(x.par_chunks(chunk * per))
                .zip(self.cs.par_iter_mut())
                .for_each(|((o, xs), cs)| {
                    for (oi, xi) in o.chunks_mut(feats).zip(xs.chunks(per)) {
                        int8_features(stages, xi, cs, oi, false);
                    }
                });
        }
        Ok(())
    }
}

/// Milliseconds per call of `f`, the median of `reps` timed runs after a warm-up.
fn time_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// Latency of the dense model and of `m` on its compressed kernels, whole model and head.
pub fn latency(
    dense: &CnnModel,
    m: &CnnModel,
    spec: &CompressSpec,
    test: &ImageSet,
) -> Result<Latency> {
    let mut d = Engine::new(dense, &CompressSpec::default())?;
    let mut c = Engine::new(m, spec)?;
    let mut x = Vec::new();
    let mut out = Latency::default();
    for batch in [1usize, 64] {
        let idx: Vec<usize> = (0..batch).map(|i| i % test.len()).collect();
        test.normalized(&idx, PIXEL_MEAN, PIXEL_STD, &mut x);
        let reps = if batch == 1 { 200 } else { 20 };
        let fd = d.features(&x, batch)?;
        let fc = c.features(&x, batch)?;
        let whole_d = time_ms(reps, || d.logits(&x, batch, false).map(|_| ()))?;
        let whole_c = time_ms(reps, || c.logits(&x, batch, false).map(|_| ()))?;
        let head_d = time_ms(reps * 5, || d.logits(&fd, batch, true).map(|_| ()))?;
        let head_c = time_ms(reps * 5, || c.logits(&fc, batch, true).map(|_| ()))?;
        if batch == 1 {
            (
                out.dense_b1,
                out.compressed_b1,
                out.dense_fc_b1,
                out.compressed_fc_b1,
            ) = (whole_d, whole_c, head_d, head_c);
        } else {
            (
                out.dense_b64,
                out.compressed_b64,
                out.dense_fc_b64,
                out.compressed_fc_b64,
            ) = (whole_d, whole_c, head_d, head_c);
        }
    }
    Ok(out)
}

/// Top-1 and top-5 of the compressed engine itself on `set` (its kernels, not the
/// training network's), to check they agree.
pub fn engine_eval(m: &CnnModel, spec: &CompressSpec, set: &ImageSet) -> Result<CnnEval> {
    crate::trainer::check_images(&m.cfg.model, set)?;
    let mut e = Engine::new(m, spec)?;
    crate::trainer::score(set, m.cfg.model.classes, |x, n| {
        Ok(e.logits(x, n, false)?.to_vec())
    })
}

/// Compresses `dense` by `spec`, writes the file to `out` (atomically), reads it back,
/// scores it on `test` and times it: one row of the report, and the model as stored.
pub fn run(
    dense: &CnnModel,
    spec: &CompressSpec,
    train: &ImageSet,
    test: &ImageSet,
    out: Option<&Path>,
    on_step: impl FnMut(&str, u64, u64, f32),
) -> Result<(CompressResult, CnnModel)> {
    let (m, books) = compress(dense, spec, train, test, on_step)?;
    let bytes = encode(&m, spec, &books, Part::All)?;
    let path = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| "compressed".into());
    if let Some(p) = out {
        shoal_runtime::store::write_file_atomically(p, &bytes)?;
    }
    let (stored, _) = decode(&bytes, &path)?;
    // int8 inference quantizes the activations too: its accuracy is the engine's.
    let eval = if spec.quant == Some(Quant::Int8) {
        engine_eval(&stored, spec, test)?
    } else {
        evaluate(&stored.net, &stored.params, &stored.stats, test)?
    };
    let dense_spec = CompressSpec::default();
    let dense_bytes = encode(dense, &dense_spec, &[], Part::All)?.len();
    let weight_bytes = encode(&m, spec, &books, Part::Weights)?.len();
    let dense_weight_bytes = encode(dense, &dense_spec, &[], Part::Weights)?.len();
    let fc_bytes = encode(&m, spec, &books, Part::FcWeights)?.len();
    let dense_fc_bytes = encode(dense, &dense_spec, &[], Part::FcWeights)?.len();
    let latency_ms = latency(dense, &stored, spec, test)?;
    let result = CompressResult {
        label: spec.label(),
        spec: spec.clone(),
        top1: eval.top1,
        top5: eval.top5,
        bytes: bytes.len(),
        dense_bytes,
        ratio: dense_bytes as f64 / bytes.len() as f64,
        weight_bytes,
        dense_weight_bytes,
        weight_ratio: dense_weight_bytes as f64 / weight_bytes as f64,
        fc_ratio: dense_fc_bytes as f64 / fc_bytes as f64,
        latency_ms,
    };
    Ok((result, stored))
}

/// Accuracy when only one weight tensor is pruned, at each of `levels`, for every
/// weight tensor: the per-layer sensitivity analysis (no fine-tuning).
pub fn sensitivity(
    m: &CnnModel,
    test: &ImageSet,
    levels: &[f64],
) -> Result<Vec<(String, Vec<f64>)>> {
    sensitivity_with(m, test, levels, |_, _| {})
}

/// [`sensitivity`], calling `done(n, total)` after each of its `total` evaluations
/// (a progress display).
pub fn sensitivity_with(
    m: &CnnModel,
    test: &ImageSet,
    levels: &[f64],
    mut done: impl FnMut(usize, usize),
) -> Result<Vec<(String, Vec<f64>)>> {
    let mut out = Vec::new();
    let total = m.net.weights().len() * levels.len();
    for t in m.net.weights() {
        let mut accs = Vec::new();
        for &s in levels {
            let mut p = m.params.clone();
            let mask = prune::layer_mask(&p[t.range()], s)?;
            prune::apply_mask(&mut p[t.range()], &mask);
            accs.push(evaluate(&m.net, &p, &m.stats, test)?.top1);
            done(out.len() * levels.len() + accs.len(), total);
        }
        out.push((t.name.clone(), accs));
    }
    Ok(out)
}
