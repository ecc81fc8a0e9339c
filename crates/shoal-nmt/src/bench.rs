//! The training-throughput benchmark of the seed's NMT model (`bench/run nmt-train`):
//! fixed-shape batches from Multi30k written to a file the PyTorch peer reads, and
//! shoal's own timed training on the same batches.

use crate::error::io_err;
use crate::trainer::{encode_pairs, Learner, Tokenizers};
use crate::Result;
use crate::{AttentionKind, CellKind, CpuTrain, NmtConfig};
use serde::Serialize;
use shoal_data::{load_parallel, Batch, Batcher, EmptyLines, SubwordTokenizer, BOS, EOS, PAD};
use shoal_optim::{Optimizer, OptimizerConfig};
use shoal_runtime::exchange::PhaseTimes;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Benchmark settings (defaults: the seed's model, batch 32, length 20, vocab 8000).
#[derive(Debug, Clone)]
pub struct NmtBenchOptions {
    pub data_dir: PathBuf,
    pub steps: usize,
    pub warmup: usize,
    pub batch: usize,
    pub len: usize,
    pub vocab: usize,
    pub dump_batches: Option<PathBuf>,
    pub cell: CellKind,
    pub layer_norm: bool,
    /// Fused recurrent operations (false: the engine's step-by-step path).
    pub fused: bool,
}

impl Default for NmtBenchOptions {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("../shared/data/multi30k"),
            steps: 60,
            warmup: 5,
            batch: 32,
            len: 20,
            vocab: 8000,
            dump_batches: None,
            cell: CellKind::Gru,
            layer_norm: false,
            fused: true,
        }
    }
}

/// What the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct NmtBenchResult {
    pub words_per_s: f64,
    pub steps_timed: usize,
    pub seconds: f64,
    pub loss_first: f32,
    pub loss_last: f32,
    /// Every update's loss, warm-up included (the peer trains from the same initial
    /// weights on the same batches, so the two curves must agree).
    pub losses: Vec<f32>,
    pub peak_rss_mb: f64,
    pub threads: usize,
    /// Trainable parameters.
    pub params: usize,
    /// Milliseconds per timed step in each phase (forward, backward, gradients out,
    /// optimizer, parameters in).
    pub ms_per_step: PhaseTimes,
}

/// Fixed-shape `[batch, len]` batches: each pair truncated (source to `len`, target to
/// `len - 1` so that `y EOS` fits) and padded to exactly `len`.
fn fixed_batches(batcher: &Batcher, steps: usize, batch: usize, len: usize) -> Vec<Batch> {
    let ex = batcher.examples();
    let mut out = Vec::with_capacity(steps);
    let mut epoch = 0;
    'outer: loop {
        for idx in batcher.epoch_plan(epoch) {
            if idx.len() < batch {
                continue;
            }
            let mut b = Batch {
                batch_size: batch,
                src_len: len,
                tgt_len: len,
                src: vec![PAD; batch * len],
                src_lens: Vec::with_capacity(batch),
                tgt_in: vec![PAD; batch * len],
                tgt_out: vec![PAD; batch * len],
                tgt_tokens: 0,
            };
            for (r, &i) in idx.iter().enumerate() {
                let s = &ex[i].src[..ex[i].src.len().min(len)];
                let t = &ex[i].tgt[..ex[i].tgt.len().min(len - 1)];
                b.src[r * len..r * len + s.len()].copy_from_slice(s);
                b.src_lens.push(s.len());
                b.tgt_in[r * len] = BOS;
                b.tgt_in[r * len + 1..r * len + 1 + t.len()].copy_from_slice(t);
                b.tgt_out[r * len..r * len + t.len()].copy_from_slice(t);
                b.tgt_out[r * len + t.len()] = EOS;
                b.tgt_tokens += t.len() + 1;
            }
            out.push(b);
            if out.len() == steps {
                break 'outer;
            }
        }
        epoch += 1;
    }
    out
}

/// Where `--dump-batches FILE` puts the initial weights: `FILE.init.safetensors`.
pub fn init_path(batches: &Path) -> PathBuf {
    let mut s = batches.as_os_str().to_owned();
    s.push(".init.safetensors");
    PathBuf::from(s)
}

fn write_batches(path: &Path, batches: &[Batch], vocab: (usize, usize)) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let b0 = &batches[0];
    let mut buf = Vec::new();
    buf.extend_from_slice(b"SHOALNB1");
    for v in [
        batches.len(),
        b0.batch_size,
        b0.src_len,
        b0.tgt_len,
        vocab.0,
        vocab.1,
    ] {
        buf.extend_from_slice(&(v as u32).to_le_bytes());
    }
    for b in batches {
        for ids in [&b.src, &b.tgt_in, &b.tgt_out] {
            for id in ids.iter() {
                buf.extend_from_slice(&id.to_le_bytes());
            }
        }
    }
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    f.write_all(&buf).map_err(io_err(path))?;
    Ok(())
}

/// Runs the benchmark: builds the batches (and writes them for the peer if asked),
/// trains `warmup` untimed and `steps` timed updates, and reports target tokens/s.
pub fn nmt_train(opts: &NmtBenchOptions, mut log: impl FnMut(&str)) -> Result<NmtBenchResult> {
    let dir = shoal_runtime::data::locate(&opts.data_dir, "--data-dir")?;
    let c = load_parallel(
        &dir.join("train.en"),
        &dir.join("train.de"),
        EmptyLines::Skip,
    )?;
    log(&format!(
        "learning {}-token BPE vocabularies on {} pairs",
        opts.vocab,
        c.len()
    ));
    let tok = Tokenizers {
        src: SubwordTokenizer::train(&c.src, opts.vocab)?,
        tgt: SubwordTokenizer::train(&c.tgt, opts.vocab)?,
    };
    let examples = encode_pairs(&tok, &c.src, &c.tgt)?;
    let batcher = Batcher::new(examples, opts.batch, 1000, 1);
    let total = opts.warmup + opts.steps;
    let batches = fixed_batches(&batcher, total, opts.batch, opts.len);
    let vocab = (tok.src.vocab_size(), tok.tgt.vocab_size());
    if let Some(p) = &opts.dump_batches {
        write_batches(p, &batches, vocab)?;
        log(&format!(
            "wrote {} batches to {}",
            batches.len(),
            p.display()
        ));
    }
    let cfg = NmtConfig {
        src_vocab: vocab.0,
        tgt_vocab: vocab.1,
        embed: 128,
        hidden: 128,
        layers: 3,
        cell: opts.cell,
        attention: AttentionKind::None,
        layer_norm: opts.layer_norm,
        dropout: 0.0,
        fused: opts.fused,
        tie_embeddings: false,
    };
    use burn::tensor::backend::Backend;
    CpuTrain::seed(&Default::default(), 0);
    let model = cfg.init::<CpuTrain>(&Default::default())?;
    let n = crate::FlatLayout::of(&model).total;
    let opt = Optimizer::new(OptimizerConfig::default(), n)?;
    let learner_init = Learner::fresh(model, Default::default(), opt, 1.0)?;
    if let Some(p) = &opts.dump_batches {
        // The initial weights beside the batches, by parameter name, for the peer.
        let init = init_path(p);
        let tensors: Vec<(String, Vec<usize>, &[f32])> = learner_init
            .layout
            .params
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    t.shape.clone(),
                    &learner_init.params[t.offset..t.offset + t.len],
                )
            })
            .collect();
        let bytes = shoal_runtime::store::serialize_tensors(&tensors, &init)?;
        std::fs::write(&init, bytes).map_err(io_err(&init))?;
        log(&format!("wrote the initial weights to {}", init.display()));
    }
    let mut learner = learner_init;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(threads);
    log(&format!(
        "shoal: {} params, {} warm-up + {} timed steps, batch {} x len {}, {threads} threads, {} recurrence",
        n,
        opts.warmup,
        opts.steps,
        opts.batch,
        opts.len,
        if opts.fused { "fused" } else { "step-by-step" }
    ));
    let mut losses = Vec::with_capacity(total);
    let mut start = Instant::now();
    let mut words = 0usize;
    for (i, b) in batches.iter().enumerate() {
        if i == opts.warmup {
            start = Instant::now();
            words = 0;
            learner.timing = PhaseTimes::default();
        }
        let s = learner.step(Some(b), 1e-3, i as u64, &mut None)?;
        losses.push(s.loss);
        words += b.tgt_tokens;
    }
    let seconds = start.elapsed().as_secs_f64();
    let per = 1000.0 / opts.steps.max(1) as f64;
    let t = learner.timing;
    let ms_per_step = PhaseTimes {
        forward: t.forward * per,
        backward: t.backward * per,
        grads_out: t.grads_out * per,
        optimizer: t.optimizer * per,
        params_in: t.params_in * per,
        comm: t.comm * per,
    };
    Ok(NmtBenchResult {
        ms_per_step,
        words_per_s: words as f64 / seconds.max(1e-9),
        steps_timed: opts.steps,
        seconds,
        loss_first: losses.first().copied().unwrap_or(f32::NAN),
        loss_last: losses.last().copied().unwrap_or(f32::NAN),
        losses,
        peak_rss_mb: shoal_runtime::sys::peak_rss_mb(),
        threads,
        params: n,
    })
}

/// One recurrent layer, forward and backward (`bench/run gru-layer`).
#[derive(Debug, Clone)]
pub struct RnnLayerOptions {
    pub cell: CellKind,
    pub batch: usize,
    pub hidden: usize,
    pub input: usize,
    pub len: usize,
    pub iters: usize,
    pub warmup: usize,
    pub fused: bool,
}

/// Timing of one recurrent layer.
#[derive(Debug, Clone, Serialize)]
pub struct RnnLayerResult {
    pub ms_per_iter: f64,
    /// Matrix-product FLOPs of forward + backward (3x the forward's), per second.
    pub gflops: f64,
    pub flops_per_iter: f64,
    pub checksum: f64,
}

/// Times `iters` forward+backward passes of one layer on random input (the loss is
/// `sum(out * c)` for a fixed random `c`; gradients of the input and all weights).
pub fn rnn_layer(o: &RnnLayerOptions) -> Result<RnnLayerResult> {
    use burn::tensor::{backend::Backend, Distribution, Tensor};
    type B = CpuTrain;
    let device = Default::default();
    B::seed(&device, 0);
    let layer = crate::RecurrentLayer::<B>::new(o.cell, o.input, o.hidden, false, &device)
        .with_fused(o.fused);
    let x = Tensor::<B, 3>::random(
        [o.batch, o.len, o.input],
        Distribution::Normal(0.0, 1.0),
        &device,
    )
    .require_grad();
    let coef = Tensor::<B, 3>::random(
        [o.batch, o.len, o.hidden],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let mut start = Instant::now();
    let mut checksum = 0.0;
    for i in 0..o.warmup + o.iters {
        if i == o.warmup {
            start = Instant::now();
        }
        let (out, _) = layer.forward(x.clone(), None, layer.zero_state(o.batch, &device));
        let loss = (out * coef.clone()).sum();
        let grads = loss.backward();
        if let Some(g) = x.grad(&grads) {
            checksum = g.sum().into_scalar() as f64;
        }
    }
    let secs = start.elapsed().as_secs_f64() / o.iters.max(1) as f64;
    let g = o.cell.gates() * o.hidden;
    let fwd = 2.0 * (o.batch * o.len) as f64 * ((o.input * g) + (o.hidden * g)) as f64;
    let flops = 3.0 * fwd;
    Ok(RnnLayerResult {
        ms_per_iter: secs * 1000.0,
        gflops: flops / secs / 1e9,
        flops_per_iter: flops,
        checksum,
    })
}

/// Measures the cost model's workload on this machine: the seed NMT model's step (one
/// engine thread, fixed batches) split into compute and optimizer.
pub fn plan_workload(
    data_dir: &Path,
    mut log: impl FnMut(&str),
) -> Result<shoal_runtime::plan::Workload> {
    let opts = NmtBenchOptions {
        data_dir: data_dir.to_path_buf(),
        steps: 12,
        warmup: 3,
        ..Default::default()
    };
    let r = nmt_train(&opts, &mut log)?;
    let ms = r.ms_per_step;
    let step_s = (ms.forward + ms.backward + ms.grads_out + ms.optimizer + ms.params_in) / 1e3;
    Ok(shoal_runtime::plan::Workload {
        grad_bytes: 4.0 * r.params as f64,
        opt_values: r.params as f64,
        opt_s_per_value: ms.optimizer / 1e3 / r.params as f64,
        compute_s: step_s - ms.optimizer / 1e3,
        words_per_step: r.words_per_s * step_s,
    })
}
