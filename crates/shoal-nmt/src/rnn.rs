//! Recurrent layers (GRU and LSTM, optional per-gate Layer Normalization) built from
//! engine operations: the input projections of all time steps are one large matrix
//! product, and each step does one recurrent product plus the gate arithmetic.
//!
//! Parameter names and layouts follow PyTorch's `nn.GRU`/`nn.LSTM` (`weight_ih`
//! `[G*H, in]`, `weight_hh` `[G*H, H]`, `bias_ih`, `bias_hh`, gate order r,z,n for GRU
//! and i,f,g,o for LSTM), so weights can be compared with or loaded from PyTorch.

use crate::fused::{gru_sequence, lstm_sequence, FusedRnnBackend};
use burn::module::{Module, Param};
use burn::tensor::activation::{sigmoid, tanh};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Which recurrent cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum CellKind {
    #[default]
    Gru,
    Lstm,
}

impl CellKind {
    /// Number of gates (G): 3 for GRU, 4 for LSTM.
    pub fn gates(self) -> usize {
        match self {
            CellKind::Gru => 3,
            CellKind::Lstm => 4,
        }
    }
}

/// Per-gate Layer Normalization of a `[.., G*H]` pre-activation: each gate's H values
/// are normalized separately, then scaled and shifted by `gamma`/`beta` (`[G*H]`).
#[derive(Module, Debug)]
pub struct GateNorm<B: Backend> {
    pub gamma: Param<Tensor<B, 1>>,
    pub beta: Param<Tensor<B, 1>>,
    gates: usize,
    hidden: usize,
}

impl<B: Backend> GateNorm<B> {
    fn new(gates: usize, hidden: usize, device: &B::Device) -> Self {
        Self {
            gamma: Param::from_tensor(Tensor::ones([gates * hidden], device)),
            beta: Param::from_tensor(Tensor::zeros([gates * hidden], device)),
            gates,
            hidden,
        }
    }

    /// `x`: `[N, G*H]` -> `[N, G*H]`.
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [n, _] = x.dims();
        let x = x.reshape([n, self.gates, self.hidden]);
        let mean = x.clone().mean_dim(2);
        let centered = x - mean;
        let var = centered.clone().square().mean_dim(2);
        let normed = centered / (var + 1e-5).sqrt();
        let normed = normed.reshape([n, self.gates * self.hidden]);
        normed * self.gamma.val().unsqueeze_dim(0) + self.beta.val().unsqueeze_dim(0)
    }
}

/// The recurrent state of one layer: `h` (and `c` for LSTM), each `[B, H]`.
#[derive(Debug, Clone)]
pub struct RnnState<B: Backend> {
    pub h: Tensor<B, 2>,
    pub c: Option<Tensor<B, 2>>,
}

impl<B: Backend> RnnState<B> {
    /// Picks rows `idx` of every state tensor (beam search reordering).
    pub fn select(&self, idx: Tensor<B, 1, burn::tensor::Int>) -> Self {
        Self {
            h: self.h.clone().select(0, idx.clone()),
            c: self.c.as_ref().map(|c| c.clone().select(0, idx)),
        }
    }
}

/// One recurrent layer.
#[derive(Module, Debug)]
pub struct RecurrentLayer<B: Backend> {
    pub weight_ih: Param<Tensor<B, 2>>,
    pub weight_hh: Param<Tensor<B, 2>>,
    pub bias_ih: Param<Tensor<B, 1>>,
    pub bias_hh: Param<Tensor<B, 1>>,
    pub norm_ih: Option<GateNorm<B>>,
    pub norm_hh: Option<GateNorm<B>>,
    #[module(skip)]
    kind: CellKind,
    input: usize,
    hidden: usize,
    /// Run the whole-sequence recurrence as one fused operation where supported
    /// (see [`RecurrentLayer::is_fused`]); otherwise step by step.
    fused: bool,
}

impl<B: Backend> RecurrentLayer<B> {
    /// A layer initialised as PyTorch does: every weight and bias uniform in
    /// `[-1/sqrt(H), 1/sqrt(H)]`.
    pub fn new(
        kind: CellKind,
        input: usize,
        hidden: usize,
        layer_norm: bool,
        device: &B::Device,
    ) -> Self {
        let g = kind.gates();
        let k = 1.0 / (hidden as f64).sqrt();
        let u = Distribution::Uniform(-k, k);
        let norm = || layer_norm.then(|| GateNorm::new(g, hidden, device));
        Self {
            weight_ih: Param::from_tensor(Tensor::random([g * hidden, input], u, device)),
            weight_hh: Param::from_tensor(Tensor::random([g * hidden, hidden], u, device)),
            bias_ih: Param::from_tensor(Tensor::random([g * hidden], u, device)),
            bias_hh: Param::from_tensor(Tensor::random([g * hidden], u, device)),
            norm_ih: norm(),
            norm_hh: norm(),
            kind,
            input,
            hidden,
            fused: false,
        }
    }

    /// Chooses the fused whole-sequence operation (where supported) or the step-by-step
    /// reference path for [`RecurrentLayer::forward`].
    pub fn with_fused(mut self, fused: bool) -> Self {
        self.fused = fused;
        self
    }

    /// Whether [`RecurrentLayer::forward`] runs the fused operation (GRU with or
    /// without LayerNorm; LSTM without).
    pub fn is_fused(&self) -> bool {
        self.fused && (self.kind == CellKind::Gru || self.norm_hh.is_none())
    }

    pub fn kind(&self) -> CellKind {
        self.kind
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    pub fn input_size(&self) -> usize {
        self.input
    }

    /// A zero state for `batch` sequences.
    pub fn zero_state(&self, batch: usize, device: &B::Device) -> RnnState<B> {
        let z = Tensor::zeros([batch, self.hidden], device);
        RnnState {
            h: z.clone(),
            c: (self.kind == CellKind::Lstm).then_some(z),
        }
    }

    /// Input projection `x W_ih^T + b_ih` (normalized if layer-norm is on).
    /// `x`: `[N, in]` -> `[N, G*H]`.
    fn project_input(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let p = x.matmul(self.weight_ih.val().transpose());
        let p = match &self.norm_ih {
            Some(n) => n.forward(p),
            None => p,
        };
        p + self.bias_ih.val().unsqueeze_dim(0)
    }

    /// One cell update from a precomputed input projection `gi` (`[B, G*H]`).
    fn cell(&self, gi: Tensor<B, 2>, state: &RnnState<B>) -> RnnState<B> {
        let h = state.h.clone();
        let gh = h.clone().matmul(self.weight_hh.val().transpose());
        let gh = match &self.norm_hh {
            Some(n) => n.forward(gh),
            None => gh,
        };
        let gh = gh + self.bias_hh.val().unsqueeze_dim(0);
        let hs = self.hidden;
        let chunk = |t: &Tensor<B, 2>, i: usize| t.clone().narrow(1, i * hs, hs);
        match self.kind {
            CellKind::Gru => {
                let r = sigmoid(chunk(&gi, 0) + chunk(&gh, 0));
                let z = sigmoid(chunk(&gi, 1) + chunk(&gh, 1));
                let n = tanh(chunk(&gi, 2) + r * chunk(&gh, 2));
                // h' = (1 - z) * n + z * h = n + z * (h - n)
                let h_new = n.clone() + z * (h - n);
                RnnState { h: h_new, c: None }
            }
            CellKind::Lstm => {
                let g = gi + gh;
                let i = sigmoid(chunk(&g, 0));
                let f = sigmoid(chunk(&g, 1));
                let gg = tanh(chunk(&g, 2));
                let o = sigmoid(chunk(&g, 3));
                let c_prev = state
                    .c
                    .clone()
                    .unwrap_or_else(|| Tensor::zeros(h.dims(), &h.device()));
                let c = f * c_prev + i * gg;
                let h_new = o * tanh(c.clone());
                RnnState {
                    h: h_new,
                    c: Some(c),
                }
            }
        }
    }

    /// One time step. `x`: `[B, in]`.
    pub fn step(&self, x: Tensor<B, 2>, state: &RnnState<B>) -> RnnState<B> {
        self.cell(self.project_input(x), state)
    }

    /// The whole sequence, step by step with engine operations (the reference path).
    /// Same contract as [`RecurrentLayer::forward`].
    pub fn forward_unfused(
        &self,
        x: Tensor<B, 3>,
        mask: Option<&Tensor<B, 2>>,
        init: RnnState<B>,
    ) -> (Tensor<B, 3>, RnnState<B>) {
        let [b, t, d] = x.dims();
        let g = self.kind.gates() * self.hidden;
        let gi_all = self.project_input(x.reshape([b * t, d])).reshape([b, t, g]);
        let mut state = init;
        let mut outputs = Vec::with_capacity(t);
        for step in 0..t {
            let gi = gi_all.clone().narrow(1, step, 1).reshape([b, g]);
            let new = self.cell(gi, &state);
            state = match mask {
                Some(m) => {
                    let m = m.clone().narrow(1, step, 1); // [B, 1]
                    let keep = |new: Tensor<B, 2>, old: Tensor<B, 2>| {
                        old.clone() + m.clone() * (new - old)
                    };
                    RnnState {
                        h: keep(new.h, state.h),
                        c: match (new.c, state.c) {
                            (Some(n), Some(o)) => Some(keep(n, o)),
                            (n, _) => n,
                        },
                    }
                }
                None => new,
            };
            outputs.push(state.h.clone());
        }
        (Tensor::stack(outputs, 1), state)
    }
}

impl<B: FusedRnnBackend> RecurrentLayer<B> {
    /// The whole sequence. `x`: `[B, T, in]`; `mask`: optional `[B, T]` of 1.0 (real
    /// token) / 0.0 (padding): where it is 0 the state is carried over unchanged, so the
    /// final state is the state after each sequence's last real token.
    /// Returns the outputs `[B, T, H]` and the final state.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: Option<&Tensor<B, 2>>,
        init: RnnState<B>,
    ) -> (Tensor<B, 3>, RnnState<B>) {
        // A backend without fused kernels runs the step-by-step path.
        if !(self.is_fused() && B::FUSED) {
            return self.forward_unfused(x, mask, init);
        }
        let [b, t, d] = x.dims();
        let hs = self.hidden;
        let g = self.kind.gates() * hs;
        let xp = self.project_input(x.reshape([b * t, d])).reshape([b, t, g]);
        let host_mask: Option<Arc<[f32]>> = mask.map(|m| {
            let v: Vec<f32> = m
                .clone()
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .unwrap_or_else(|_| vec![1.0; b * t]);
            Arc::from(v)
        });
        match self.kind {
            CellKind::Gru => {
                let norm = self.norm_hh.as_ref().map(|n| (n.gamma.val(), n.beta.val()));
                let out = gru_sequence(
                    xp,
                    init.h,
                    self.weight_hh.val(),
                    self.bias_hh.val(),
                    norm,
                    host_mask,
                );
                let last = out.clone().narrow(1, t - 1, 1).reshape([b, hs]);
                (out, RnnState { h: last, c: None })
            }
            CellKind::Lstm => {
                let c0 = init
                    .c
                    .unwrap_or_else(|| Tensor::zeros([b, hs], &init.h.device()));
                let both = lstm_sequence(
                    xp,
                    init.h,
                    c0,
                    self.weight_hh.val(),
                    self.bias_hh.val(),
                    host_mask,
                );
                let out = both.clone().narrow(2, 0, hs);
                let last = both.narrow(1, t - 1, 1);
                let h = last.clone().narrow(2, 0, hs).reshape([b, hs]);
                let c = last.narrow(2, hs, hs).reshape([b, hs]);
                (out, RnnState { h, c: Some(c) })
            }
        }
    }
}
