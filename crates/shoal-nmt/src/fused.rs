//! Fused operations registered with the engine: the GRU recurrence over a whole
//! sequence and the softmax cross-entropy over the vocabulary are each one operation
//! with its own backward pass and a single autodiff graph node, instead of many small
//! operations (about fifteen per time step for the GRU; several vocabulary-sized
//! intermediates for the loss).
//!
//! As in burn's custom-kernel pattern, the operations are a backend extension
//! ([`FusedRnnBackend`]) implemented by a backend with kernels of its own, and the
//! autodiff implementation is bound on its inner backend having them ([`HostKernels`]:
//! backends whose tensors are in host memory, where `shoal_kernels::host` runs them;
//! the `flex` CPU backend). A backend without fused kernels says so
//! ([`FusedRnnBackend::FUSED`] is false) and the model runs the engine's step-by-step
//! path on it: a tensor is never copied to the host behind the caller's back.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use shoal_kernels::host::gru::{self, GruDims, GruSaved};
use shoal_kernels::host::lstm::{self, LstmSaved};
use shoal_kernels::host::xent;
use std::sync::Arc;

/// Registers the gradient of each input that is tracked, in parent order, building
/// each value only for a tracked parent (values past the last parent are never built).
/// Expects the backend type parameter to be called `B`.
macro_rules! register_grads {
    ($grads:expr, $parents:expr, [$($value:expr),* $(,)?]) => {{
        let mut parents = $parents.into_iter();
        $(
            if let Some(p) = parents.next().flatten() {
                $grads.register::<B>(p.id, $value);
            }
        )*
    }};
}

/// Backends whose tensors live in host memory, so the host kernels read and write them
/// without a device transfer. The fused operations of such a backend, and of autodiff
/// over it, run on `shoal_kernels::host`.
pub trait HostKernels: Backend {}

impl HostKernels for burn::backend::Flex {}

/// Backends that run the fused recurrent operations (the model asks [`Self::FUSED`]
/// before it calls them).
pub trait FusedRnnBackend: Backend {
    /// Whether this backend has the fused kernels; when false the model runs the
    /// engine's step-by-step path and the operations below are never called.
    const FUSED: bool = true;

    /// The GRU recurrence. `xp`: `[B, T, 3H]` input projections (with `b_ih`); `h0`:
    /// `[B, H]`; `w_hh`: `[3H, H]`; `b_hh`: `[3H]`; `norm`: optional per-gate LayerNorm
    /// `(gamma, beta)` (`[3H]` each) of the recurrent product; `mask`: optional `[B*T]`
    /// of 1/0. Returns every step's state, `[B, T, H]`.
    fn gru_sequence(
        xp: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        w_hh: FloatTensor<Self>,
        b_hh: FloatTensor<Self>,
        norm: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        mask: Option<Arc<[f32]>>,
    ) -> FloatTensor<Self>;

    /// The LSTM recurrence. `xp`: `[B, T, 4H]`; `h0`, `c0`: `[B, H]`; `w_hh`:
    /// `[4H, H]`; `b_hh`: `[4H]`. Returns every step's `h` and `c`, `[B, T, 2H]`.
    fn lstm_sequence(
        xp: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        w_hh: FloatTensor<Self>,
        b_hh: FloatTensor<Self>,
        mask: Option<Arc<[f32]>>,
    ) -> FloatTensor<Self>;

    /// The output projection fused with the mean negative log-likelihood of `targets`
    /// over the rows whose weight is 1: `x`: `[N, H]`; `w`: `[V, H]`; `b`: `[V]`;
    /// `targets`, `weights`: `[N]`; `smoothing`: label smoothing (0: none). Returns `[1]`.
    fn linear_cross_entropy(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
        targets: Arc<[u32]>,
        weights: Arc<[f32]>,
        smoothing: f32,
    ) -> FloatTensor<Self>;
}

/// Threads for a recurrence's per-step products (`[B, H] x [H, G*H]`): the seed's
/// `[32, 128] x [128, 384]` is too small to split (splitting costs more than it saves);
/// from about 4M multiply-adds per step the products use the engine's thread pool.
fn threads(d: GruDims, gates: usize) -> usize {
    if d.batch * d.hidden * gates * d.hidden >= 1 << 22 {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// Threads for the large products (the output projection: `[N, H] x [H, V]`).
fn big_threads() -> usize {
    rayon::current_num_threads()
}

/// A host-memory backend's tensor as a flat vector (a copy in host memory, no transfer).
fn host<B: HostKernels, const D: usize>(t: FloatTensor<B>) -> (Vec<f32>, [usize; D]) {
    let t = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(t));
    let dims = t.dims();
    let v = t
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data converts to f32");
    (v, dims)
}

fn device_tensor<B: HostKernels, const D: usize>(
    v: Vec<f32>,
    dims: [usize; D],
    device: &B::Device,
) -> FloatTensor<B> {
    Tensor::<B, D>::from_data(TensorData::new(v, dims), device)
        .into_primitive()
        .tensor()
}

/// Host copies of a GRU call's weights, kept for its backward pass.
#[derive(Debug)]
struct GruWeights {
    w_hh: Vec<f32>,
    /// LayerNorm `(gamma, beta)`.
    norm: Option<(Vec<f32>, Vec<f32>)>,
}

/// Runs the forward kernel on host copies of the inputs.
fn gru_host<B: HostKernels>(
    xp: FloatTensor<B>,
    h0: FloatTensor<B>,
    w_hh: FloatTensor<B>,
    b_hh: FloatTensor<B>,
    norm: Option<(FloatTensor<B>, FloatTensor<B>)>,
    mask: Option<&[f32]>,
    saved: Option<&mut GruSaved>,
) -> (FloatTensor<B>, GruDims, GruWeights) {
    let device = B::float_device(&xp);
    let (xp, [bs, t, g]) = host::<B, 3>(xp);
    let (h0, _) = host::<B, 2>(h0);
    let (w, _) = host::<B, 2>(w_hh);
    let (b, _) = host::<B, 1>(b_hh);
    let norm = norm.map(|(gm, bt)| (host::<B, 1>(gm).0, host::<B, 1>(bt).0));
    let d = GruDims {
        batch: bs,
        steps: t,
        hidden: g / 3,
    };
    let mut out = vec![0.0f32; bs * t * d.hidden];
    let mut scratch = GruSaved::default();
    let saved = saved.unwrap_or(&mut scratch);
    let ln = norm
        .as_ref()
        .map(|(gamma, beta)| gru::GateNorm { gamma, beta });
    gru::forward(
        d,
        &xp,
        &h0,
        &w,
        &b,
        mask,
        ln,
        &mut out,
        saved,
        threads(d, 3),
    );
    let weights = GruWeights { w_hh: w, norm };
    (
        device_tensor::<B, 3>(out, [bs, t, d.hidden], &device),
        d,
        weights,
    )
}

/// Runs the LSTM forward kernel on host copies of the inputs.
fn lstm_host<B: HostKernels>(
    xp: FloatTensor<B>,
    h0: FloatTensor<B>,
    c0: FloatTensor<B>,
    w_hh: FloatTensor<B>,
    b_hh: FloatTensor<B>,
    mask: Option<&[f32]>,
    saved: Option<&mut LstmSaved>,
) -> (FloatTensor<B>, GruDims, Vec<f32>) {
    let device = B::float_device(&xp);
    let (xp, [bs, t, g]) = host::<B, 3>(xp);
    let (h0, _) = host::<B, 2>(h0);
    let (c0, _) = host::<B, 2>(c0);
    let (w, _) = host::<B, 2>(w_hh);
    let (b, _) = host::<B, 1>(b_hh);
    let d = GruDims {
        batch: bs,
        steps: t,
        hidden: g / 4,
    };
    let mut out = vec![0.0f32; bs * t * 2 * d.hidden];
    let mut scratch = LstmSaved::default();
    let saved = saved.unwrap_or(&mut scratch);
    lstm::forward(
        d,
        &xp,
        &h0,
        &c0,
        &w,
        &b,
        mask,
        &mut out,
        saved,
        threads(d, 4),
    );
    (
        device_tensor::<B, 3>(out, [bs, t, 2 * d.hidden], &device),
        d,
        w,
    )
}

impl FusedRnnBackend for burn::backend::Flex {
    const FUSED: bool = true;

    fn lstm_sequence(
        xp: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        w_hh: FloatTensor<Self>,
        b_hh: FloatTensor<Self>,
        mask: Option<Arc<[f32]>>,
    ) -> FloatTensor<Self> {
        lstm_host::<Self>(xp, h0, c0, w_hh, b_hh, mask.as_deref(), None).0
    }

    fn gru_sequence(
        xp: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        w_hh: FloatTensor<Self>,
        b_hh: FloatTensor<Self>,
        norm: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        mask: Option<Arc<[f32]>>,
    ) -> FloatTensor<Self> {
        gru_host::<Self>(xp, h0, w_hh, b_hh, norm, mask.as_deref(), None).0
    }

    fn linear_cross_entropy(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
        targets: Arc<[u32]>,
        weights: Arc<[f32]>,
        smoothing: f32,
    ) -> FloatTensor<Self> {
        let device = Self::float_device(&x);
        let (x, [_, h]) = host::<Self, 2>(x);
        let (w, _) = host::<Self, 2>(w);
        let (b, _) = host::<Self, 1>(b);
        let mut logits = Vec::new();
        let (loss, _) = xent::linear_forward(
            &x,
            &w,
            &b,
            h,
            &targets,
            &weights,
            smoothing,
            &mut logits,
            big_threads(),
        );
        device_tensor::<Self, 1>(vec![loss], [1], &device)
    }
}

/// What the GRU node keeps for its backward pass.
#[derive(Debug, Clone)]
struct GruState<D> {
    dims: GruDims,
    weights: Arc<GruWeights>,
    mask: Option<Arc<[f32]>>,
    saved: Arc<GruSaved>,
    device: D,
}

impl<D> GruState<D> {
    /// Runs the backward kernel on the gradient of the outputs.
    fn kernel<B: HostKernels<Device = D>>(&self, dout: FloatTensor<B>) -> gru::GruGrads {
        let (dout, _) = host::<B, 3>(dout);
        let ln = self
            .weights
            .norm
            .as_ref()
            .map(|(gamma, beta)| gru::GateNorm { gamma, beta });
        let d = self.dims;
        gru::backward(
            d,
            &self.weights.w_hh,
            self.mask.as_deref(),
            ln,
            &self.saved,
            &dout,
            threads(d, 3),
        )
    }
}

/// The GRU node without LayerNorm (4 parents: xp, h0, w_hh, b_hh) and with it (6:
/// also gamma, beta); both register the same gradients in that order.
#[derive(Debug)]
struct GruBackward;

#[derive(Debug)]
struct GruLnBackward;

macro_rules! gru_backward {
    ($ops:expr, $grads:expr) => {{
        let ops = $ops;
        let s = ops.state;
        let gr = s.kernel::<B>($grads.consume::<B>(&ops.node));
        let (d, dev) = (s.dims, &s.device);
        let g = 3 * d.hidden;
        register_grads!(
            $grads,
            ops.parents,
            [
                device_tensor::<B, 3>(gr.dxp, [d.batch, d.steps, g], dev),
                device_tensor::<B, 2>(gr.dh0, [d.batch, d.hidden], dev),
                device_tensor::<B, 2>(gr.dw_hh, [g, d.hidden], dev),
                device_tensor::<B, 1>(gr.db_hh, [g], dev),
                device_tensor::<B, 1>(gr.dgamma, [g], dev),
                device_tensor::<B, 1>(gr.dbeta, [g], dev),
            ]
        );
    }};
}

impl<B: HostKernels> Backward<B, 4> for GruBackward {
    type State = GruState<B::Device>;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _c: &mut Checkpointer) {
        gru_backward!(ops, grads);
    }
}

impl<B: HostKernels> Backward<B, 6> for GruLnBackward {
    type State = GruState<B::Device>;

    fn backward(self, ops: Ops<Self::State, 6>, grads: &mut Gradients, _c: &mut Checkpointer) {
        gru_backward!(ops, grads);
    }
}

/// What the LSTM node keeps for its backward pass.
#[derive(Debug, Clone)]
struct LstmState<D> {
    dims: GruDims,
    w_hh: Arc<Vec<f32>>,
    mask: Option<Arc<[f32]>>,
    saved: Arc<LstmSaved>,
    device: D,
}

#[derive(Debug)]
struct LstmBackward;

impl<B: HostKernels> Backward<B, 5> for LstmBackward {
    type State = LstmState<B::Device>;

    fn backward(
        self,
        ops: Ops<Self::State, 5>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let s = ops.state;
        let d = s.dims;
        let (dout, _) = host::<B, 3>(grads.consume::<B>(&ops.node));
        let gr = lstm::backward(
            d,
            &s.w_hh,
            s.mask.as_deref(),
            &s.saved,
            &dout,
            threads(d, 4),
        );
        let g = 4 * d.hidden;
        let dev = &s.device;
        register_grads!(
            grads,
            ops.parents,
            [
                device_tensor::<B, 3>(gr.dxp, [d.batch, d.steps, g], dev),
                device_tensor::<B, 2>(gr.dh0, [d.batch, d.hidden], dev),
                device_tensor::<B, 2>(gr.dc0, [d.batch, d.hidden], dev),
                device_tensor::<B, 2>(gr.dw_hh, [g, d.hidden], dev),
                device_tensor::<B, 1>(gr.db_hh, [g], dev),
            ]
        );
    }
}

/// What the projection + cross-entropy node keeps: the gradient of the logits and the
/// bias (computed with the loss), and host copies of `x` and `W`.
#[derive(Debug, Clone)]
struct XentState<D> {
    grad: Arc<xent::XentGrad>,
    x: Arc<Vec<f32>>,
    w: Arc<Vec<f32>>,
    hidden: usize,
    vocab: usize,
    device: D,
}

#[derive(Debug)]
struct XentBackward;

impl<B: HostKernels> Backward<B, 3> for XentBackward {
    type State = XentState<B::Device>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let s = ops.state;
        let (g, _) = host::<B, 1>(grads.consume::<B>(&ops.node));
        let n = s.grad.dlogits.len() / s.vocab.max(1);
        let grad = Arc::try_unwrap(s.grad).unwrap_or_else(|shared| (*shared).clone());
        let (dx, dw, db) =
            xent::linear_backward_from_grad(grad, &s.x, &s.w, s.hidden, g[0], big_threads());
        let dev = &s.device;
        register_grads!(
            grads,
            ops.parents,
            [
                device_tensor::<B, 2>(dx, [n, s.hidden], dev),
                device_tensor::<B, 2>(dw, [s.vocab, s.hidden], dev),
                device_tensor::<B, 1>(db, [s.vocab], dev),
            ]
        );
    }
}

/// Autodiff over a backend with host kernels: the forward pass runs the inner backend's
/// kernels and records one node whose backward pass runs them again.
impl<B: HostKernels, C: CheckpointStrategy> FusedRnnBackend for Autodiff<B, C> {
    const FUSED: bool = true;

    fn gru_sequence(
        xp: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        w_hh: FloatTensor<Self>,
        b_hh: FloatTensor<Self>,
        norm: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        mask: Option<Arc<[f32]>>,
    ) -> FloatTensor<Self> {
        let device = B::float_device(&xp.primitive);
        let mut nodes = vec![
            xp.node.clone(),
            h0.node.clone(),
            w_hh.node.clone(),
            b_hh.node.clone(),
        ];
        let inner_norm = norm.map(|(gm, bt)| {
            nodes.push(gm.node.clone());
            nodes.push(bt.node.clone());
            (gm.primitive, bt.primitive)
        });
        let run = |saved: Option<&mut GruSaved>| {
            gru_host::<B>(
                xp.primitive,
                h0.primitive,
                w_hh.primitive,
                b_hh.primitive,
                inner_norm,
                mask.as_deref(),
                saved,
            )
        };
        let state = |saved: GruSaved, dims, weights| GruState {
            dims,
            weights: Arc::new(weights),
            mask: mask.clone(),
            saved: Arc::new(saved),
            device,
        };
        if nodes.len() == 6 {
            let nodes: [_; 6] = nodes.try_into().expect("six nodes");
            match GruLnBackward.prepare::<C>(nodes).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let mut saved = GruSaved::default();
                    let (out, dims, weights) = run(Some(&mut saved));
                    prep.finish(state(saved, dims, weights), out)
                }
                OpsKind::UnTracked(prep) => prep.finish(run(None).0),
            }
        } else {
            let nodes: [_; 4] = nodes.try_into().expect("four nodes");
            match GruBackward.prepare::<C>(nodes).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let mut saved = GruSaved::default();
                    let (out, dims, weights) = run(Some(&mut saved));
                    prep.finish(state(saved, dims, weights), out)
                }
                OpsKind::UnTracked(prep) => prep.finish(run(None).0),
            }
        }
    }

    fn lstm_sequence(
        xp: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        w_hh: FloatTensor<Self>,
        b_hh: FloatTensor<Self>,
        mask: Option<Arc<[f32]>>,
    ) -> FloatTensor<Self> {
        let nodes = [
            xp.node.clone(),
            h0.node.clone(),
            c0.node.clone(),
            w_hh.node.clone(),
            b_hh.node.clone(),
        ];
        let (p, h, c, w, b) = (
            xp.primitive,
            h0.primitive,
            c0.primitive,
            w_hh.primitive,
            b_hh.primitive,
        );
        match LstmBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let device = B::float_device(&p);
                let mut saved = LstmSaved::default();
                let (out, dims, w) =
                    lstm_host::<B>(p, h, c, w, b, mask.as_deref(), Some(&mut saved));
                let state = LstmState {
                    dims,
                    w_hh: Arc::new(w),
                    mask,
                    saved: Arc::new(saved),
                    device,
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(lstm_host::<B>(p, h, c, w, b, mask.as_deref(), None).0)
            }
        }
    }

    fn linear_cross_entropy(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
        targets: Arc<[u32]>,
        weights: Arc<[f32]>,
        smoothing: f32,
    ) -> FloatTensor<Self> {
        let device = B::float_device(&x.primitive);
        let nodes = [x.node.clone(), w.node.clone(), b.node.clone()];
        let (xh, [_, h]) = host::<B, 2>(x.primitive);
        let (wh, [v, _]) = host::<B, 2>(w.primitive);
        let (bh, _) = host::<B, 1>(b.primitive);
        match XentBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (loss, grad) = xent::linear_forward_grad(
                    &xh,
                    &wh,
                    &bh,
                    h,
                    &targets,
                    &weights,
                    smoothing,
                    big_threads(),
                );
                let out = device_tensor::<B, 1>(vec![loss], [1], &device);
                prep.finish(
                    XentState {
                        grad: Arc::new(grad),
                        x: Arc::new(xh),
                        w: Arc::new(wh),
                        hidden: h,
                        vocab: v,
                        device,
                    },
                    out,
                )
            }
            OpsKind::UnTracked(prep) => {
                let mut logits = Vec::new();
                let (loss, _) = xent::linear_forward(
                    &xh,
                    &wh,
                    &bh,
                    h,
                    &targets,
                    &weights,
                    smoothing,
                    &mut logits,
                    big_threads(),
                );
                prep.finish(device_tensor::<B, 1>(vec![loss], [1], &device))
            }
        }
    }
}

/// Output projection and masked cross-entropy in one operation (see
/// [`FusedRnnBackend::linear_cross_entropy`]).
pub fn linear_cross_entropy<B: FusedRnnBackend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
    b: Tensor<B, 1>,
    targets: Arc<[u32]>,
    weights: Arc<[f32]>,
    smoothing: f32,
) -> Tensor<B, 1> {
    let out = B::linear_cross_entropy(
        x.into_primitive().tensor(),
        w.into_primitive().tensor(),
        b.into_primitive().tensor(),
        targets,
        weights,
        smoothing,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The LSTM recurrence on engine tensors (see [`FusedRnnBackend::lstm_sequence`]).
pub fn lstm_sequence<B: FusedRnnBackend>(
    xp: Tensor<B, 3>,
    h0: Tensor<B, 2>,
    c0: Tensor<B, 2>,
    w_hh: Tensor<B, 2>,
    b_hh: Tensor<B, 1>,
    mask: Option<Arc<[f32]>>,
) -> Tensor<B, 3> {
    let out = B::lstm_sequence(
        xp.into_primitive().tensor(),
        h0.into_primitive().tensor(),
        c0.into_primitive().tensor(),
        w_hh.into_primitive().tensor(),
        b_hh.into_primitive().tensor(),
        mask,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The GRU recurrence on engine tensors (see [`FusedRnnBackend::gru_sequence`]).
pub fn gru_sequence<B: FusedRnnBackend>(
    xp: Tensor<B, 3>,
    h0: Tensor<B, 2>,
    w_hh: Tensor<B, 2>,
    b_hh: Tensor<B, 1>,
    norm: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    mask: Option<Arc<[f32]>>,
) -> Tensor<B, 3> {
    let out = B::gru_sequence(
        xp.into_primitive().tensor(),
        h0.into_primitive().tensor(),
        w_hh.into_primitive().tensor(),
        b_hh.into_primitive().tensor(),
        norm.map(|(g, b)| (g.into_primitive().tensor(), b.into_primitive().tensor())),
        mask,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
