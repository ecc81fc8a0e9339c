//! The seed's NMT model: embedding, a stacked GRU/LSTM encoder and decoder, optional
//! Luong (global, general score) or Bahdanau (additive) attention, and a softmax over
//! the target vocabulary, trained with teacher forcing and a padding-masked loss.

use crate::fused::{linear_cross_entropy, FusedRnnBackend};
use crate::rnn::{CellKind, RecurrentLayer, RnnState};
use crate::{Error, Result};
use burn::module::{Module, Param};
use burn::tensor::activation::{log_softmax, softmax, tanh};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use shoal_optim::hash::mix64;
use std::sync::Arc;

/// Attention variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum AttentionKind {
    /// No attention: the decoder starts from the encoder's final state only.
    None,
    /// Luong et al. 2015, global attention with the "general" score over the top
    /// decoder layer's output (no input feeding, so teacher-forced training computes
    /// attention for all steps at once).
    #[default]
    Luong,
    /// Bahdanau et al. 2015, additive attention from the previous decoder state; the
    /// context is fed to the first decoder layer at every step.
    Bahdanau,
}

/// Model shape. Defaults are the seed's configuration (3 x 128 GRU, embedding 128).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NmtConfig {
    pub src_vocab: usize,
    pub tgt_vocab: usize,
    pub embed: usize,
    pub hidden: usize,
    pub layers: usize,
    pub cell: CellKind,
    pub attention: AttentionKind,
    pub layer_norm: bool,
    /// Dropout on embeddings, between layers and before the output projection.
    pub dropout: f32,
    /// Fused whole-sequence recurrent operations where supported (see
    /// [`crate::fused`]); `false` runs the step-by-step reference path.
    pub fused: bool,
    /// The output layer's matrix is the target embedding's (Press & Wolf 2017; needs
    /// `embed == hidden`): one `[tgt_vocab, embed]` matrix fewer to learn.
    pub tie_embeddings: bool,
}

impl Default for NmtConfig {
    fn default() -> Self {
        Self {
            src_vocab: 8000,
            tgt_vocab: 8000,
            embed: 128,
            hidden: 128,
            layers: 3,
            cell: CellKind::Gru,
            attention: AttentionKind::Luong,
            layer_norm: false,
            dropout: 0.0,
            fused: true,
            tie_embeddings: false,
        }
    }
}

impl NmtConfig {
    /// The number of trainable values the model has (computed from the sizes, without
    /// building it; saturating, so absurd sizes give a huge count rather than wrapping).
    pub fn param_count(&self) -> u128 {
        let (e, h, l) = (self.embed as u128, self.hidden as u128, self.layers as u128);
        let g = self.cell.gates() as u128;
        let layer = |input: u128| {
            let norms = if self.layer_norm { 4 * g * h } else { 0 };
            g * h * input + g * h * h + 2 * g * h + norms
        };
        let stack = |first: u128| {
            if l == 0 {
                0
            } else {
                layer(first) + (l - 1) * layer(h)
            }
        };
        let dec_in = if self.attention == AttentionKind::Bahdanau {
            e + h
        } else {
            e
        };
        let attn = match self.attention {
            AttentionKind::None => 0,
            AttentionKind::Luong => h * h + 2 * h * h + h,
            AttentionKind::Bahdanau => 2 * h * h + h + 2 * h * h + h,
        };
        let (sv, tv) = (self.src_vocab as u128, self.tgt_vocab as u128);
        let out = if self.tie_embeddings { 0 } else { tv * h };
        (sv + tv) * e + stack(e) + stack(dec_in) + attn + out + tv
    }

    /// Checks that every size is usable.
    pub fn validate(&self) -> Result<()> {
        let check = |field: &'static str, v: usize| {
            if v == 0 {
                Err(Error::Setting {
                    field,
                    why: "must be at least 1".into(),
                })
            } else {
                Ok(())
            }
        };
        check("model.src_vocab", self.src_vocab)?;
        check("model.tgt_vocab", self.tgt_vocab)?;
        check("model.embed", self.embed)?;
        check("model.hidden", self.hidden)?;
        check("model.layers", self.layers)?;
        if self.tie_embeddings && self.embed != self.hidden {
            return Err(Error::Setting {
                field: "model.tie_embeddings",
                why: format!(
                    "the output layer reads the decoder's {}-wide output, so the tied \
                     target embedding must be as wide: model.embed is {}",
                    self.hidden, self.embed
                ),
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Setting {
                field: "model.dropout",
                why: format!("{} is not in [0, 1)", self.dropout),
            });
        }
        // The parameters alone must fit in memory (4 bytes a value; a damaged or
        // mistyped configuration must not ask for terabytes).
        let values = self.param_count();
        let avail = shoal_runtime::sys::available_memory_bytes().unwrap_or(u64::MAX) as u128;
        if values > 1 << 33 || values * 4 > avail {
            return Err(Error::Setting {
                field: "model",
                why: format!(
                    "{values} parameters ({:.1} GB) do not fit in the {:.1} GB of memory available",
                    values as f64 * 4e-9,
                    avail as f64 / 1e9
                ),
            });
        }
        Ok(())
    }

    /// Builds a freshly initialised model.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Seq2Seq<B>> {
        self.validate()?;
        let h = self.hidden;
        let uniform = |rows: usize, cols: usize, k: f64| {
            Param::from_tensor(Tensor::random(
                [rows, cols],
                Distribution::Uniform(-k, k),
                device,
            ))
        };
        let dec_in0 = if self.attention == AttentionKind::Bahdanau {
            self.embed + h
        } else {
            self.embed
        };
        let stack = |first: usize| {
            (0..self.layers)
                .map(|l| {
                    let input = if l == 0 { first } else { h };
                    RecurrentLayer::new(self.cell, input, h, self.layer_norm, device)
                        .with_fused(self.fused)
                })
                .collect::<Vec<_>>()
        };
        let kh = 1.0 / (h as f64).sqrt();
        let attn = match self.attention {
            AttentionKind::None => None,
            kind => Some(Attention {
                w_score: uniform(h, h, kh),
                w_query: match kind {
                    AttentionKind::Bahdanau => Some(uniform(h, h, kh)),
                    _ => None,
                },
                v: match kind {
                    AttentionKind::Bahdanau => Some(Param::from_tensor(Tensor::random(
                        [h],
                        Distribution::Uniform(-kh, kh),
                        device,
                    ))),
                    _ => None,
                },
                w_combine: uniform(h, 2 * h, 1.0 / ((2 * h) as f64).sqrt()),
                b_combine: Param::from_tensor(Tensor::zeros([h], device)),
            }),
        };
        Ok(Seq2Seq {
            src_embed: Param::from_tensor(Tensor::random(
                [self.src_vocab, self.embed],
                Distribution::Normal(0.0, 1.0),
                device,
            )),
            // Tied, it is also the output layer: N(0, 1/embed) as fairseq's shared
            // embeddings, so the first logits are of the untied layer's size.
            tgt_embed: Param::from_tensor(Tensor::random(
                [self.tgt_vocab, self.embed],
                Distribution::Normal(
                    0.0,
                    if self.tie_embeddings {
                        1.0 / (self.embed as f64).sqrt()
                    } else {
                        1.0
                    },
                ),
                device,
            )),
            encoder: stack(self.embed),
            decoder: stack(dec_in0),
            attn,
            out_weight: (!self.tie_embeddings).then(|| uniform(self.tgt_vocab, h, kh)),
            out_bias: Param::from_tensor(Tensor::zeros([self.tgt_vocab], device)),
            config: self.clone(),
        })
    }
}

/// Attention parameters. Luong uses `w_score` (`score = h_t W s_j`); Bahdanau uses
/// `w_score` on the encoder side, `w_query` on the decoder side and `v`
/// (`score = v . tanh(W s_j + W_q h_{t-1})`). Both combine context and decoder output as
/// `tanh(W_c [c; h] + b_c)`.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub w_score: Param<Tensor<B, 2>>,
    pub w_query: Option<Param<Tensor<B, 2>>>,
    pub v: Option<Param<Tensor<B, 1>>>,
    pub w_combine: Param<Tensor<B, 2>>,
    pub b_combine: Param<Tensor<B, 1>>,
}

/// What the encoder hands the decoder.
#[derive(Debug, Clone)]
pub struct Encoded<B: Backend> {
    /// Top-layer outputs `[B, S, H]`.
    pub outputs: Tensor<B, 3>,
    /// Per-layer final states.
    pub states: Vec<RnnState<B>>,
    /// `[B, S]`: 1.0 for real source tokens, 0.0 for padding.
    pub mask: Tensor<B, 2>,
    /// Bahdanau only: the encoder side of the score, `[B, S, H]`, computed once.
    pub keys: Option<Tensor<B, 3>>,
}

impl<B: Backend> Encoded<B> {
    /// Picks batch rows `idx` (beam search).
    pub fn select(&self, idx: Tensor<B, 1, Int>) -> Self {
        Self {
            outputs: self.outputs.clone().select(0, idx.clone()),
            states: self.states.iter().map(|s| s.select(idx.clone())).collect(),
            mask: self.mask.clone().select(0, idx.clone()),
            keys: self.keys.as_ref().map(|k| k.clone().select(0, idx)),
        }
    }
}

/// The decoder's state between steps (inference).
#[derive(Debug, Clone)]
pub struct DecoderState<B: Backend> {
    pub layers: Vec<RnnState<B>>,
}

impl<B: Backend> DecoderState<B> {
    pub fn select(&self, idx: Tensor<B, 1, Int>) -> Self {
        Self {
            layers: self.layers.iter().map(|s| s.select(idx.clone())).collect(),
        }
    }
}

/// A deterministic dropout mask source (so that a resumed run draws the same masks as
/// an uninterrupted one): a SplitMix64 stream seeded per training step.
#[derive(Debug, Clone)]
pub struct DropoutRng {
    state: u64,
    p: f32,
}

impl DropoutRng {
    /// The stream of update `step` of a run seeded `seed`. Its start is a hash of both:
    /// a SplitMix64 stream advances by a fixed increment, so starts that differ by a
    /// multiple of it (as `seed ^ step * increment` did for every other step) would
    /// give the same masks shifted by a few positions.
    pub fn new(seed: u64, step: u64, p: f32) -> Self {
        Self {
            state: mix64(mix64(seed) ^ step),
            p,
        }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }
}

/// Applies inverted dropout to `x` with masks drawn from `rng` (no-op when `None`).
fn dropout<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    rng: &mut Option<DropoutRng>,
) -> Tensor<B, D> {
    let Some(r) = rng.as_mut() else { return x };
    if r.p <= 0.0 {
        return x;
    }
    let shape = x.shape();
    let n = shape.num_elements();
    let keep = 1.0 - r.p;
    let scale = 1.0 / keep;
    let threshold = (keep as f64 * (u64::MAX as f64)) as u64;
    let mask: Vec<f32> = (0..n)
        .map(|_| if r.next() < threshold { scale } else { 0.0 })
        .collect();
    let mask = Tensor::<B, D>::from_data(TensorData::new(mask, shape), &x.device());
    x * mask
}

/// The sequence-to-sequence model.
#[derive(Module, Debug)]
pub struct Seq2Seq<B: Backend> {
    /// `[src_vocab, E]`
    pub src_embed: Param<Tensor<B, 2>>,
    /// `[tgt_vocab, E]`
    pub tgt_embed: Param<Tensor<B, 2>>,
    pub encoder: Vec<RecurrentLayer<B>>,
    pub decoder: Vec<RecurrentLayer<B>>,
    pub attn: Option<Attention<B>>,
    /// `[tgt_vocab, H]` (PyTorch `Linear` layout); None when tied to `tgt_embed`.
    pub out_weight: Option<Param<Tensor<B, 2>>>,
    pub out_bias: Param<Tensor<B, 1>>,
    #[module(skip)]
    config: NmtConfig,
}

/// Converts token ids to an engine int tensor of shape `[rows, cols]`.
pub fn ids_tensor<B: Backend>(
    ids: &[u32],
    rows: usize,
    cols: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let v: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    Tensor::from_data(TensorData::new(v, [rows, cols]), device)
}

/// `[rows, cols]` float mask: 1.0 where `ids` is not `pad`.
pub fn pad_mask<B: Backend>(
    ids: &[u32],
    rows: usize,
    cols: usize,
    pad: u32,
    device: &B::Device,
) -> Tensor<B, 2> {
    let v: Vec<f32> = ids
        .iter()
        .map(|&x| if x == pad { 0.0 } else { 1.0 })
        .collect();
    Tensor::from_data(TensorData::new(v, [rows, cols]), device)
}

impl<B: FusedRnnBackend> Seq2Seq<B> {
    pub fn config(&self) -> &NmtConfig {
        &self.config
    }

    fn embed(table: &Param<Tensor<B, 2>>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        burn::tensor::module::embedding(table.val(), ids)
    }

    /// Encodes a padded source batch. `src`: `[B, S]` ids; `mask`: `[B, S]`.
    pub fn encode(
        &self,
        src: Tensor<B, 2, Int>,
        mask: Tensor<B, 2>,
        rng: &mut Option<DropoutRng>,
    ) -> Encoded<B> {
        let [b, s] = src.dims();
        let device = src.device();
        let mut x = dropout(Self::embed(&self.src_embed, src), rng);
        let mut states = Vec::with_capacity(self.encoder.len());
        let n = self.encoder.len();
        for (l, layer) in self.encoder.iter().enumerate() {
            let (out, st) = layer.forward(x, Some(&mask), layer.zero_state(b, &device));
            states.push(st);
            x = if l + 1 < n { dropout(out, rng) } else { out };
        }
        let keys = match (&self.attn, self.config.attention) {
            (Some(a), AttentionKind::Bahdanau) => {
                let h = self.config.hidden;
                Some(
                    x.clone()
                        .reshape([b * s, h])
                        .matmul(a.w_score.val().transpose())
                        .reshape([b, s, h]),
                )
            }
            _ => None,
        };
        Encoded {
            outputs: x,
            states,
            mask,
            keys,
        }
    }

    /// Additive-mask softmax over source positions. `scores`: `[B, Q, S]`.
    fn attend(scores: Tensor<B, 3>, enc: &Encoded<B>) -> Tensor<B, 3> {
        let neg = (enc.mask.clone() - 1.0) * 1e9; // 0 where real, -1e9 where padding
        let scores = scores + neg.unsqueeze_dim(1);
        softmax(scores, 2).matmul(enc.outputs.clone())
    }

    /// `tanh(W_c [ctx; h] + b_c)`. Both `[N, H]` -> `[N, H]`.
    fn combine(a: &Attention<B>, ctx: Tensor<B, 2>, h: Tensor<B, 2>) -> Tensor<B, 2> {
        let cat = Tensor::cat(vec![ctx, h], 1);
        tanh(cat.matmul(a.w_combine.val().transpose()) + a.b_combine.val().unsqueeze_dim(0))
    }

    /// Bahdanau context from the previous top decoder state `h` (`[B, H]`) -> `[B, H]`.
    fn bahdanau_context(
        &self,
        a: &Attention<B>,
        h: Tensor<B, 2>,
        enc: &Encoded<B>,
    ) -> Tensor<B, 2> {
        let [b, hs] = h.dims();
        let (Some(wq), Some(v), Some(keys)) = (&a.w_query, &a.v, &enc.keys) else {
            unreachable!("Bahdanau parameters are created with the model")
        };
        let q = h.matmul(wq.val().transpose()).unsqueeze_dim::<3>(1); // [B,1,H]
        let e = tanh(keys.clone() + q); // [B,S,H]
        let [_, s, _] = e.dims();
        let scores = e
            .reshape([b * s, hs])
            .matmul(v.val().unsqueeze_dim(1))
            .reshape([b, 1, s]);
        Self::attend(scores, enc).reshape([b, hs])
    }

    /// Output projection: `[N, H]` -> logits `[N, V]`.
    /// The output layer's matrix `[tgt_vocab, H]`: its own, or the target embedding's.
    fn output_matrix(&self) -> Tensor<B, 2> {
        match &self.out_weight {
            Some(w) => w.val(),
            None => self.tgt_embed.val(),
        }
    }

    fn project(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        x.matmul(self.output_matrix().transpose()) + self.out_bias.val().unsqueeze_dim(0)
    }

    /// Teacher-forced decoder: `tgt_in` `[B, T]` -> logits `[B*T, V]`.
    pub fn decode_train(
        &self,
        enc: &Encoded<B>,
        tgt_in: Tensor<B, 2, Int>,
        rng: &mut Option<DropoutRng>,
    ) -> Tensor<B, 2> {
        let top = self.decode_train_hidden(enc, tgt_in, rng);
        self.project(top)
    }

    /// Teacher-forced decoder up to the output projection: `tgt_in` `[B, T]` -> the
    /// vectors fed to the projection, `[B*T, H]` (dropout applied).
    pub fn decode_train_hidden(
        &self,
        enc: &Encoded<B>,
        tgt_in: Tensor<B, 2, Int>,
        rng: &mut Option<DropoutRng>,
    ) -> Tensor<B, 2> {
        let [b, t] = tgt_in.dims();
        let h = self.config.hidden;
        let emb = dropout(Self::embed(&self.tgt_embed, tgt_in), rng);
        let n = self.decoder.len();
        if self.config.attention == AttentionKind::Bahdanau {
            let a = self.attn.as_ref().expect("attention parameters exist");
            let mut states = enc.states.clone();
            let mut outs = Vec::with_capacity(t);
            for step in 0..t {
                let e = emb
                    .clone()
                    .narrow(1, step, 1)
                    .reshape([b, self.config.embed]);
                let ctx = self.bahdanau_context(a, states[n - 1].h.clone(), enc);
                let mut x = Tensor::cat(vec![e, ctx.clone()], 1);
                for (l, layer) in self.decoder.iter().enumerate() {
                    states[l] = layer.step(x, &states[l]);
                    x = if l + 1 < n {
                        dropout(states[l].h.clone(), rng)
                    } else {
                        states[l].h.clone()
                    };
                }
                outs.push(Self::combine(a, ctx, x));
            }
            let comb = Tensor::stack::<3>(outs, 1).reshape([b * t, h]);
            return dropout(comb, rng);
        }
        let mut x = emb;
        for (l, layer) in self.decoder.iter().enumerate() {
            let (out, _) = layer.forward(x, None, enc.states[l].clone());
            x = if l + 1 < n { dropout(out, rng) } else { out };
        }
        let top = match &self.attn {
            Some(a) => {
                let keys = x
                    .clone()
                    .reshape([b * t, h])
                    .matmul(a.w_score.val())
                    .reshape([b, t, h]);
                let scores = keys.matmul(enc.outputs.clone().swap_dims(1, 2)); // [B,T,S]
                let ctx = Self::attend(scores, enc).reshape([b * t, h]);
                Self::combine(a, ctx, x.reshape([b * t, h]))
            }
            None => x.reshape([b * t, h]),
        };
        dropout(top, rng)
    }

    /// Mean cross-entropy over non-padding target tokens. `logits` `[N, V]`,
    /// `targets` `[N]` ids, `weights` `[N]` (1.0 real, 0.0 padding).
    pub fn masked_nll(
        logits: Tensor<B, 2>,
        targets: Tensor<B, 1, Int>,
        weights: Tensor<B, 1>,
        smoothing: f32,
    ) -> Tensor<B, 1> {
        let [n, _] = logits.dims();
        let lsm = log_softmax(logits, 1);
        let lp = lsm.clone().gather(1, targets.reshape([n, 1])).reshape([n]);
        // With label smoothing e the target is (1 - e) onehot + e / V.
        let lp = if smoothing > 0.0 {
            lp * (1.0 - smoothing) + lsm.mean_dim(1).reshape([n]) * smoothing
        } else {
            lp
        };
        let count = weights.clone().sum().clamp_min(1.0);
        -(lp * weights).sum() / count
    }

    /// The training loss of one padded batch (ids row-major, `pad` = padding id), with
    /// label smoothing `smoothing` (0: none). Returns the mean per-token negative
    /// log-likelihood (of the smoothed targets) as a 1-element tensor.
    #[allow(clippy::too_many_arguments)]
    pub fn loss(
        &self,
        src: &[u32],
        tgt_in: &[u32],
        tgt_out: &[u32],
        batch: usize,
        src_len: usize,
        tgt_len: usize,
        pad: u32,
        smoothing: f32,
        rng: &mut Option<DropoutRng>,
        device: &B::Device,
    ) -> Tensor<B, 1> {
        let src_t = ids_tensor::<B>(src, batch, src_len, device);
        let mask = pad_mask::<B>(src, batch, src_len, pad, device);
        let enc = self.encode(src_t, mask, rng);
        let tgt = ids_tensor(tgt_in, batch, tgt_len, device);
        let n = batch * tgt_len;
        // A backend without fused kernels computes the loss step by step.
        if self.config.fused && B::FUSED {
            let top = self.decode_train_hidden(&enc, tgt, rng);
            let targets: Arc<[u32]> = Arc::from(tgt_out);
            let weights: Arc<[f32]> = tgt_out
                .iter()
                .map(|&t| if t == pad { 0.0 } else { 1.0 })
                .collect();
            return linear_cross_entropy(
                top,
                self.output_matrix(),
                self.out_bias.val(),
                targets,
                weights,
                smoothing,
            );
        }
        let logits = self.decode_train(&enc, tgt, rng);
        let targets = ids_tensor::<B>(tgt_out, 1, n, device).reshape([n]);
        let weights = pad_mask::<B>(tgt_out, 1, n, pad, device).reshape([n]);
        Self::masked_nll(logits, targets, weights, smoothing)
    }

    /// The decoder state right after encoding.
    pub fn start_state(&self, enc: &Encoded<B>) -> DecoderState<B> {
        DecoderState {
            layers: enc.states.clone(),
        }
    }

    /// One decoding step (inference): previous tokens `[N]` -> log-probabilities
    /// `[N, V]` and the new state.
    pub fn decode_step(
        &self,
        enc: &Encoded<B>,
        prev: Tensor<B, 1, Int>,
        state: &DecoderState<B>,
    ) -> (Tensor<B, 2>, DecoderState<B>) {
        let (logits, st) = self.decode_step_logits(enc, prev, state);
        (log_softmax(logits, 1), st)
    }

    /// [`Seq2Seq::decode_step`] before the log-softmax: the output layer's logits
    /// `[N, V]` (what greedy decoding and beam search need; they normalise only the
    /// rows and tokens they keep).
    pub fn decode_step_logits(
        &self,
        enc: &Encoded<B>,
        prev: Tensor<B, 1, Int>,
        state: &DecoderState<B>,
    ) -> (Tensor<B, 2>, DecoderState<B>) {
        let [n] = prev.dims();
        let h = self.config.hidden;
        let e = Self::embed(&self.tgt_embed, prev.reshape([n, 1])).reshape([n, self.config.embed]);
        let mut layers = Vec::with_capacity(self.decoder.len());
        let last = self.decoder.len() - 1;
        let ctx_b = match (&self.attn, self.config.attention) {
            (Some(a), AttentionKind::Bahdanau) => {
                Some(self.bahdanau_context(a, state.layers[last].h.clone(), enc))
            }
            _ => None,
        };
        let mut x = match &ctx_b {
            Some(c) => Tensor::cat(vec![e, c.clone()], 1),
            None => e,
        };
        for (l, layer) in self.decoder.iter().enumerate() {
            // A sequence of one step: the fused recurrence where the layer has it (one
            // operation with the host kernels' vectorised gates), else the engine's cell.
            let [_, d] = x.dims();
            let (_, st) = layer.forward(x.reshape([n, 1, d]), None, state.layers[l].clone());
            x = st.h.clone();
            layers.push(st);
        }
        let top = match (&self.attn, ctx_b) {
            (Some(a), Some(ctx)) => Self::combine(a, ctx, x),
            (Some(a), None) => {
                let q = x.clone().matmul(a.w_score.val()).reshape([n, 1, h]);
                let scores = q.matmul(enc.outputs.clone().swap_dims(1, 2));
                let ctx = Self::attend(scores, enc).reshape([n, h]);
                Self::combine(a, ctx, x)
            }
            (None, _) => x,
        };
        (self.project(top), DecoderState { layers })
    }
}

#[cfg(test)]
mod tests {
    use super::DropoutRng;

    /// The first `n` draws of update `step`'s stream as keep (true) / drop bits.
    fn bits(seed: u64, step: u64, n: usize) -> Vec<bool> {
        let mut r = DropoutRng::new(seed, step, 0.5);
        (0..n).map(|_| r.next() < u64::MAX / 2).collect()
    }

    /// Masks of different updates (and of different workers' seeds) are independent: no
    /// update's mask is another's shifted by a few positions. The first version seeded
    /// update `s` with `seed ^ s * increment`, so every other update repeated the one
    /// before it two positions on (agreement 1.0 at shift 2).
    #[test]
    fn dropout_masks_of_different_updates_are_not_shifted_copies() {
        let n = 4096;
        for seed in [0u64, 1, 2, 1 ^ 0x9E37_79B9_7F4A_7C15] {
            for step in 0..6u64 {
                let a = bits(seed, step, n + 16);
                for other in [step + 1, step + 2, step + 3] {
                    let b = bits(seed, other, n + 16);
                    for shift in 0..16 {
                        let same = (0..n).filter(|&i| a[i + shift] == b[i]).count();
                        let frac = same as f64 / n as f64;
                        // Independent fair bits agree half the time; 4096 draws put 6
                        // standard deviations at +-0.047.
                        assert!(
                            (frac - 0.5).abs() < 0.05,
                            "seed {seed}: update {other} repeats update {step} shifted by \
                             {shift} ({frac:.3} of the bits agree)"
                        );
                    }
                }
            }
        }
    }
}
