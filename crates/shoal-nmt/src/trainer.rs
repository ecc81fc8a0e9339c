//! Single-process NMT training: data preparation (tokenizers learned from the training
//! side), the update loop (engine forward/backward, gradients out through the flat
//! adapter, clipping and the optimizer on flat buffers, parameters written back),
//! checkpoints with exact resume, validation loss, and BLEU of the final model.

use crate::checkpoint::{self, Checkpoint, Meta, FORMAT_VERSION};
use crate::config::NmtTrainConfig;
use crate::decode::{beam_search_batch, greedy, Specials};
use crate::fused::FusedRnnBackend;
use crate::model::DropoutRng;
use crate::{Cpu, CpuTrain, FlatLayout, Seq2Seq};
use crate::{Error, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use shoal_comm::ps::PsState;
use shoal_data::{
    corpus_bleu, load_parallel, Batch, Batcher, Bleu, EmptyLines, Example, SubwordTokenizer, BOS,
    EOS, PAD,
};
use shoal_optim::{clip_grad_norm, LrSchedule, Optimizer};
use shoal_runtime::data::locate;
pub use shoal_runtime::exchange::{Attachment, Exchange, PhaseTimes};
use shoal_runtime::timeline::Timeline;
use std::path::{Path, PathBuf};
use std::time::Instant;

const SPECIALS: Specials = Specials {
    pad: PAD,
    bos: BOS,
    eos: EOS,
};

/// What one update did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Mean per-token loss of the global batch (allreduce) or of this worker's share
    /// (ps modes).
    pub loss: f32,
    pub grad_norm: f32,
    pub lr: f32,
    /// Target tokens this process trained on.
    pub tgt_tokens: usize,
}

/// Progress reports from [`NmtTrainer::run`].
#[derive(Debug, Clone)]
pub enum Event {
    Started {
        /// The steps the learning-rate schedule spans (the planned epochs).
        total_steps: u64,
        /// The step this run will stop at: the planned epochs or `max_steps`, whichever
        /// comes first.
        last_step: u64,
        /// What is left of `max_minutes`, in seconds, when the run has that limit.
        time_limit_s: Option<f64>,
        start_step: u64,
        batches_per_epoch: usize,
        params: usize,
    },
    Step {
        step: u64,
        epoch: u64,
        stats: StepStats,
        tokens_per_s: f64,
    },
    EpochEnd {
        epoch: u64,
        valid_loss: f32,
    },
    /// Validation BLEU during training (`eval.every_steps` / `eval.every_minutes`), of
    /// the checkpoint at `path`; `best`: the best so far (now `RUN/best`).
    Validation {
        step: u64,
        bleu: f64,
        path: PathBuf,
        best: bool,
    },
    Checkpoint {
        step: u64,
        path: PathBuf,
    },
    /// A distributed job's membership changed or it recovered from a change (the
    /// launcher's words, see `shoal_runtime::launch::Report::Membership`).
    Membership {
        text: String,
    },
}

/// Why training stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Epochs,
    MaxSteps,
    MaxMinutes,
}

impl std::fmt::Display for StopReason {
    /// In the configuration's words: what limit the run reached.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Epochs => "all epochs done",
            StopReason::MaxSteps => "max_steps reached",
            StopReason::MaxMinutes => "max_minutes reached",
        })
    }
}

/// The outcome of [`NmtTrainer::run`].
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: u64,
    pub stop: StopReason,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub last_checkpoint: PathBuf,
}

/// Source and target tokenizers.
#[derive(Debug, Clone)]
pub struct Tokenizers {
    pub src: SubwordTokenizer,
    pub tgt: SubwordTokenizer,
}

/// Encodes parallel lines into examples.
pub fn encode_pairs(tok: &Tokenizers, src: &[String], tgt: &[String]) -> Result<Vec<Example>> {
    src.iter()
        .zip(tgt)
        .map(|(s, t)| {
            Ok(Example {
                src: tok.src.encode(s)?,
                tgt: tok.tgt.encode(t)?,
            })
        })
        .collect()
}

/// What a trainer runs on: autodiff over a backend, both with the model's fused
/// operations or (where a backend has none) the step-by-step path. The CPU backend
/// ([`CpuTrain`]) is the default everywhere.
pub trait TrainBackend: AutodiffBackend + FusedRnnBackend
where
    Self::InnerBackend: FusedRnnBackend,
{
}

impl<B> TrainBackend for B
where
    B: AutodiffBackend + FusedRnnBackend,
    B::InnerBackend: FusedRnnBackend,
{
}

/// The mean per-token loss of one padded batch (label smoothing `smoothing`).
fn batch_loss<B: FusedRnnBackend>(
    model: &Seq2Seq<B>,
    b: &Batch,
    smoothing: f32,
    rng: &mut Option<DropoutRng>,
    device: &B::Device,
) -> Tensor<B, 1> {
    model.loss(
        &b.src,
        &b.tgt_in,
        &b.tgt_out,
        b.batch_size,
        b.src_len,
        b.tgt_len,
        PAD,
        smoothing,
        rng,
        device,
    )
}

/// The widest beam [`Translator::translate`] searches.
pub const MAX_BEAM: usize = 256;

/// The longest source sentence (in subword tokens) [`Translator::translate`] takes.
pub const MAX_SOURCE_TOKENS: usize = 1024;

/// A model ready for inference, with its tokenizers, on a device of backend `B`.
#[derive(Debug, Clone)]
pub struct Translator<B: FusedRnnBackend = Cpu> {
    pub model: Seq2Seq<B>,
    pub tok: Tokenizers,
    pub device: B::Device,
}

impl Translator<Cpu> {
    /// Loads the model saved in a checkpoint or run directory (on the CPU).
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_on(path, Default::default())
    }
}

impl<B: FusedRnnBackend> Translator<B> {
    /// Loads the model saved in a checkpoint or run directory onto `device`.
    pub fn load_on(path: &Path, device: B::Device) -> Result<Self> {
        let (dir, ckpt) = checkpoint::load_resolved(path)?;
        let (_, model, _, tok) = restore_model::<B>(&dir, &ckpt, &device)?;
        Ok(Self { model, tok, device })
    }

    /// Translates `lines` (beam 1 = greedy, batched; beam > 1 = beam search per line).
    /// A beam wider than [`MAX_BEAM`] or a line longer than [`MAX_SOURCE_TOKENS`]
    /// subwords is refused (by its line number) before any work.
    pub fn translate(&self, lines: &[String], beam: usize, alpha: f32) -> Result<Vec<String>> {
        self.translate_with(lines, beam, alpha, |_| {})
    }

    /// [`Translator::translate`], calling `done(n)` as the lines translated so far
    /// reach `n` (for a progress display).
    pub fn translate_with(
        &self,
        lines: &[String],
        beam: usize,
        alpha: f32,
        mut done: impl FnMut(usize),
    ) -> Result<Vec<String>> {
        if beam == 0 || beam > MAX_BEAM {
            return Err(Error::Config(format!(
                "beam {beam}: must be in 1..={MAX_BEAM}"
            )));
        }
        if !(alpha.is_finite() && alpha >= 0.0) {
            return Err(Error::Config(format!(
                "alpha {alpha}: the length penalty must be a number >= 0"
            )));
        }
        let device = self.device.clone();
        let sources: Vec<Vec<u32>> = lines
            .iter()
            .map(|l| self.tok.src.encode(l))
            .collect::<std::result::Result<_, _>>()?;
        if let Some((i, s)) = sources
            .iter()
            .enumerate()
            .find(|(_, s)| s.len() > MAX_SOURCE_TOKENS)
        {
            return Err(Error::Config(format!(
                "line {}: {} subword tokens; a sentence to translate has at most \
                 {MAX_SOURCE_TOKENS} (split it)",
                i + 1,
                s.len()
            )));
        }
        let mut outs: Vec<Vec<u32>> = vec![Vec::new(); lines.len()];
        if beam <= 1 {
            // Batches of similar length.
            let mut order: Vec<usize> = (0..sources.len()).collect();
            order.sort_by_key(|&i| sources[i].len());
            let mut n = 0;
            for chunk in order.chunks(64) {
                let srcs: Vec<Vec<u32>> = chunk.iter().map(|&i| sources[i].clone()).collect();
                let res = greedy(&self.model, &srcs, SPECIALS, &device)?;
                for (&i, r) in chunk.iter().zip(res) {
                    outs[i] = r;
                }
                n += chunk.len();
                done(n);
            }
        } else {
            // Sentences of similar length searched together, every hypothesis a row.
            let mut order: Vec<usize> = (0..sources.len()).collect();
            order.sort_by_key(|&i| sources[i].len());
            let mut n = 0;
            for chunk in order.chunks(32) {
                let srcs: Vec<Vec<u32>> = chunk.iter().map(|&i| sources[i].clone()).collect();
                let res = beam_search_batch(&self.model, &srcs, beam, alpha, SPECIALS, &device)?;
                for (&i, r) in chunk.iter().zip(res) {
                    outs[i] = r;
                }
                n += chunk.len();
                done(n);
            }
        }
        outs.iter().map(|o| Ok(self.tok.tgt.decode(o)?)).collect()
    }
}

fn restore_model<B: Backend>(
    dir: &Path,
    ckpt: &Checkpoint,
    device: &B::Device,
) -> Result<(NmtTrainConfig, Seq2Seq<B>, FlatLayout, Tokenizers)> {
    let fail = |why: String| Error::Checkpoint {
        path: dir.to_path_buf(),
        why,
    };
    if ckpt.meta.kind != "nmt" {
        return Err(fail(format!(
            "holds a '{}' model, not an NMT model",
            ckpt.meta.kind
        )));
    }
    let cfg: NmtTrainConfig = toml::from_str(&ckpt.meta.config_toml)
        .map_err(|e| fail(format!("its configuration: {e}")))?;
    let tok = Tokenizers {
        src: SubwordTokenizer::from_json(&ckpt.meta.src_tokenizer)
            .map_err(|e| fail(format!("source tokenizer: {e}")))?,
        tgt: SubwordTokenizer::from_json(&ckpt.meta.tgt_tokenizer)
            .map_err(|e| fail(format!("target tokenizer: {e}")))?,
    };
    let model = cfg
        .model_config(tok.src.vocab_size(), tok.tgt.vocab_size())
        .init::<B>(device)?;
    let layout = FlatLayout::of(&model);
    let want: Vec<(String, Vec<usize>)> = layout
        .params
        .iter()
        .map(|p| (p.name.clone(), p.shape.clone()))
        .collect();
    if want != ckpt.meta.params {
        return Err(fail(
            "its parameters do not match the model its configuration describes".into(),
        ));
    }
    let model = layout.write_params(model, &ckpt.params)?;
    Ok((cfg, model, layout, tok))
}

/// When the phases of the last update began and ended (for a timeline).
#[derive(Debug, Clone, Copy)]
pub struct StepMarks {
    pub start: Instant,
    pub forward_end: Instant,
    /// The gradients taken out of the engine.
    pub backward_end: Instant,
    /// The exchange with the other workers (start = end in one process).
    pub exchange: (Instant, Instant),
    /// The optimizer's pass (with the clipping; in a ps job, the clipping before the
    /// push).
    pub optimizer: (Instant, Instant),
    /// The parameters written back into the model.
    pub params: (Instant, Instant),
}

impl Default for StepMarks {
    fn default() -> Self {
        let t = Instant::now();
        Self {
            start: t,
            forward_end: t,
            backward_end: t,
            exchange: (t, t),
            optimizer: (t, t),
            params: (t, t),
        }
    }
}

/// Records an update's phases in the timeline: the batch's preparation (`data`), then
/// the learner's marks.
fn record_step(t: &mut Timeline, step: u64, data: (Instant, Instant), m: &StepMarks) {
    t.span("data", step, data.0, data.1);
    t.span("forward", step, m.start, m.forward_end);
    t.span("backward", step, m.forward_end, m.backward_end);
    if m.exchange.0 != m.exchange.1 {
        t.span("exchange", step, m.exchange.0, m.exchange.1);
    }
    t.span("optimizer", step, m.optimizer.0, m.optimizer.1);
    t.span("params in", step, m.params.0, m.params.1);
}

/// The model with its flat parameter, gradient and optimizer buffers: one update is
/// engine forward/backward, gradients out through the flat adapter, the exchange with
/// the other workers (if any), clipping, the optimizer on flat buffers, and the
/// parameters written back.
pub struct Learner<B: TrainBackend = CpuTrain>
where
    B::InnerBackend: FusedRnnBackend,
{
    pub model: Seq2Seq<B>,
    /// Where the model lives.
    pub device: B::Device,
    pub layout: FlatLayout,
    pub params: Vec<f32>,
    /// The flat gradient, with two extra slots at the end that travel with it through
    /// the allreduce: the batch's weight (target tokens) and its weighted loss.
    grads: Vec<f32>,
    pub opt: Optimizer,
    pub clip_norm: f32,
    /// Label smoothing of the training loss (0: none; validation is always plain).
    pub label_smoothing: f32,
    /// This worker's place in a distributed job (None: one process).
    pub exchange: Option<Attachment>,
    /// Seconds spent in each phase of the updates so far.
    pub timing: PhaseTimes,
    /// The phases of the last update.
    pub marks: StepMarks,
}

impl<B: TrainBackend> Learner<B>
where
    B::InnerBackend: FusedRnnBackend,
{
    /// Wraps `model` (on `device`; its current parameters are `params`, in layout order).
    pub fn new(
        model: Seq2Seq<B>,
        device: B::Device,
        layout: FlatLayout,
        params: Vec<f32>,
        opt: Optimizer,
        clip_norm: f32,
    ) -> Self {
        let grads = vec![0.0; layout.total + 2];
        Self {
            model,
            device,
            layout,
            params,
            grads,
            opt,
            clip_norm,
            label_smoothing: 0.0,
            exchange: None,
            timing: PhaseTimes::default(),
            marks: StepMarks::default(),
        }
    }

    /// A learner for a freshly initialised `model` on `device`.
    pub fn fresh(
        model: Seq2Seq<B>,
        device: B::Device,
        opt: Optimizer,
        clip_norm: f32,
    ) -> Result<Self> {
        let layout = FlatLayout::of(&model);
        let mut params = vec![0.0; layout.total];
        layout.read_params(&model, &mut params)?;
        Ok(Self::new(model, device, layout, params, opt, clip_norm))
    }

    /// One update on `batch` with learning rate `lr`. `step` numbers the update (it
    /// seeds the dropout masks, tags the exchange and names it in errors). In a
    /// distributed job `batch` is this worker's share of the global batch (None when
    /// the share is empty: the worker still takes part with weight 0).
    pub fn step(
        &mut self,
        batch: Option<&Batch>,
        lr: f32,
        step: u64,
        rng: &mut Option<DropoutRng>,
    ) -> Result<StepStats> {
        let t0 = Instant::now();
        let total = self.layout.total;
        let (mut value, tokens) = match batch {
            Some(b) if b.batch_size > 0 => {
                let loss = batch_loss(&self.model, b, self.label_smoothing, rng, &self.device);
                let value: f32 = loss.clone().into_scalar().elem();
                if !value.is_finite() {
                    return Err(Error::Diverged { step, loss: value });
                }
                let t1 = Instant::now();
                self.marks.forward_end = t1;
                let mut grads = loss.backward();
                let t2 = Instant::now();
                self.layout
                    .take_grads(&self.model, &mut grads, &mut self.grads[..total])?;
                self.timing.forward += (t1 - t0).as_secs_f64();
                self.timing.backward += (t2 - t1).as_secs_f64();
                self.timing.grads_out += t2.elapsed().as_secs_f64();
                (value, b.tgt_tokens)
            }
            _ => {
                self.grads.fill(0.0);
                self.marks.forward_end = t0;
                (0.0, 0)
            }
        };
        let t3 = Instant::now();
        self.marks.start = t0;
        self.marks.backward_end = t3;
        self.marks.exchange = (t3, t3);
        let mut t_comm = 0.0;
        let grad_norm = match self.exchange.as_mut().map(Attachment::exchange) {
            None => {
                let norm = self.clip_and_step(lr)?;
                self.marks.optimizer = (t3, Instant::now());
                norm
            }
            Some(Exchange::Allreduce(comm)) => {
                // Weighted by tokens, the summed gradients divided by the summed
                // weights are the gradient of the global batch's per-token mean loss.
                let w = tokens as f32;
                self.grads[..total].iter_mut().for_each(|g| *g *= w);
                self.grads[total] = w;
                self.grads[total + 1] = value * w;
                let tc = Instant::now();
                comm.allreduce_sum(&mut self.grads)?;
                let te = Instant::now();
                t_comm = (te - tc).as_secs_f64();
                self.marks.exchange = (tc, te);
                let sum_w = self.grads[total];
                if sum_w > 0.0 {
                    value = self.grads[total + 1] / sum_w;
                    let inv = 1.0 / sum_w;
                    self.grads[..total].iter_mut().for_each(|g| *g *= inv);
                }
                let norm = self.clip_and_step(lr)?;
                self.marks.optimizer = (te, Instant::now());
                norm
            }
            Some(Exchange::Ps(client)) => {
                // Clipping is per worker here (the shards never see the whole gradient).
                let g = &mut self.grads[..total];
                let norm = if self.clip_norm > 0.0 {
                    clip_grad_norm(g, self.clip_norm)
                } else {
                    shoal_optim::global_norm(g)
                };
                let tc = Instant::now();
                client.push_weighted(step, lr, tokens as f32, g, None)?;
                client.pull(step + 1, &mut self.params)?;
                let te = Instant::now();
                t_comm = (te - tc).as_secs_f64();
                self.marks.exchange = (tc, te);
                self.marks.optimizer = (t3, tc);
                norm
            }
        };
        let t4 = Instant::now();
        self.model = self.layout.write_params(self.model.clone(), &self.params)?;
        let t5 = Instant::now();
        self.marks.params = (t4, t5);
        let tm = &mut self.timing;
        tm.comm += t_comm;
        // Optimizer time excludes the exchange.
        tm.optimizer += (t4 - t3).as_secs_f64() - t_comm;
        tm.params_in += (t5 - t4).as_secs_f64();
        Ok(StepStats {
            loss: value,
            grad_norm,
            lr,
            tgt_tokens: tokens,
        })
    }

    /// Clips the gradient (or measures its norm) and applies the local optimizer.
    fn clip_and_step(&mut self, lr: f32) -> Result<f32> {
        let g = &self.grads[..self.layout.total];
        let norm = shoal_optim::global_norm(g);
        // Clipping scales the gradient inside the optimizer's pass.
        let scale = if self.clip_norm > 0.0 {
            shoal_optim::clip_coefficient(norm, self.clip_norm)
        } else {
            1.0
        };
        self.opt.step_scaled(lr, &mut self.params, g, scale)?;
        Ok(norm)
    }

    /// Makes every worker start from the same parameters and optimizer state: rank 0's
    /// are broadcast (allreduce) or sent to the shards, which the workers then pull
    /// (ps). `step` is the update the job starts at.
    pub fn synchronise(&mut self, step: u64) -> Result<()> {
        let rank = self.exchange.as_ref().map_or(0, Attachment::rank);
        match self.exchange.as_mut().map(Attachment::exchange) {
            None => return Ok(()),
            Some(Exchange::Allreduce(comm)) => comm.broadcast(&mut self.params, 0)?,
            Some(Exchange::Ps(client)) => {
                if rank == 0 {
                    client.init_state(&PsState {
                        applied: step,
                        optimizer_steps: self.opt.steps(),
                        params: self.params.clone(),
                        buffers: self.opt.state_owned(),
                    })?;
                }
                client.pull(step, &mut self.params)?;
            }
        }
        self.model = self.layout.write_params(self.model.clone(), &self.params)?;
        Ok(())
    }

    /// The optimizer's step count and state buffers: local, or fetched from the
    /// parameter servers (which own them in a ps job).
    pub fn optimizer_state(&mut self) -> Result<(u64, NamedBuffers)> {
        if let Some(client) = self.exchange.as_mut().and_then(Attachment::shards) {
            let st = client.state()?;
            return Ok((st.optimizer_steps, st.buffers));
        }
        Ok((self.opt.steps(), self.opt.state_owned()))
    }
}

/// Named flat buffers (optimizer state).
pub type NamedBuffers = Vec<(String, Vec<f32>)>;

/// One validation sentence with its translation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub source: String,
    pub reference: String,
    pub hypothesis: String,
}

/// Position in the data and in the optimisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub step: u64,
    pub epoch: u64,
    pub batch: u64,
}

/// One training process, on a device of backend `B` (the CPU by default).
pub struct NmtTrainer<B: TrainBackend = CpuTrain>
where
    B::InnerBackend: FusedRnnBackend,
{
    cfg: NmtTrainConfig,
    run_dir: PathBuf,
    learner: Learner<B>,
    sched: LrSchedule,
    tok: Tokenizers,
    batcher: Batcher,
    plan: Vec<Vec<usize>>,
    plan_epoch: Option<u64>,
    pos: Position,
    losses: Vec<f32>,
    train_seconds: f64,
    batch: Batch,
    /// This worker's place among `cfg.dist.workers`.
    rank: usize,
    /// The best validation BLEU of the run so far (during-training evaluations).
    best_bleu: Option<f64>,
}

impl NmtTrainer<CpuTrain> {
    /// A fresh run on the CPU: reads the data, learns the tokenizers, initialises the
    /// model. Checkpoints go to `run_dir`.
    pub fn new(cfg: NmtTrainConfig, run_dir: &Path) -> Result<Self> {
        Self::with_tokenizers(cfg, run_dir, None)
    }

    /// Learns the source and target tokenizers from the configured training data.
    pub fn learn_tokenizers(cfg: &NmtTrainConfig) -> Result<Tokenizers> {
        cfg.validate()?;
        let corpus = Self::train_corpus(cfg)?;
        Self::learn(cfg, &corpus)
    }

    /// [`NmtTrainer::with_tokenizers_on`] on the CPU.
    pub fn with_tokenizers(
        cfg: NmtTrainConfig,
        run_dir: &Path,
        tok: Option<Tokenizers>,
    ) -> Result<Self> {
        Self::with_tokenizers_on(cfg, run_dir, tok, Default::default())
    }

    /// [`NmtTrainer::resume_on`] on the CPU.
    pub fn resume(
        path: &Path,
        adjust: impl FnOnce(&NmtTrainConfig) -> Result<NmtTrainConfig>,
    ) -> Result<Self> {
        Self::resume_on(path, adjust, Default::default())
    }
}

impl<B: TrainBackend> NmtTrainer<B>
where
    B::InnerBackend: FusedRnnBackend,
{
    fn learn(cfg: &NmtTrainConfig, corpus: &(Vec<String>, Vec<String>)) -> Result<Tokenizers> {
        Ok(Tokenizers {
            src: SubwordTokenizer::train(&corpus.0, cfg.data.src_vocab)?,
            tgt: SubwordTokenizer::train(&corpus.1, cfg.data.tgt_vocab)?,
        })
    }

    /// A fresh run on `device` with tokenizers already learnt (the workers of a
    /// distributed job share the launcher's), or learnt here when None.
    pub fn with_tokenizers_on(
        cfg: NmtTrainConfig,
        run_dir: &Path,
        tok: Option<Tokenizers>,
        device: B::Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let corpus = Self::train_corpus(&cfg)?;
        let tok = match tok {
            Some(t) => t,
            None => Self::learn(&cfg, &corpus)?,
        };
        let mcfg = cfg.model_config(tok.src.vocab_size(), tok.tgt.vocab_size());
        // Parameter initialisation is drawn from the engine's seeded generator.
        B::seed(&device, cfg.train.seed);
        let model = mcfg.init::<B>(&device)?;
        let layout = FlatLayout::of(&model);
        let mut params = vec![0.0; layout.total];
        layout.read_params(&model, &mut params)?;
        Self::assemble(
            cfg, run_dir, model, device, layout, params, tok, &corpus, None,
        )
    }

    /// Continues the run saved at `path` (a checkpoint or run directory) on `device`.
    /// `adjust` may change the loaded configuration's stopping rules (epochs, steps,
    /// minutes) and checkpoint cadence; other changes are refused since they would not
    /// continue the same run.
    pub fn resume_on(
        path: &Path,
        adjust: impl FnOnce(&NmtTrainConfig) -> Result<NmtTrainConfig>,
        device: B::Device,
    ) -> Result<Self> {
        let (dir, ckpt) = checkpoint::load_resolved(path)?;
        let (saved, model, layout, tok) = restore_model::<B>(&dir, &ckpt, &device)?;
        let cfg = adjust(&saved)?;
        let mut same = cfg.clone();
        same.train.epochs = saved.train.epochs;
        same.train.max_steps = saved.train.max_steps;
        same.train.max_minutes = saved.train.max_minutes;
        same.train.checkpoint_every = saved.train.checkpoint_every;
        same.train.keep_checkpoints = saved.train.keep_checkpoints;
        same.train.threads = saved.train.threads;
        same.train.device = saved.train.device;
        same.train.timeline = saved.train.timeline.clone();
        same.train.timeline_steps = saved.train.timeline_steps;
        same.eval = saved.eval.clone();
        if same != saved {
            return Err(Error::Config(
                "--resume continues a run with its saved configuration; only epochs, max_steps, max_minutes, checkpoint_every, keep_checkpoints, threads, device, timeline and eval settings may change".into(),
            ));
        }
        cfg.validate()?;
        let corpus = Self::train_corpus(&cfg)?;
        let run_dir = dir.parent().unwrap_or(Path::new(".")).to_path_buf();
        let params = ckpt.params.clone();
        Self::assemble(
            cfg,
            &run_dir,
            model,
            device,
            layout,
            params,
            tok,
            &corpus,
            Some(&ckpt),
        )
    }

    fn train_corpus(cfg: &NmtTrainConfig) -> Result<(Vec<String>, Vec<String>)> {
        let empty = if cfg.data.skip_empty {
            EmptyLines::Skip
        } else {
            EmptyLines::Error
        };
        let (src, tgt) = (
            locate(&cfg.data.train_src, "--data-dir")?,
            locate(&cfg.data.train_tgt, "--data-dir")?,
        );
        let mut c = load_parallel(&src, &tgt, empty)?;
        if cfg.data.train_limit > 0 {
            c.src.truncate(cfg.data.train_limit);
            c.tgt.truncate(cfg.data.train_limit);
        }
        Ok((c.src, c.tgt))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        cfg: NmtTrainConfig,
        run_dir: &Path,
        model: Seq2Seq<B>,
        device: B::Device,
        layout: FlatLayout,
        params: Vec<f32>,
        tok: Tokenizers,
        corpus: &(Vec<String>, Vec<String>),
        ckpt: Option<&Checkpoint>,
    ) -> Result<Self> {
        let examples = encode_pairs(&tok, &corpus.0, &corpus.1)?;
        // The plan is of global batches; each worker trains on its share of each.
        let batcher = Batcher::new(
            examples,
            cfg.train.batch_size * cfg.dist.workers,
            cfg.data.max_len,
            cfg.train.seed,
        );
        if batcher.is_empty() {
            return Err(Error::Config(format!(
                "{}: no usable training pairs",
                cfg.data.train_src.display()
            )));
        }
        let mut opt = Optimizer::new(cfg.train.optimizer_config(), layout.total)?;
        let per_epoch = batcher.num_batches() as u64;
        // The schedule spans the planned epochs; max_steps and max_minutes only stop the
        // run early (so a run stopped and resumed gets the same learning rates).
        let planned = match cfg.train.epochs {
            0 => cfg.train.max_steps,
            e => e * per_epoch,
        };
        let sched = LrSchedule {
            kind: cfg.train.schedule,
            base: cfg.train.lr as f32,
            warmup_steps: cfg.train.warmup_steps,
            total_steps: planned,
            min_ratio: cfg.train.min_lr_ratio as f32,
        };
        let mut pos = Position::default();
        let mut losses = Vec::new();
        let mut train_seconds = 0.0;
        if let Some(c) = ckpt {
            let bufs: Vec<(&str, &[f32])> = c
                .optimizer
                .iter()
                .map(|(n, d)| (n.as_str(), d.as_slice()))
                .collect();
            opt.load_state(c.meta.optimizer_steps, &bufs)?;
            pos = Position {
                step: c.meta.step,
                epoch: c.meta.epoch,
                batch: c.meta.batch,
            };
            losses = c.meta.losses.clone();
            train_seconds = c.meta.train_seconds;
        }
        let clip = cfg.train.clip_norm;
        let mut learner = Learner::new(model, device, layout, params, opt, clip as f32);
        learner.label_smoothing = cfg.train.label_smoothing as f32;
        Ok(Self {
            cfg,
            run_dir: run_dir.to_path_buf(),
            learner,
            sched,
            tok,
            batcher,
            plan: Vec::new(),
            plan_epoch: None,
            pos,
            losses,
            train_seconds,
            batch: Batch::default(),
            rank: 0,
            best_bleu: shoal_runtime::store::best(run_dir)
                .and_then(|b| shoal_runtime::info::read_metrics(&b).ok())
                .and_then(|m| m.get("bleu").copied()),
        })
    }

    /// Joins a distributed job in the place `a` gives (its rank of `dist.workers`, and
    /// how gradients meet); every worker then starts from rank 0's parameters (and, for
    /// parameter servers, optimizer state).
    pub fn attach(&mut self, a: Attachment) -> Result<()> {
        // An elastic job may have fewer workers than it was configured with; the global
        // batch stays the configured one.
        self.cfg
            .dist
            .check_world(a.workers(), &format!("worker {}", a.rank()))?;
        self.rank = a.rank();
        self.learner.exchange = Some(a);
        self.learner.synchronise(self.pos.step)
    }

    /// This worker's rank (0 in a single process).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Where the time of the updates went so far.
    pub fn timing(&self) -> PhaseTimes {
        self.learner.timing
    }

    /// The current flat parameters.
    pub fn params(&self) -> &[f32] {
        &self.learner.params
    }

    /// Takes the attachment back (to [`Attachment::close`] it at the end).
    pub fn detach(&mut self) -> Option<Attachment> {
        self.learner.exchange.take()
    }

    pub fn config(&self) -> &NmtTrainConfig {
        &self.cfg
    }

    pub fn position(&self) -> Position {
        self.pos
    }

    /// The run directory (checkpoints, `latest`, event files).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Loss of every update so far (across resumes).
    pub fn losses(&self) -> &[f32] {
        &self.losses
    }

    pub fn num_params(&self) -> usize {
        self.learner.layout.total
    }

    pub fn tokenizers(&self) -> &Tokenizers {
        &self.tok
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.batcher.num_batches()
    }

    /// The planned number of updates.
    pub fn total_steps(&self) -> u64 {
        self.sched.total_steps
    }

    /// One update on `batch`: forward, backward, gradients to the flat buffer, clip,
    /// optimizer step, parameters back into the model.
    pub fn train_step(&mut self, batch: Option<&Batch>) -> Result<StepStats> {
        let p = self.cfg.model.dropout;
        let step = self.pos.step;
        // Each worker draws its own dropout masks.
        let seed = self.cfg.train.seed ^ (self.rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut rng = (p > 0.0).then(|| DropoutRng::new(seed, step, p as f32));
        let lr = self.sched.lr(step);
        let stats = self.learner.step(batch, lr, step, &mut rng)?;
        self.pos.step += 1;
        self.losses.push(stats.loss);
        Ok(stats)
    }

    /// Saves a checkpoint of the current state into the run directory and makes it the
    /// latest one (in a distributed job only rank 0 calls this; with parameter servers
    /// it fetches their optimizer state).
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let (optimizer_steps, optimizer) = self.learner.optimizer_state()?;
        let mut ckpt = Checkpoint {
            meta: Meta {
                format_version: FORMAT_VERSION,
                kind: "nmt".into(),
                config_toml: self.cfg.to_toml(),
                src_tokenizer: self.tok.src.to_json()?,
                tgt_tokenizer: self.tok.tgt.to_json()?,
                step: self.pos.step,
                epoch: self.pos.epoch,
                batch: self.pos.batch,
                optimizer_steps,
                train_seconds: self.train_seconds,
                losses: self.losses.clone(),
                params: self
                    .learner
                    .layout
                    .params
                    .iter()
                    .map(|p| (p.name.clone(), p.shape.clone()))
                    .collect(),
                crc32: Default::default(),
                meta_crc32: None,
            },
            params: self.learner.params.clone(),
            optimizer,
        };
        let dir = checkpoint::step_dir(&self.run_dir, self.pos.step);
        ckpt.save(&dir)?;
        checkpoint::publish(&self.run_dir, &dir, self.cfg.train.keep_checkpoints)?;
        Ok(dir)
    }

    /// Trains until the configured epochs, steps or minutes are used up, writing
    /// checkpoints on the way and at the end.
    pub fn run(&mut self, mut on_event: impl FnMut(&Event)) -> Result<RunSummary> {
        let t = &self.cfg.train;
        let max_steps = if t.max_steps > 0 {
            t.max_steps
        } else {
            u64::MAX
        };
        let max_secs = if t.max_minutes > 0.0 {
            t.max_minutes * 60.0
        } else {
            f64::INFINITY
        };
        let epochs = if t.epochs > 0 { t.epochs } else { u64::MAX };
        let every = t.checkpoint_every;
        let planned_end = match t.epochs {
            0 => u64::MAX,
            _ => self.total_steps(),
        };
        on_event(&Event::Started {
            total_steps: self.total_steps(),
            last_step: planned_end.min(max_steps),
            time_limit_s: max_secs
                .is_finite()
                .then_some((max_secs - self.train_seconds).max(0.0)),
            start_step: self.pos.step,
            batches_per_epoch: self.batcher.num_batches(),
            params: self.learner.layout.total,
        });
        let mut timeline = self.join_timeline()?;
        let start = Instant::now();
        let base_seconds = self.train_seconds;
        let start_step = self.pos.step;
        let mut tokens = 0usize;
        let mut last_ckpt = None;
        // The next time-scheduled validation, in seconds of training.
        let (eval_steps, eval_minutes) = (self.cfg.eval.every_steps, self.cfg.eval.every_minutes);
        let mut next_eval_s = match eval_minutes {
            m if m > 0.0 => ((base_seconds / (m * 60.0)).floor() + 1.0) * m * 60.0,
            _ => f64::INFINITY,
        };
        let stop = loop {
            if self.pos.step >= max_steps {
                break StopReason::MaxSteps;
            }
            if self.pos.epoch >= epochs {
                break StopReason::Epochs;
            }
            if base_seconds + start.elapsed().as_secs_f64() >= max_secs {
                break StopReason::MaxMinutes;
            }
            if self.plan_epoch != Some(self.pos.epoch) {
                self.plan = self.batcher.epoch_plan(self.pos.epoch);
                self.plan_epoch = Some(self.pos.epoch);
            }
            let Some(global) = self.plan.get(self.pos.batch as usize) else {
                if self.rank == 0 {
                    let tv = Instant::now();
                    let valid_loss = self.valid_loss()?;
                    let step = self.pos.step;
                    if let Some(t) = timeline.as_mut() {
                        if t.wants(step) {
                            t.span("validation", step, tv, Instant::now());
                            t.flush()?;
                        }
                    }
                    on_event(&Event::EpochEnd {
                        epoch: self.pos.epoch,
                        valid_loss,
                    });
                }
                self.pos.epoch += 1;
                self.pos.batch = 0;
                continue;
            };
            let world = self.learner.exchange.as_ref().map_or(1, |a| a.workers());
            let (a, b) = shoal_comm::collective::split_range(global.len(), world, self.rank);
            let mut batch = std::mem::take(&mut self.batch);
            let td = Instant::now();
            let share = if a < b {
                self.batcher.fill_batch(&global[a..b], &mut batch)?;
                Some(&batch)
            } else {
                None
            };
            let data = (td, Instant::now());
            let stats = self.train_step(share);
            self.batch = batch;
            let stats = stats?;
            self.pos.batch += 1;
            tokens += stats.tgt_tokens;
            let elapsed = start.elapsed().as_secs_f64();
            self.train_seconds = base_seconds + elapsed;
            on_event(&Event::Step {
                step: self.pos.step,
                epoch: self.pos.epoch,
                stats,
                tokens_per_s: tokens as f64 / elapsed.max(1e-9),
            });
            let mut recording = false;
            if let Some(t) = timeline.as_mut() {
                recording = t.wants(self.pos.step);
                if recording {
                    record_step(t, self.pos.step, data, &self.learner.marks);
                }
            }
            if self.rank == 0 && every > 0 && self.pos.step.is_multiple_of(every) {
                let tc = Instant::now();
                let path = self.save_checkpoint()?;
                if let Some(t) = timeline.as_mut().filter(|_| recording) {
                    t.span("checkpoint", self.pos.step, tc, Instant::now());
                }
                on_event(&Event::Checkpoint {
                    step: self.pos.step,
                    path: path.clone(),
                });
                last_ckpt = Some(path);
            }
            if let Some(t) = timeline.as_mut().filter(|_| recording) {
                t.flush()?;
            }
            let by_steps = eval_steps > 0 && self.pos.step.is_multiple_of(eval_steps);
            let by_time = eval_minutes > 0.0 && self.train_seconds >= next_eval_s;
            if self.rank == 0 && (by_steps || by_time) {
                if by_time {
                    while next_eval_s <= self.train_seconds {
                        next_eval_s += eval_minutes * 60.0;
                    }
                }
                let path = match &last_ckpt {
                    Some(p) if *p == checkpoint::step_dir(&self.run_dir, self.pos.step) => {
                        p.clone()
                    }
                    _ => {
                        let path = self.save_checkpoint()?;
                        on_event(&Event::Checkpoint {
                            step: self.pos.step,
                            path: path.clone(),
                        });
                        last_ckpt = Some(path.clone());
                        path
                    }
                };
                let bleu = self.valid_bleu()?.0.score;
                shoal_runtime::info::record_metrics(&path, &[("bleu", bleu)])?;
                let best = self.best_bleu.is_none_or(|b| bleu > b);
                if best {
                    self.best_bleu = Some(bleu);
                    shoal_runtime::store::mark_best(&self.run_dir, &path)?;
                }
                on_event(&Event::Validation {
                    step: self.pos.step,
                    bleu,
                    path,
                    best,
                });
            }
        };
        let seconds = start.elapsed().as_secs_f64();
        let last_checkpoint = match last_ckpt {
            Some(p) if p == checkpoint::step_dir(&self.run_dir, self.pos.step) => p,
            _ if self.rank != 0 => checkpoint::step_dir(&self.run_dir, self.pos.step),
            _ => {
                let path = self.save_checkpoint()?;
                on_event(&Event::Checkpoint {
                    step: self.pos.step,
                    path: path.clone(),
                });
                path
            }
        };
        // Training alone, this process made the timeline and closes it (a job's
        // launcher closes the job's).
        if timeline.is_some() && self.learner.exchange.is_none() {
            shoal_runtime::timeline::finish(Path::new(&self.cfg.train.timeline))?;
        }
        Ok(RunSummary {
            steps: self.pos.step - start_step,
            stop,
            seconds,
            tokens_per_s: tokens as f64 / seconds.max(1e-9),
            last_checkpoint,
        })
    }

    /// This process's recorder of `train.timeline` (None when unset): training alone it
    /// makes the file; a worker joins the one its launcher made.
    fn join_timeline(&self) -> Result<Option<Timeline>> {
        let t = &self.cfg.train;
        if t.timeline.is_empty() {
            return Ok(None);
        }
        let path = Path::new(&t.timeline);
        let label = match self.learner.exchange {
            None => {
                shoal_runtime::timeline::start(path)?;
                "shoal train nmt".to_string()
            }
            Some(_) => format!("worker {}", self.rank),
        };
        Ok(Some(Timeline::join(
            path,
            self.rank,
            &label,
            t.timeline_steps,
        )?))
    }

    /// The inference copy of the current model.
    pub fn translator(&self) -> Translator<B::InnerBackend> {
        Translator {
            model: self.learner.model.valid(),
            tok: self.tok.clone(),
            device: self.learner.device.clone(),
        }
    }

    /// Mean per-token loss of the validation set (teacher forcing, no dropout).
    pub fn valid_loss(&self) -> Result<f32> {
        let c = &self.cfg.data;
        let empty = if c.skip_empty {
            EmptyLines::Skip
        } else {
            EmptyLines::Error
        };
        let v = load_parallel(
            &locate(&c.valid_src, "--data-dir")?,
            &locate(&c.valid_tgt, "--data-dir")?,
            empty,
        )?;
        let ex = encode_pairs(&self.tok, &v.src, &v.tgt)?;
        let b = Batcher::new(ex, 64, c.max_len, 0);
        let model = self.learner.model.valid();
        let (mut sum, mut n) = (0.0f64, 0usize);
        for idx in b.epoch_plan(0) {
            let batch = b.make_batch(&idx);
            let l: f32 = batch_loss(&model, &batch, 0.0, &mut None, &self.learner.device)
                .into_scalar()
                .elem();
            sum += l as f64 * batch.tgt_tokens as f64;
            n += batch.tgt_tokens;
        }
        Ok((sum / n.max(1) as f64) as f32)
    }

    /// Translates the validation source with the eval settings and scores it with BLEU.
    /// Returns the score and every sentence's source, reference and translation.
    pub fn valid_bleu(&self) -> Result<(Bleu, Vec<Sample>)> {
        let c = &self.cfg.data;
        let empty = if c.skip_empty {
            EmptyLines::Skip
        } else {
            EmptyLines::Error
        };
        let mut v = load_parallel(
            &locate(&c.valid_src, "--data-dir")?,
            &locate(&c.valid_tgt, "--data-dir")?,
            empty,
        )?;
        if self.cfg.eval.valid_limit > 0 {
            v.src.truncate(self.cfg.eval.valid_limit);
            v.tgt.truncate(self.cfg.eval.valid_limit);
        }
        let hyps =
            self.translator()
                .translate(&v.src, self.cfg.eval.beam, self.cfg.eval.alpha as f32)?;
        let bleu = corpus_bleu(&hyps, &v.tgt)?;
        let samples = v
            .src
            .into_iter()
            .zip(v.tgt)
            .zip(hyps)
            .map(|((source, reference), hypothesis)| Sample {
                source,
                reference,
                hypothesis,
            })
            .collect();
        Ok((bleu, samples))
    }
}
