//! Click-through-rate models on flat buffers with host kernels (the engine's per-op
//! overhead dominates models this small, and their embeddings are sparse rows pulled
//! per batch): logistic regression, factorization machine, DeepFM (FM and an MLP
//! sharing the embeddings) and Wide & Deep (first-order weights and an MLP).
//!
//! Each field of an example contributes one sparse row `[w, v_1..v_k]` (LR: `[w]`), the
//! caller gathering the rows of a batch into `rows` (`batch x fields x width`). The
//! dense parameters (bias, MLP) are one flat buffer. `forward_backward` returns the
//! summed log loss and writes the gradients of the batch-mean loss: dense, and one per
//! gathered row (the caller sums those of repeated keys).

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use shoal_kernels::host::sgemm;
use shoal_optim::hash::mix64;

/// Which model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum CtrKind {
    Lr,
    Fm,
    Deepfm,
    WideDeep,
}

/// A CTR model's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CtrConfig {
    pub kind: CtrKind,
    pub fields: usize,
    /// Embedding (factor) dimension.
    pub dim: usize,
    /// Hidden layer widths of the MLP (DeepFM, Wide & Deep).
    pub hidden: Vec<usize>,
}

impl CtrConfig {
    fn fm(&self) -> bool {
        matches!(self.kind, CtrKind::Fm | CtrKind::Deepfm)
    }

    fn deep(&self) -> bool {
        matches!(self.kind, CtrKind::Deepfm | CtrKind::WideDeep)
    }

    /// Values per sparse row: the first-order weight, then the embedding.
    pub fn row_width(&self) -> usize {
        match self.kind {
            CtrKind::Lr => 1,
            _ => 1 + self.dim,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |why: &str| {
            Err(Error::Setting {
                field: "ctr",
                why: why.to_string(),
            })
        };
        if self.fields == 0 {
            return bad("at least one field");
        }
        if self.kind != CtrKind::Lr && self.dim == 0 {
            return bad("dim must be at least 1");
        }
        if self.deep() && (self.hidden.is_empty() || self.hidden.contains(&0)) {
            return bad("the MLP needs hidden layers of at least one unit");
        }
        // Sizes a model of this kind could have (a damaged or mistyped file must not
        // ask for terabytes): rows of at most 4,096 values, 100,000 fields, MLP layers of
        // at most 65,536 units and at most 2^31 dense values in all.
        if self.dim > 4096 || self.fields > 100_000 {
            return bad("dim must be at most 4096 and fields at most 100,000");
        }
        if self.hidden.len() > 64 || self.hidden.iter().any(|&h| h > 65_536) {
            return bad("the MLP has at most 64 layers of at most 65,536 units");
        }
        let mut dense: u128 = 1;
        let mut inp = (self.fields * self.dim) as u128;
        for &out in self.hidden.iter().chain(std::iter::once(&1)) {
            dense += inp * out as u128 + out as u128;
            inp = out as u128;
        }
        if self.deep() && dense > 1 << 31 {
            return bad(&format!("{dense} dense values; at most 2^31"));
        }
        Ok(())
    }
}

/// One dense layer's place in the flat buffer.
#[derive(Debug, Clone, Copy)]
struct Layer {
    inp: usize,
    out: usize,
    w: usize,
    b: usize,
}

/// Activations and gradients of one batch, kept between steps (no allocation per step
/// once the largest batch has been seen).
#[derive(Debug, Default, Clone)]
pub struct Workspace {
    x: Vec<f32>,
    acts: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    dx: Vec<f32>,
    sums: Vec<f32>,
    /// The logit of every example of the last batch.
    pub logits: Vec<f32>,
    dlogit: Vec<f32>,
}

/// A CTR model: its configuration and the layout of its dense parameters.
#[derive(Debug, Clone)]
pub struct CtrModel {
    pub cfg: CtrConfig,
    layers: Vec<Layer>,
    dense_len: usize,
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CtrModel {
    pub fn new(cfg: CtrConfig) -> Result<Self> {
        cfg.validate()?;
        let mut layers = Vec::new();
        let mut at = 1; // the global bias
        if cfg.deep() {
            let mut inp = cfg.fields * cfg.dim;
            for &out in cfg.hidden.iter().chain(std::iter::once(&1)) {
                layers.push(Layer {
                    inp,
                    out,
                    w: at,
                    b: at + inp * out,
                });
                at += inp * out + out;
                inp = out;
            }
        }
        Ok(Self {
            cfg,
            layers,
            dense_len: at,
        })
    }

    /// Values in the dense parameter buffer.
    pub fn dense_len(&self) -> usize {
        self.dense_len
    }

    /// Initial dense parameters: zero bias, Glorot-uniform weights from `seed`.
    pub fn init_dense(&self, seed: u64) -> Vec<f32> {
        let mut p = vec![0.0; self.dense_len];
        for (li, l) in self.layers.iter().enumerate() {
            let a = (6.0 / (l.inp + l.out) as f32).sqrt();
            for i in 0..l.inp * l.out {
                let h = mix64(seed ^ mix64(((li as u64) << 40) ^ i as u64));
                p[l.w + i] = ((h >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a;
            }
        }
        p
    }

    fn check(&self, dense: &[f32], rows: &[f32], batch: usize) -> Result<()> {
        let want = batch * self.cfg.fields * self.cfg.row_width();
        if dense.len() != self.dense_len || rows.len() != want {
            return Err(Error::Layout(format!(
                "ctr model: {} dense values (want {}) and {} row values (want {want})",
                dense.len(),
                self.dense_len,
                rows.len()
            )));
        }
        Ok(())
    }

    /// Logits of a batch into `ws.logits`.
    pub fn forward(
        &self,
        dense: &[f32],
        rows: &[f32],
        batch: usize,
        ws: &mut Workspace,
    ) -> Result<()> {
        self.check(dense, rows, batch)?;
        let (f, k, w) = (self.cfg.fields, self.cfg.dim, self.cfg.row_width());
        ws.logits.clear();
        ws.logits.resize(batch, dense[0]);
        ws.sums.resize(batch * k, 0.0);
        for b in 0..batch {
            let r = &rows[b * f * w..(b + 1) * f * w];
            let mut z = 0.0f32;
            for fi in 0..f {
                z += r[fi * w];
            }
            if self.cfg.fm() {
                let s = &mut ws.sums[b * k..(b + 1) * k];
                s.fill(0.0);
                let mut sq = 0.0f32;
                for fi in 0..f {
                    for (d, sd) in s.iter_mut().enumerate() {
                        let v = r[fi * w + 1 + d];
                        *sd += v;
                        sq += v * v;
                    }
                }
                z += 0.5 * (s.iter().map(|x| x * x).sum::<f32>() - sq);
            }
            ws.logits[b] += z;
        }
        if self.cfg.deep() {
            // x = the concatenated embeddings.
            ws.x.resize(batch * f * k, 0.0);
            for b in 0..batch {
                for fi in 0..f {
                    let src = &rows[(b * f + fi) * w + 1..(b * f + fi) * w + 1 + k];
                    ws.x[(b * f + fi) * k..(b * f + fi + 1) * k].copy_from_slice(src);
                }
            }
            ws.acts.resize(self.layers.len(), Vec::new());
            for (li, l) in self.layers.iter().enumerate() {
                let (before, rest) = ws.acts.split_at_mut(li);
                let input: &[f32] = if li == 0 { &ws.x } else { &before[li - 1] };
                let out = &mut rest[0];
                out.resize(batch * l.out, 0.0);
                for row in out.chunks_mut(l.out) {
                    row.copy_from_slice(&dense[l.b..l.b + l.out]);
                }
                sgemm(
                    batch,
                    l.out,
                    l.inp,
                    input,
                    l.inp,
                    1,
                    &dense[l.w..],
                    l.out,
                    1,
                    out,
                    l.out,
                    true,
                    1,
                );
                if li + 1 < self.layers.len() {
                    out.iter_mut().for_each(|v| *v = v.max(0.0));
                }
            }
            let last = &ws.acts[self.layers.len() - 1];
            for (z, d) in ws.logits.iter_mut().zip(last) {
                *z += d;
            }
        }
        Ok(())
    }

    /// Forward and backward of a batch with 0/1 `labels`: returns the summed log loss
    /// and writes the gradients of the mean loss into `dense_grad` (overwritten) and
    /// `row_grad` (one per gathered row value, overwritten).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &self,
        dense: &[f32],
        rows: &[f32],
        labels: &[f32],
        batch: usize,
        ws: &mut Workspace,
        dense_grad: &mut [f32],
        row_grad: &mut [f32],
    ) -> Result<f64> {
        self.forward(dense, rows, batch, ws)?;
        if labels.len() != batch
            || dense_grad.len() != self.dense_len
            || row_grad.len() != rows.len()
        {
            return Err(Error::Layout(
                "ctr model: gradient or label buffers of the wrong size".into(),
            ));
        }
        let (f, k, w) = (self.cfg.fields, self.cfg.dim, self.cfg.row_width());
        let inv = 1.0 / batch as f32;
        let mut loss = 0.0f64;
        ws.dlogit.resize(batch, 0.0);
        for ((d, &z), &y) in ws.dlogit.iter_mut().zip(&ws.logits).zip(labels) {
            // log(1 + e^z) - y z, stable for large |z|.
            loss += (z.max(0.0) + (-z.abs()).exp().ln_1p() - y * z) as f64;
            *d = (sigmoid(z) - y) * inv;
        }
        dense_grad.fill(0.0);
        row_grad.fill(0.0);
        dense_grad[0] = ws.dlogit.iter().sum();
        for b in 0..batch {
            let g = ws.dlogit[b];
            let r = &rows[b * f * w..(b + 1) * f * w];
            let rg = &mut row_grad[b * f * w..(b + 1) * f * w];
            for fi in 0..f {
                rg[fi * w] = g;
                if self.cfg.fm() {
                    let s = &ws.sums[b * k..(b + 1) * k];
                    for d in 0..k {
                        rg[fi * w + 1 + d] = g * (s[d] - r[fi * w + 1 + d]);
                    }
                }
            }
        }
        if self.cfg.deep() {
            let n = self.layers.len();
            ws.grads.resize(n, Vec::new());
            // Gradient at the output layer's pre-activation: dlogit.
            ws.grads[n - 1].clear();
            ws.grads[n - 1].extend_from_slice(&ws.dlogit);
            for li in (0..n).rev() {
                let l = self.layers[li];
                let input: &[f32] = if li == 0 { &ws.x } else { &ws.acts[li - 1] };
                let (lower, upper) = ws.grads.split_at_mut(li);
                let gout = &upper[0];
                // Bias and weight gradients.
                for row in gout.chunks(l.out) {
                    for (db, g) in dense_grad[l.b..l.b + l.out].iter_mut().zip(row) {
                        *db += g;
                    }
                }
                sgemm(
                    l.inp,
                    l.out,
                    batch,
                    input,
                    1,
                    l.inp,
                    gout,
                    l.out,
                    1,
                    &mut dense_grad[l.w..],
                    l.out,
                    true,
                    1,
                );
                // Gradient of the input: into the layer below (through its ReLU) or x.
                let gin: &mut Vec<f32> = if li == 0 {
                    &mut ws.dx
                } else {
                    &mut lower[li - 1]
                };
                gin.resize(batch * l.inp, 0.0);
                sgemm(
                    batch,
                    l.inp,
                    l.out,
                    gout,
                    l.out,
                    1,
                    &dense[l.w..],
                    1,
                    l.out,
                    gin,
                    l.inp,
                    false,
                    1,
                );
                if li > 0 {
                    for (g, a) in gin.iter_mut().zip(&ws.acts[li - 1]) {
                        if *a <= 0.0 {
                            *g = 0.0;
                        }
                    }
                }
            }
            for b in 0..batch {
                for fi in 0..f {
                    let src = &ws.dx[(b * f + fi) * k..(b * f + fi + 1) * k];
                    let dst = &mut row_grad[(b * f + fi) * w + 1..(b * f + fi) * w + 1 + k];
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d += s;
                    }
                }
            }
        }
        Ok(loss)
    }
}
