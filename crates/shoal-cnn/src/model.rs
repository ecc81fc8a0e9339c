//! A VGG-style CNN with batch normalisation (blocks of 3x3 convolutions + BN + ReLU,
//! each block closed by 2x2 max pooling, then a fully-connected head with ReLU and
//! dropout) on host kernels over one flat parameter buffer: training forward and
//! backward, and inference. The head holds most of the weights, as in VGG. Parameters
//! carry PyTorch-style names and shapes (`conv1.weight` `[out, in, 3, 3]`,
//! `fc1.weight` `[out, in]`); BN running statistics live in a second buffer.

use crate::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use shoal_kernels::host::conv::{
    batchnorm_backward, batchnorm_train, conv3_backward, conv3_forward, maxpool2, BnScratch,
};
use shoal_kernels::host::sgemm;
use shoal_optim::hash::mix64;

/// The network's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CnnConfig {
    /// Input channels, height, width.
    pub input: [usize; 3],
    /// Convolution widths per block; each block ends with a 2x2 max pool.
    pub blocks: Vec<Vec<usize>>,
    /// Hidden widths of the fully-connected head.
    pub fc: Vec<usize>,
    pub classes: usize,
    pub batch_norm: bool,
    /// Dropout after each hidden fully-connected layer (training only).
    pub dropout: f32,
    /// Per fully-connected layer (hidden ones, then the output), the rank of its
    /// factorization `W = U V` (`U` out x r, `V` r x in), 0 for a full matrix; empty:
    /// all full. SVD compression produces these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fc_rank: Vec<usize>,
}

impl Default for CnnConfig {
    fn default() -> Self {
        Self {
            input: [1, 28, 28],
            blocks: vec![vec![32, 32], vec![64, 64]],
            fc: vec![512, 512],
            classes: 10,
            batch_norm: true,
            dropout: 0.25,
            fc_rank: Vec::new(),
        }
    }
}

/// One named tensor of the parameter (or statistics) buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
}

impl Tensor {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

#[derive(Debug, Clone)]
struct Bn {
    gamma: usize,
    beta: usize,
    mean: usize,
    var: usize,
}

#[derive(Debug, Clone)]
enum Op {
    Conv {
        cin: usize,
        cout: usize,
        h: usize,
        w: usize,
        wt: usize,
        bias: Option<usize>,
        bn: Option<Bn>,
    },
    Pool {
        c: usize,
        h: usize,
        w: usize,
    },
    Fc {
        inp: usize,
        out: usize,
        /// The weight (`out x inp`), or `U` (`out x r`) of a factorized layer.
        w: usize,
        b: usize,
        last: bool,
        /// A factorized layer's rank and the offset of its `V` (`r x inp`).
        low_rank: Option<(usize, usize)>,
    },
}

impl Op {
    fn out_len(&self) -> usize {
        match *self {
            Op::Conv { cout, h, w, .. } => cout * h * w,
            Op::Pool { c, h, w } => c * (h / 2) * (w / 2),
            Op::Fc { out, .. } => out,
        }
    }
}

/// A fully-connected layer as compression sees it: the offsets of its `[out, in]`
/// weight (or factors) and its bias in the parameter buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FcLayer {
    pub inp: usize,
    pub out: usize,
    /// The weight, or `U` (`out x rank`) of a factorized layer.
    pub weight: usize,
    pub bias: usize,
    /// A factorized layer's rank and `V` (`rank x inp`).
    pub low_rank: Option<(usize, usize)>,
}

/// BatchNorm epsilon (PyTorch's default).
pub const BN_EPS: f32 = 1e-5;
/// Running-statistics momentum (PyTorch's default).
pub const BN_MOMENTUM: f32 = 0.1;

/// The network: its layers over a flat parameter buffer.
#[derive(Debug, Clone)]
pub struct Cnn {
    pub cfg: CnnConfig,
    ops: Vec<Op>,
    /// The trainable tensors, in buffer order.
    pub params: Vec<Tensor>,
    /// BN running means and variances.
    pub stats: Vec<Tensor>,
    len: usize,
    stats_len: usize,
}

/// What a forward pass is for.
enum Mode<'a> {
    Train { stats: &'a mut [f32], seed: u64 },
    Infer { stats: &'a [f32] },
}

/// Per-thread scratch of the convolutions.
#[derive(Debug, Default, Clone)]
struct Scratch {
    cols: Vec<f32>,
    dcols: Vec<f32>,
    dw: Vec<f32>,
    db: Vec<f32>,
}

/// Buffers of one batch's forward and backward passes, reused from step to step.
#[derive(Debug, Default)]
pub struct CnnWork {
    acts: Vec<Vec<f32>>,
    pre: Vec<Vec<f32>>,
    xhat: Vec<Vec<f32>>,
    mean: Vec<Vec<f32>>,
    istd: Vec<Vec<f32>>,
    arg: Vec<Vec<u32>>,
    mask: Vec<Vec<f32>>,
    g: Vec<f32>,
    g2: Vec<f32>,
    /// A factorized layer's gradient at its rank.
    lr: Vec<f32>,
    scratch: Vec<Scratch>,
    bn: BnScratch,
}

/// Uniform in [0, 1) from a hash of (a, b).
fn unit(a: u64, b: u64) -> f32 {
    (mix64(a ^ mix64(b)) >> 40) as f32 / (1u64 << 24) as f32
}

impl Cnn {
    pub fn new(cfg: CnnConfig) -> Result<Self> {
        let bad = |field, why: String| Err(Error::Setting { field, why });
        let [c0, h0, w0] = cfg.input;
        if c0 == 0 || h0 == 0 || w0 == 0 {
            return bad(
                "input",
                format!("{:?}: every dimension must be positive", cfg.input),
            );
        }
        if cfg.classes < 2 {
            return bad("classes", format!("{}: at least 2", cfg.classes));
        }
        if !(0.0..1.0).contains(&cfg.dropout) {
            return bad("dropout", format!("{}: must be in [0, 1)", cfg.dropout));
        }
        // Sizes a network of this kind could have (a damaged or mistyped file must not
        // ask for terabytes or overflow a shape): images up to 4,096 on a side and 4,096
        // channels, convolutions of up to 4,096 channels in up to 16 blocks, up to 64
        // fully-connected layers of up to 65,536 units, up to 1,000,000 classes, and up
        // to 2^31 parameters in all.
        let too_big = c0 > 4096
            || h0 > 4096
            || w0 > 4096
            || cfg.classes > 1_000_000
            || cfg.blocks.len() > 16
            || cfg
                .blocks
                .iter()
                .any(|b| b.len() > 16 || b.iter().any(|&x| x > 4096))
            || cfg.fc.len() > 64
            || cfg.fc.iter().chain(&cfg.fc_rank).any(|&x| x > 65_536);
        if too_big {
            return bad(
                "model",
                format!(
                    "input {:?}, blocks {:?}, fc {:?}, classes {}: larger than this network \
                     supports",
                    cfg.input, cfg.blocks, cfg.fc, cfg.classes
                ),
            );
        }
        let flat = cfg
            .blocks
            .iter()
            .fold(c0 as u128 * h0 as u128 * w0 as u128, |_, b| {
                b.last().copied().unwrap_or(1) as u128 * h0 as u128 * w0 as u128
            });
        let head: u128 = cfg
            .fc
            .iter()
            .chain(std::iter::once(&cfg.classes))
            .fold((flat, 0u128), |(inp, sum), &out| {
                (out as u128, sum + inp * out as u128 + out as u128)
            })
            .1;
        if head > 1 << 31 {
            return bad(
                "fc",
                format!("{head} weights in the fully-connected head; at most 2^31"),
            );
        }
        let (mut c, mut h, mut w) = (c0, h0, w0);
        let mut ops = Vec::new();
        let mut params = Vec::new();
        let mut stats = Vec::new();
        let (mut at, mut sat) = (0usize, 0usize);
        let add = |v: &mut Vec<Tensor>, at: &mut usize, name: String, shape: Vec<usize>| {
            let t = Tensor {
                name,
                shape,
                offset: *at,
            };
            *at += t.len();
            let o = t.offset;
            v.push(t);
            o
        };
        let mut k = 0;
        for (bi, block) in cfg.blocks.iter().enumerate() {
            if block.is_empty() {
                return bad("blocks", format!("block {} has no convolution", bi + 1));
            }
            for &cout in block {
                if cout == 0 {
                    return bad("blocks", "a convolution needs at least one channel".into());
                }
                k += 1;
                let wt = add(
                    &mut params,
                    &mut at,
                    format!("conv{k}.weight"),
                    vec![cout, c, 3, 3],
                );
                let (bias, bn) = if cfg.batch_norm {
                    let gamma = add(&mut params, &mut at, format!("bn{k}.weight"), vec![cout]);
                    let beta = add(&mut params, &mut at, format!("bn{k}.bias"), vec![cout]);
                    let mean = add(
                        &mut stats,
                        &mut sat,
                        format!("bn{k}.running_mean"),
                        vec![cout],
                    );
                    let var = add(
                        &mut stats,
                        &mut sat,
                        format!("bn{k}.running_var"),
                        vec![cout],
                    );
                    (
                        None,
                        Some(Bn {
                            gamma,
                            beta,
                            mean,
                            var,
                        }),
                    )
                } else {
                    (
                        Some(add(
                            &mut params,
                            &mut at,
                            format!("conv{k}.bias"),
                            vec![cout],
                        )),
                        None,
                    )
                };
                ops.push(Op::Conv {
                    cin: c,
                    cout,
                    h,
                    w,
                    wt,
                    bias,
                    bn,
                });
                c = cout;
            }
            if h % 2 != 0 || w % 2 != 0 {
                return bad(
                    "blocks",
                    format!("block {} pools a {h}x{w} map: sides must be even", bi + 1),
                );
            }
            ops.push(Op::Pool { c, h, w });
            h /= 2;
            w /= 2;
        }
        let mut inp = c * h * w;
        let n_fc = cfg.fc.len() + 1;
        if !cfg.fc_rank.is_empty() && cfg.fc_rank.len() != n_fc {
            return bad(
                "fc_rank",
                format!(
                    "{} ranks for {n_fc} fully-connected layers",
                    cfg.fc_rank.len()
                ),
            );
        }
        for (i, &out) in cfg
            .fc
            .iter()
            .chain(std::iter::once(&cfg.classes))
            .enumerate()
        {
            if out == 0 {
                return bad("fc", "a layer needs at least one unit".into());
            }
            let rank = cfg.fc_rank.get(i).copied().unwrap_or(0);
            if rank > out.min(inp) {
                return bad(
                    "fc_rank",
                    format!("rank {rank} of fc{}, a {out}x{inp} layer", i + 1),
                );
            }
            let (wt, low_rank) = if rank > 0 {
                let v = add(
                    &mut params,
                    &mut at,
                    format!("fc{}.v.weight", i + 1),
                    vec![rank, inp],
                );
                let u = add(
                    &mut params,
                    &mut at,
                    format!("fc{}.u.weight", i + 1),
                    vec![out, rank],
                );
                (u, Some((rank, v)))
            } else {
                let wt = add(
                    &mut params,
                    &mut at,
                    format!("fc{}.weight", i + 1),
                    vec![out, inp],
                );
                (wt, None)
            };
            let b = add(&mut params, &mut at, format!("fc{}.bias", i + 1), vec![out]);
            ops.push(Op::Fc {
                inp,
                out,
                w: wt,
                b,
                last: i + 1 == n_fc,
                low_rank,
            });
            inp = out;
        }
        Ok(Self {
            cfg,
            ops,
            params,
            stats,
            len: at,
            stats_len: sat,
        })
    }

    /// Values in the parameter buffer.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Values in the statistics buffer.
    pub fn stats_len(&self) -> usize {
        self.stats_len
    }

    /// Values of one input image.
    pub fn input_len(&self) -> usize {
        self.cfg.input.iter().product()
    }

    /// The fully-connected layers, first to last.
    pub fn fc_layers(&self) -> Vec<FcLayer> {
        self.ops
            .iter()
            .filter_map(|o| match *o {
                Op::Fc {
                    inp,
                    out,
                    w,
                    b,
                    low_rank,
                    ..
                } => Some(FcLayer {
                    inp,
                    out,
                    weight: w,
                    bias: b,
                    low_rank,
                }),
                _ => None,
            })
            .collect()
    }

    /// The weight tensors (convolution kernels and fully-connected matrices), which
    /// compression prunes and quantizes; biases and BN parameters are left alone.
    pub fn weights(&self) -> Vec<&Tensor> {
        self.params
            .iter()
            .filter(|t| t.name.ends_with(".weight") && !t.name.starts_with("bn"))
            .collect()
    }

    /// He-uniform weights from `seed`, zero biases, BN at identity; running means 0 and
    /// variances 1.
    pub fn init(&self, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut p = vec![0.0f32; self.len];
        for (ti, t) in self.params.iter().enumerate() {
            if t.name.starts_with("bn") && t.name.ends_with(".weight") {
                p[t.range()].fill(1.0);
            } else if t.name.ends_with(".weight") {
                let fan_in: usize = t.shape[1..].iter().product();
                let a = (6.0 / fan_in as f32).sqrt();
                for (j, v) in p[t.range()].iter_mut().enumerate() {
                    *v = (unit(seed ^ (ti as u64) << 48, j as u64) * 2.0 - 1.0) * a;
                }
            }
        }
        let mut s = vec![0.0f32; self.stats_len];
        for t in &self.stats {
            if t.name.ends_with("running_var") {
                s[t.range()].fill(1.0);
            }
        }
        (p, s)
    }

    fn ensure(&self, ws: &mut CnnWork, batch: usize) {
        let n = self.ops.len();
        ws.acts.resize(n, Vec::new());
        ws.pre.resize(n, Vec::new());
        ws.xhat.resize(n, Vec::new());
        ws.mean.resize(n, Vec::new());
        ws.istd.resize(n, Vec::new());
        ws.arg.resize(n, Vec::new());
        ws.mask.resize(n, Vec::new());
        for (i, op) in self.ops.iter().enumerate() {
            ws.acts[i].resize(batch * op.out_len(), 0.0);
            match *op {
                Op::Conv {
                    cout, h, w, ref bn, ..
                } => {
                    ws.pre[i].resize(batch * cout * h * w, 0.0);
                    if bn.is_some() {
                        ws.xhat[i].resize(batch * cout * h * w, 0.0);
                        ws.mean[i].resize(cout, 0.0);
                        ws.istd[i].resize(cout, 0.0);
                    }
                }
                Op::Pool { .. } => ws.arg[i].resize(batch * op.out_len(), 0),
                Op::Fc {
                    out,
                    last,
                    low_rank,
                    ..
                } => {
                    if !last {
                        ws.mask[i].resize(batch * out, 1.0);
                    }
                    if let Some((r, _)) = low_rank {
                        ws.pre[i].resize(batch * r, 0.0);
                    }
                }
            }
        }
        let threads = rayon::current_num_threads().max(1);
        ws.scratch.resize(threads, Scratch::default());
    }

    /// The training forward pass over `batch` images `x` (`[batch, C, H, W]`); returns
    /// the logits `[batch, classes]`. Batch statistics normalise (the running ones in
    /// `stats` are updated), dropout is drawn from `seed`.
    pub fn forward_train<'w>(
        &self,
        p: &[f32],
        stats: &mut [f32],
        x: &[f32],
        batch: usize,
        seed: u64,
        ws: &'w mut CnnWork,
    ) -> Result<&'w [f32]> {
        self.forward(p, Mode::Train { stats, seed }, x, batch, self.ops.len(), ws)
    }

    /// Logits of `batch` images for inference (running statistics, no dropout).
    pub fn predict<'w>(
        &self,
        p: &[f32],
        stats: &[f32],
        x: &[f32],
        batch: usize,
        ws: &'w mut CnnWork,
    ) -> Result<&'w [f32]> {
        self.forward(p, Mode::Infer { stats }, x, batch, self.ops.len(), ws)
    }

    /// The flattened output of the convolutional part for inference (the input of the
    /// fully-connected head), `[batch, features]`.
    pub fn features<'w>(
        &self,
        p: &[f32],
        stats: &[f32],
        x: &[f32],
        batch: usize,
        ws: &'w mut CnnWork,
    ) -> Result<&'w [f32]> {
        let head = self
            .ops
            .iter()
            .position(|o| matches!(o, Op::Fc { .. }))
            .unwrap_or(self.ops.len());
        if head == 0 {
            return Err(Error::Layout(
                "the network has no convolutional part".into(),
            ));
        }
        self.forward(p, Mode::Infer { stats }, x, batch, head, ws)
    }

    /// Runs the first `upto` operations; returns the last one's output.
    fn forward<'w>(
        &self,
        p: &[f32],
        mut mode: Mode<'_>,
        x: &[f32],
        batch: usize,
        upto: usize,
        ws: &'w mut CnnWork,
    ) -> Result<&'w [f32]> {
        let (stats_len, train, seed) = match &mode {
            Mode::Train { stats, seed } => (stats.len(), true, *seed),
            Mode::Infer { stats } => (stats.len(), false, 0),
        };
        if p.len() != self.len || stats_len != self.stats_len {
            return Err(Error::Layout(format!(
                "{} parameters and {stats_len} statistics for a network of {} and {}",
                p.len(),
                self.len,
                self.stats_len
            )));
        }
        if x.len() != batch * self.input_len() || batch == 0 {
            return Err(Error::Layout(format!(
                "{} input values for {batch} images of {}",
                x.len(),
                self.input_len()
            )));
        }
        self.ensure(ws, batch);
        for i in 0..upto {
            let (before, rest) = ws.acts.split_at_mut(i);
            let input: &[f32] = if i == 0 { x } else { &before[i - 1] };
            let out = &mut rest[0];
            match self.ops[i] {
                Op::Conv {
                    cin,
                    cout,
                    h,
                    w,
                    wt,
                    bias,
                    ref bn,
                } => {
                    let (isz, osz) = (cin * h * w, cout * h * w);
                    let threads = ws.scratch.len();
                    let per = batch.div_ceil(threads);
                    let wts = &p[wt..wt + cout * cin * 9];
                    let b = bias.map(|o| &p[o..o + cout]);
                    let z = &mut ws.pre[i];
                    // (Splitting one image's product over the threads measured slower at
                    // batch 1: the products are small; images are the unit of work.)
                    let conv = |((zc, xc), sc): ((&mut [f32], &[f32]), &mut Scratch)| {
                        sc.cols.resize(cin * 9 * h * w, 0.0);
                        for (zi, xi) in zc.chunks_mut(osz).zip(xc.chunks(isz)) {
                            conv3_forward(xi, (cin, h, w), wts, b, cout, &mut sc.cols, zi, 1);
                        }
                    };
                    if batch == 1 {
                        // On the calling thread: handing one image to the pool costs a
                        // wake-up, and its spinning workers then compete for the cores.
                        conv(((&mut z[..], input), &mut ws.scratch[0]));
                    } else {
                        z.par_chunks_mut(per * osz)
                            .zip(input.par_chunks(per * isz))
                            .zip(ws.scratch.par_iter_mut())
                            .for_each(conv);
                    }
                    let hw = h * w;
                    match (bn, &mut mode) {
                        (Some(bn), Mode::Train { stats, .. }) => {
                            batchnorm_train(
                                z,
                                (batch, cout, hw),
                                &p[bn.gamma..bn.gamma + cout],
                                &p[bn.beta..bn.beta + cout],
                                BN_EPS,
                                &mut ws.mean[i],
                                &mut ws.istd[i],
                                &mut ws.xhat[i],
                                out,
                                true,
                                &mut ws.bn,
                            );
                            let n = (batch * hw) as f32;
                            for ci in 0..cout {
                                let var =
                                    (1.0 / (ws.istd[i][ci] * ws.istd[i][ci]) - BN_EPS).max(0.0) * n
                                        / (n - 1.0).max(1.0);
                                let m = &mut stats[bn.mean + ci];
                                *m += BN_MOMENTUM * (ws.mean[i][ci] - *m);
                                let v = &mut stats[bn.var + ci];
                                *v += BN_MOMENTUM * (var - *v);
                            }
                        }
                        (Some(bn), Mode::Infer { stats }) => {
                            let stats = &**stats;
                            let row = |(r, (o, zv)): (usize, (&mut [f32], &[f32]))| {
                                let ci = r % cout;
                                let is = 1.0 / (stats[bn.var + ci] + BN_EPS).sqrt();
                                let (g, bt, m) =
                                    (p[bn.gamma + ci], p[bn.beta + ci], stats[bn.mean + ci]);
                                for (o, &v) in o.iter_mut().zip(zv) {
                                    *o = (g * (v - m) * is + bt).max(0.0);
                                }
                            };
                            // Over the pool only for more than one image (see above).
                            if batch == 1 {
                                out.chunks_mut(hw)
                                    .zip(z.chunks(hw))
                                    .enumerate()
                                    .for_each(row);
                            } else {
                                out.par_chunks_mut(hw)
                                    .zip(z.par_chunks(hw))
                                    .enumerate()
                                    .for_each(row);
                            }
                        }
                        (None, _) => {
                            let row = |(o, zv): (&mut [f32], &[f32])| {
                                for (o, &v) in o.iter_mut().zip(zv) {
                                    *o = v.max(0.0);
                                }
                            };
                            if batch == 1 {
                                out.chunks_mut(hw).zip(z.chunks(hw)).for_each(row);
                            } else {
                                out.par_chunks_mut(hw).zip(z.par_chunks(hw)).for_each(row);
                            }
                        }
                    }
                }
                Op::Pool { c, h, w } => {
                    let (isz, osz) = (c * h * w, c * (h / 2) * (w / 2));
                    if batch == 1 {
                        maxpool2(input, (c, h, w), out, &mut ws.arg[i]);
                    } else {
                        out.par_chunks_mut(osz)
                            .zip(ws.arg[i].par_chunks_mut(osz))
                            .zip(input.par_chunks(isz))
                            .for_each(|((o, a), xi)| maxpool2(xi, (c, h, w), o, a));
                    }
                }
                Op::Fc {
                    inp,
                    out: n,
                    w,
                    b,
                    last,
                    low_rank,
                } => {
                    for row in out.chunks_mut(n) {
                        row.copy_from_slice(&p[b..b + n]);
                    }
                    let threads = ws.scratch.len();
                    match low_rank {
                        None => sgemm(
                            batch,
                            n,
                            inp,
                            input,
                            inp,
                            1,
                            &p[w..],
                            1,
                            inp,
                            out,
                            n,
                            true,
                            threads,
                        ),
                        Some((r, v)) => {
                            // t = x V^T, then out += t U^T.
                            let t = &mut ws.pre[i];
                            sgemm(
                                batch,
                                r,
                                inp,
                                input,
                                inp,
                                1,
                                &p[v..],
                                1,
                                inp,
                                t,
                                r,
                                false,
                                threads,
                            );
                            sgemm(batch, n, r, t, r, 1, &p[w..], 1, r, out, n, true, threads);
                        }
                    }
                    if !last {
                        out.iter_mut().for_each(|v| *v = v.max(0.0));
                        let keep = 1.0 - self.cfg.dropout;
                        if train && self.cfg.dropout > 0.0 {
                            let mask = &mut ws.mask[i];
                            for (j, (m, v)) in mask.iter_mut().zip(out.iter_mut()).enumerate() {
                                *m = if unit(seed ^ (i as u64) << 56, j as u64) < keep {
                                    1.0 / keep
                                } else {
                                    0.0
                                };
                                *v *= *m;
                            }
                        } else {
                            ws.mask[i].fill(1.0);
                        }
                    }
                }
            }
        }
        Ok(&ws.acts[upto - 1])
    }

    /// Softmax cross-entropy of a training batch (mean over the batch) and its gradient
    /// with respect to every parameter, written into `grad` (same layout as `p`).
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grad(
        &self,
        p: &[f32],
        stats: &mut [f32],
        x: &[f32],
        labels: &[u8],
        seed: u64,
        ws: &mut CnnWork,
        grad: &mut [f32],
    ) -> Result<f32> {
        let batch = labels.len();
        if grad.len() != self.len {
            return Err(Error::Layout(format!(
                "{} gradient values for {} parameters",
                grad.len(),
                self.len
            )));
        }
        let classes = self.cfg.classes;
        if let Some(&l) = labels.iter().find(|&&l| l as usize >= classes) {
            return Err(Error::Layout(format!("label {l} of {classes} classes")));
        }
        self.forward_train(p, stats, x, batch, seed, ws)?;
        let last = self.ops.len() - 1;
        // dlogits = (softmax - onehot) / batch.
        ws.g.resize(batch * classes, 0.0);
        let mut loss = 0.0f64;
        for (bi, (row, g)) in ws.acts[last]
            .chunks(classes)
            .zip(ws.g.chunks_mut(classes))
            .enumerate()
        {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let s: f32 = row.iter().map(|v| (v - m).exp()).sum();
            let y = labels[bi] as usize;
            loss += (s.ln() + m - row[y]) as f64;
            for (j, (gv, &v)) in g.iter_mut().zip(row).enumerate() {
                *gv = ((v - m).exp() / s - if j == y { 1.0 } else { 0.0 }) / batch as f32;
            }
        }
        grad.fill(0.0);
        for i in (0..self.ops.len()).rev() {
            let (before, rest) = ws.acts.split_at(i);
            let input: &[f32] = if i == 0 { x } else { &before[i - 1] };
            let output = &rest[0];
            let need_dx = i > 0;
            match self.ops[i] {
                Op::Fc {
                    inp,
                    out: n,
                    w,
                    b,
                    last,
                    low_rank,
                } => {
                    let g = &mut ws.g;
                    if !last {
                        // Through dropout and ReLU (the output is post-dropout).
                        for ((gv, &m), &o) in g.iter_mut().zip(&ws.mask[i]).zip(output.iter()) {
                            *gv = if o > 0.0 { *gv * m } else { 0.0 };
                        }
                    }
                    for row in g.chunks(n) {
                        for (d, &v) in grad[b..b + n].iter_mut().zip(row) {
                            *d += v;
                        }
                    }
                    let threads = ws.scratch.len();
                    match low_rank {
                        None => {
                            // dW [n, inp] += g^T [n, batch] . input [batch, inp]
                            sgemm(
                                n,
                                inp,
                                batch,
                                g,
                                1,
                                n,
                                input,
                                inp,
                                1,
                                &mut grad[w..w + n * inp],
                                inp,
                                true,
                                threads,
                            );
                            if need_dx {
                                ws.g2.resize(batch * inp, 0.0);
                                sgemm(
                                    batch,
                                    inp,
                                    n,
                                    g,
                                    n,
                                    1,
                                    &p[w..],
                                    inp,
                                    1,
                                    &mut ws.g2,
                                    inp,
                                    false,
                                    threads,
                                );
                                std::mem::swap(&mut ws.g, &mut ws.g2);
                            }
                        }
                        Some((r, v)) => {
                            let t = &ws.pre[i];
                            // dU [n, r] += g^T t; dt [batch, r] = g U; dV [r, inp] += dt^T x;
                            // dx = dt V.
                            sgemm(
                                n,
                                r,
                                batch,
                                g,
                                1,
                                n,
                                t,
                                r,
                                1,
                                &mut grad[w..w + n * r],
                                r,
                                true,
                                threads,
                            );
                            let dt = &mut ws.lr;
                            dt.resize(batch * r, 0.0);
                            sgemm(batch, r, n, g, n, 1, &p[w..], r, 1, dt, r, false, threads);
                            sgemm(
                                r,
                                inp,
                                batch,
                                dt,
                                1,
                                r,
                                input,
                                inp,
                                1,
                                &mut grad[v..v + r * inp],
                                inp,
                                true,
                                threads,
                            );
                            if need_dx {
                                ws.g2.resize(batch * inp, 0.0);
                                sgemm(
                                    batch,
                                    inp,
                                    r,
                                    dt,
                                    r,
                                    1,
                                    &p[v..],
                                    inp,
                                    1,
                                    &mut ws.g2,
                                    inp,
                                    false,
                                    threads,
                                );
                                std::mem::swap(&mut ws.g, &mut ws.g2);
                            }
                        }
                    }
                }
                Op::Pool { c, h, w } => {
                    let (isz, osz) = (c * h * w, c * (h / 2) * (w / 2));
                    ws.g2.resize(batch * isz, 0.0);
                    ws.g2
                        .par_chunks_mut(isz)
                        .zip(ws.arg[i].par_chunks(osz).zip(ws.g.par_chunks(osz)))
                        .for_each(|(dx, (arg, g))| {
                            dx.fill(0.0);
                            for (&a, &gv) in arg.iter().zip(g) {
                                dx[a as usize] += gv;
                            }
                        });
                    std::mem::swap(&mut ws.g, &mut ws.g2);
                }
                Op::Conv {
                    cin,
                    cout,
                    h,
                    w,
                    wt,
                    bias,
                    ref bn,
                } => {
                    let hw = h * w;
                    ws.g.par_chunks_mut(hw)
                        .zip(output.par_chunks(hw))
                        .for_each(|(g, o)| {
                            for (gv, &o) in g.iter_mut().zip(o) {
                                if o <= 0.0 {
                                    *gv = 0.0;
                                }
                            }
                        });
                    // dz: through BN, or the gradient itself.
                    if let Some(bn) = bn {
                        ws.g2.resize(batch * cout * hw, 0.0);
                        let (dg, rest) = grad.split_at_mut(bn.beta);
                        batchnorm_backward(
                            &ws.g,
                            &ws.xhat[i],
                            (batch, cout, hw),
                            &p[bn.gamma..bn.gamma + cout],
                            &ws.istd[i],
                            &mut dg[bn.gamma..bn.gamma + cout],
                            &mut rest[..cout],
                            &mut ws.g2,
                            &mut ws.bn,
                        );
                        std::mem::swap(&mut ws.g, &mut ws.g2);
                    }
                    let (isz, osz) = (cin * hw, cout * hw);
                    let per = batch.div_ceil(ws.scratch.len());
                    let wts = &p[wt..wt + cout * cin * 9];
                    ws.g2.resize(batch * isz, 0.0);
                    let dz = &ws.g;
                    ws.g2
                        .par_chunks_mut(per * isz)
                        .zip(dz.par_chunks(per * osz))
                        .zip(input.par_chunks(per * isz))
                        .zip(ws.scratch.par_iter_mut())
                        .for_each(|(((dxc, dzc), xc), sc)| {
                            sc.cols.resize(cin * 9 * hw, 0.0);
                            sc.dcols.resize(cin * 9 * hw, 0.0);
                            sc.dw.resize(cout * cin * 9, 0.0);
                            sc.dw.fill(0.0);
                            sc.db.resize(cout, 0.0);
                            sc.db.fill(0.0);
                            for ((dxi, dzi), xi) in
                                dxc.chunks_mut(isz).zip(dzc.chunks(osz)).zip(xc.chunks(isz))
                            {
                                conv3_backward(
                                    xi,
                                    (cin, h, w),
                                    wts,
                                    cout,
                                    dzi,
                                    &mut sc.cols,
                                    &mut sc.dcols,
                                    &mut sc.dw,
                                    bias.is_some().then_some(&mut sc.db[..]),
                                    need_dx.then_some(dxi),
                                );
                            }
                        });
                    let used = batch.div_ceil(per);
                    for sc in &ws.scratch[..used] {
                        for (d, &v) in grad[wt..wt + cout * cin * 9].iter_mut().zip(&sc.dw) {
                            *d += v;
                        }
                        if let Some(bo) = bias {
                            for (d, &v) in grad[bo..bo + cout].iter_mut().zip(&sc.db) {
                                *d += v;
                            }
                        }
                    }
                    if need_dx {
                        std::mem::swap(&mut ws.g, &mut ws.g2);
                    }
                }
            }
        }
        Ok((loss / batch as f64) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(batch_norm: bool, dropout: f32) -> Cnn {
        Cnn::new(CnnConfig {
            input: [2, 4, 8],
            blocks: vec![vec![3], vec![2, 3]],
            fc: vec![5],
            classes: 3,
            batch_norm,
            dropout,
            // With BN, the hidden layer factorized (rank 2).
            fc_rank: if batch_norm { vec![2, 0] } else { vec![] },
        })
        .unwrap()
    }

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|j| (unit(seed, j as u64) * 2.0 - 1.0) * scale)
            .collect()
    }

    /// Every parameter's gradient against central differences of the loss, with BN and
    /// dropout (its mask fixed by the seed) and without, batch 3.
    #[test]
    fn gradients_match_finite_differences() {
        for bn in [true, false] {
            let net = tiny(bn, if bn { 0.3 } else { 0.0 });
            let (mut p, mut s) = net.init(5);
            // Non-trivial BN parameters.
            for t in &net.params {
                if t.name.starts_with("bn") {
                    for (j, v) in p[t.range()].iter_mut().enumerate() {
                        *v += 0.3 * (unit(9, (t.offset + j) as u64) - 0.5);
                    }
                }
            }
            let batch = 3;
            let x = values(batch * net.input_len(), 11, 1.0);
            let labels = [0u8, 2, 1];
            let mut ws = CnnWork::default();
            let mut g = vec![0.0; net.len()];
            net.loss_and_grad(&p, &mut s, &x, &labels, 1, &mut ws, &mut g)
                .unwrap();
            for i in 0..net.len() {
                let eps = 2e-3f32;
                let old = p[i];
                p[i] = old + eps;
                let mut g2 = vec![0.0; net.len()];
                let lp = net
                    .loss_and_grad(&p, &mut s.clone(), &x, &labels, 1, &mut ws, &mut g2)
                    .unwrap();
                p[i] = old - eps;
                let lm = net
                    .loss_and_grad(&p, &mut s.clone(), &x, &labels, 1, &mut ws, &mut g2)
                    .unwrap();
                p[i] = old;
                let fd = (lp - lm) / (2.0 * eps);
                let err = (fd - g[i]).abs() / (fd.abs().max(g[i].abs()).max(1e-2));
                assert!(
                    err < 2e-2,
                    "bn {bn}: param {i}: analytic {} vs fd {fd}",
                    g[i]
                );
            }
        }
    }

    /// Shapes and names are PyTorch's; without BN or dropout, inference equals the
    /// training-mode output; one image at a time equals its row of a batch, with BN and
    /// without. (Batch 1 against PyTorch's outputs: this crate's tests/onnx.rs.)
    #[test]
    fn layout_and_inference() {
        let net = Cnn::new(CnnConfig::default()).unwrap();
        let names: Vec<&str> = net.params.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names[0], "conv1.weight");
        assert_eq!(net.params[0].shape, vec![32, 1, 3, 3]);
        let fc = net.fc_layers();
        assert_eq!((fc[0].inp, fc[0].out), (7 * 7 * 64, 512));
        let fc_weights: usize = fc.iter().map(|l| l.inp * l.out).sum();
        let all: usize = net.weights().iter().map(|t| t.len()).sum();
        assert!(fc_weights * 10 > all * 9, "most weights in the head");
        let small = tiny(false, 0.0);
        let (p, s) = small.init(3);
        let x = values(2 * small.input_len(), 4, 1.0);
        let mut ws = CnnWork::default();
        let a = small
            .forward_train(&p, &mut s.clone(), &x, 2, 0, &mut ws)
            .unwrap()
            .to_vec();
        let b = small.predict(&p, &s, &x, 2, &mut ws).unwrap().to_vec();
        assert_eq!(a, b, "without BN or dropout, training and inference agree");
        // One image at a time (run on the calling thread) gives each batch row, with BN
        // and without.
        for net in [small, tiny(true, 0.0)] {
            let (p, s) = net.init(5);
            let all = net.predict(&p, &s, &x, 2, &mut ws).unwrap().to_vec();
            let n = net.input_len();
            let mut w1 = CnnWork::default();
            for (i, img) in x.chunks(n).enumerate() {
                let one = net.predict(&p, &s, img, 1, &mut w1).unwrap();
                let k = one.len();
                assert_eq!(one, &all[i * k..(i + 1) * k], "image {i}");
            }
        }
        assert!(Cnn::new(CnnConfig {
            input: [1, 5, 5],
            ..Default::default()
        })
        .is_err());
    }
}
