//! Fused recurrent layers as engine operations: the GRU recurrence over a whole
//! sequence is one operation with its own backward pass (host kernels in
//! [`crate::kernels`]), registered with burn's autodiff as a single graph node instead
//! of about fifteen small operations per time step.

use crate::kernels::gru::{self, GruDims, GruSaved};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use std::sync::Arc;

/// Backends that run the fused recurrent operations.
pub trait FusedRnnBackend: Backend {
    /// The GRU recurrence. `xp`: `[B, T, 3H]` input projections (with `b_ih`); `h0`:
    /// `[B, H]`; `w_hh`: `[3H, H]`; `b_hh`: `[3H]`; `mask`: optional `[B*T]` of 1/0.
    /// Returns every step's state, `[B, T, H]`.
    fn gru_sequence(
        xp: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        w_hh: FloatTensor<Self>,
        b_hh: FloatTensor<Self>,
        mask: Option<Arc<[f32]>>,
    ) -> FloatTensor<Self>;
}

fn threads() -> usize {
    // Per-step products are small ([32, 128] x [128, 384]); splitting them across
    // threads costs more than it saves, so the kernels run on the calling thread.
    1
}

fn host<B: Backend, const D: usize>(t: FloatTensor<B>) -> (Vec<f32>, [usize; D]) {
    let t = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(t));
    let dims = t.dims();
    let v = t
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data converts to f32");
    (v, dims)
}

fn device_tensor<B: Backend, const D: usize>(
    v: Vec<f32>,
    dims: [usize; D],
    device: &B::Device,
) -> FloatTensor<B> {
    Tensor::<B, D>::from_data(TensorData::new(v, dims), device)
        .into_primitive()
        .tensor()
}

/// Runs the forward kernel on host copies of the inputs.
fn gru_host<B: Backend>(
    xp: FloatTensor<B>,
    h0: FloatTensor<B>,
    w_hh: FloatTensor<B>,
    b_hh: FloatTensor<B>,
    mask: Option<&[f32]>,
    saved: Option<&mut GruSaved>,
) -> (FloatTensor<B>, GruDims, Vec<f32>) {
    let device = B::float_device(&xp);
    let (xp, [bs, t, g]) = host::<B, 3>(xp);
    let (h0, _) = host::<B, 2>(h0);
    let (w, _) = host::<B, 2>(w_hh);
    let (b, _) = host::<B, 1>(b_hh);
    let d = GruDims {
        batch: bs,
        steps: t,
        hidden: g / 3,
    };
    let mut out = vec![0.0f32; bs * t * d.hidden];
    gru::forward(d, &xp, &h0, &w, &b, mask, &mut out, saved, threads());
    (device_tensor::<B, 3>(out, [bs, t, d.hidden], &device), d, w)
}

impl FusedRnnBackend for burn::backend::Flex {
    fn gru_sequence(
        xp: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        w_hh: FloatTensor<Self>,
        b_hh: FloatTensor<Self>,
        mask: Option<Arc<[f32]>>,
    ) -> FloatTensor<Self> {
        gru_host::<Self>(xp, h0, w_hh, b_hh, mask.as_deref(), None).0
    }
}

/// What the GRU node keeps for its backward pass.
#[derive(Debug, Clone)]
struct GruState<D> {
    dims: GruDims,
    w_hh: Arc<Vec<f32>>,
    mask: Option<Arc<[f32]>>,
    saved: Arc<GruSaved>,
    device: D,
}

#[derive(Debug)]
struct GruBackward;

impl<B: Backend> Backward<B, 4> for GruBackward {
    type State = GruState<B::Device>;

    fn backward(
        self,
        ops: Ops<Self::State, 4>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let s = ops.state;
        let d = s.dims;
        let (dout, _) = host::<B, 3>(grads.consume::<B>(&ops.node));
        let gr = gru::backward(d, &s.w_hh, s.mask.as_deref(), &s.saved, &dout, threads());
        let [p_xp, p_h0, p_w, p_b] = ops.parents;
        let g = 3 * d.hidden;
        if let Some(n) = p_xp {
            grads.register::<B>(
                n.id,
                device_tensor::<B, 3>(gr.dxp, [d.batch, d.steps, g], &s.device),
            );
        }
        if let Some(n) = p_h0 {
            grads.register::<B>(
                n.id,
                device_tensor::<B, 2>(gr.dh0, [d.batch, d.hidden], &s.device),
            );
        }
        if let Some(n) = p_w {
            grads.register::<B>(
                n.id,
                device_tensor::<B, 2>(gr.dw_hh, [g, d.hidden], &s.device),
            );
        }
        if let Some(n) = p_b {
            grads.register::<B>(n.id, device_tensor::<B, 1>(gr.db_hh, [g], &s.device));
        }
    }
}

impl<B: Backend, C: CheckpointStrategy> FusedRnnBackend for Autodiff<B, C> {
    fn gru_sequence(
        xp: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        w_hh: FloatTensor<Self>,
        b_hh: FloatTensor<Self>,
        mask: Option<Arc<[f32]>>,
    ) -> FloatTensor<Self> {
        let nodes = [
            xp.node.clone(),
            h0.node.clone(),
            w_hh.node.clone(),
            b_hh.node.clone(),
        ];
        match GruBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let device = B::float_device(&xp.primitive);
                let mut saved = GruSaved::default();
                let (out, dims, w) = gru_host::<B>(
                    xp.primitive,
                    h0.primitive,
                    w_hh.primitive,
                    b_hh.primitive,
                    mask.as_deref(),
                    Some(&mut saved),
                );
                let state = GruState {
                    dims,
                    w_hh: Arc::new(w),
                    mask,
                    saved: Arc::new(saved),
                    device,
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => {
                let out = gru_host::<B>(
                    xp.primitive,
                    h0.primitive,
                    w_hh.primitive,
                    b_hh.primitive,
                    mask.as_deref(),
                    None,
                )
                .0;
                prep.finish(out)
            }
        }
    }
}

/// The GRU recurrence on engine tensors (see [`FusedRnnBackend::gru_sequence`]).
pub fn gru_sequence<B: FusedRnnBackend>(
    xp: Tensor<B, 3>,
    h0: Tensor<B, 2>,
    w_hh: Tensor<B, 2>,
    b_hh: Tensor<B, 1>,
    mask: Option<Arc<[f32]>>,
) -> Tensor<B, 3> {
    let out = B::gru_sequence(
        xp.into_primitive().tensor(),
        h0.into_primitive().tensor(),
        w_hh.into_primitive().tensor(),
        b_hh.into_primitive().tensor(),
        mask,
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}
