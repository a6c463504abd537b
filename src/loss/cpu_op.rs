//! The loss as one backend operation on the CPU backends (flex, ndarray), with its closed-form
//! backward registered directly in the autodiff graph.
//!
//! The kernel reads both views and the center where they lie (no concatenation, no copy of a
//! contiguous f32 tensor) and computes the value and dL/dx together. Under autodiff, the
//! gradient is kept as the operation's state and handed to the two inputs' nodes on backward,
//! scaled by the incoming gradient (skipped when that is exactly 1, as it is for a loss
//! that is backpropagated directly). Before this operation existed, the gradient went into the
//! graph through a surrogate ⟨x, g⟩ whose forward and backward passes each walked the B × D
//! views again.
//!
//! Other devices (wgpu) take the tensor path in `super`, which autodiff differentiates.

use std::borrow::Cow;

#[cfg(feature = "flex")]
use burn::backend::Flex;
#[cfg(feature = "ndarray")]
#[allow(deprecated)]
use burn::backend::NdArray;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
#[cfg(feature = "ndarray")]
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, TensorMetadata, backend_extension};
use burn::tensor::{DType, Slice, Tensor, TensorData};

use crate::cpu::loss as kernel;

/// Options of one loss call that are not tensors.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CpuLossOptions {
    /// 1/τ.
    pub inv_tau: f32,
    /// Whether the views are shifted by the center (the mean-shifted loss) or not (plain
    /// NT-Xent, where the center is ignored).
    pub shifted: bool,
    /// Whether Σ‖x − c‖² / B is added.
    pub angular: bool,
}

/// NT-Xent over normalize(x − c) of `x1`, `x2` (B × D each) on a CPU device, plain or autodiff:
/// a one-element tensor that, under autodiff, carries the exact gradient with respect to `x1`
/// and `x2` (the center is a constant). `center` is 1 × D when `options.shifted`, otherwise any
/// tensor of the device (not read).
///
/// Shapes are the caller's to check; [`crate::device::route`] must have picked the CPU
/// engines for the device.
pub(super) fn loss(
    x1: Tensor<2>,
    x2: Tensor<2>,
    center: Tensor<2>,
    options: CpuLossOptions,
) -> Tensor<1> {
    Tensor::from_dispatch(<Dispatch as NtXentBackend>::nt_xent(
        x1.into_dispatch(),
        x2.into_dispatch(),
        center.into_dispatch(),
        options,
    ))
}

/// The loss as a backend operation. The generated [`Dispatch`] implementation routes it to
/// the CPU backends below and to their autodiff wrappers; other backends never reach it.
#[backend_extension(
    Autodiff,
    Flex: cfg(feature = "flex"),
    NdArray: cfg(feature = "ndarray")
)]
pub(crate) trait NtXentBackend: Backend {
    /// The loss value (shape [1]); see [`loss`].
    fn nt_xent(
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        center: FloatTensor<Self>,
        options: CpuLossOptions,
    ) -> FloatTensor<Self>;
}

/// CPU backends whose float tensors the kernel reads in host memory.
pub(crate) trait HostFloats: Backend {
    /// The tensor's values as row-major f32: borrowed when the tensor is contiguous f32,
    /// converted otherwise.
    fn host_values(tensor: &FloatTensor<Self>) -> Cow<'_, [f32]>;
}

#[cfg(feature = "flex")]
impl HostFloats for Flex {
    fn host_values(tensor: &FloatTensor<Self>) -> Cow<'_, [f32]> {
        match tensor.as_slice::<f32>() {
            Some(values) => Cow::Borrowed(values),
            None => Cow::Owned(f32_values(tensor.clone().into_data())),
        }
    }
}

#[cfg(feature = "ndarray")]
#[allow(deprecated)]
impl HostFloats for NdArray {
    fn host_values(tensor: &FloatTensor<Self>) -> Cow<'_, [f32]> {
        if let burn::backend::ndarray::NdArrayTensor::F32(storage) = tensor
            && let Some(values) = storage.view().to_slice()
        {
            return Cow::Borrowed(values);
        }
        let data = burn::tensor::try_read_sync(Self::float_into_data(tensor.clone()))
            .and_then(|read| read.ok())
            .expect("ndarray tensors are read synchronously");
        Cow::Owned(f32_values(data))
    }
}

/// The values of a float tensor's data as f32.
fn f32_values(data: TensorData) -> Vec<f32> {
    data.convert::<f32>()
        .try_into_vec::<f32>()
        .expect("float data converts to f32")
}

/// `NtXentBackend` for a CPU backend: the kernel on its host memory, value only.
macro_rules! host_nt_xent {
    ($backend:ty) => {
        impl NtXentBackend for $backend {
            fn nt_xent(
                x1: FloatTensor<Self>,
                x2: FloatTensor<Self>,
                center: FloatTensor<Self>,
                options: CpuLossOptions,
            ) -> FloatTensor<Self> {
                compute::<Self>(&x1, &x2, &center, options, false).0
            }
        }
    };
}

#[cfg(feature = "flex")]
host_nt_xent!(Flex);
#[cfg(feature = "ndarray")]
host_nt_xent!(NdArray);

/// The value (shape [1]) and, with `with_grad`, dL/d[x1; x2] (2B × D), in `x1`'s dtype.
fn compute<B: HostFloats>(
    x1: &FloatTensor<B>,
    x2: &FloatTensor<B>,
    center: &FloatTensor<B>,
    options: CpuLossOptions,
    with_grad: bool,
) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let dims = x1.shape();
    let (b, d) = (dims[0], dims[1]);
    let (dtype, device) = (x1.dtype(), x1.device());
    let views = [B::host_values(x1), B::host_values(x2)];
    let center = options.shifted.then(|| B::host_values(center));
    let out = kernel::nt_xent(
        [&views[0], &views[1]],
        center.as_deref(),
        b,
        d,
        options.inv_tau,
        options.angular,
        with_grad,
    );
    let tensor = |data: TensorData| {
        let t = B::float_from_data(data, &device);
        match dtype {
            DType::F32 => t,
            other => B::float_cast(t, other.into()),
        }
    };
    let value = tensor(TensorData::new(vec![out.value as f32], [1]));
    let grad = out.grad.map(|g| tensor(TensorData::new(g, [2 * b, d])));
    (value, grad)
}

/// The backward step: dL/dx held from the forward pass, scaled by the incoming gradient.
#[derive(Debug)]
struct NtXentBackward;

impl<B: HostFloats> Backward<B, 2> for NtXentBackward {
    /// dL/d[x1; x2] (2B × D).
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node1, node2] = ops.parents;
        let upstream = grads.consume::<B>(&ops.node);
        let grad = ops.state;
        let scale = B::host_values(&upstream)[0];
        let grad = if scale == 1.0 {
            grad
        } else {
            B::float_mul_scalar(grad, scale.into())
        };
        let n = grad.shape()[0];
        let b = n / 2;
        let rows = |range: std::ops::Range<usize>| {
            B::float_slice(grad.clone(), &[Slice::from(range), Slice::from(..)])
        };
        if let Some(node) = node1 {
            grads.register::<B>(node.id, rows(0..b));
        }
        if let Some(node) = node2 {
            grads.register::<B>(node.id, rows(b..n));
        }
    }
}

impl<B: HostFloats, C: CheckpointStrategy> NtXentBackend for Autodiff<B, C> {
    fn nt_xent(
        x1: FloatTensor<Self>,
        x2: FloatTensor<Self>,
        center: FloatTensor<Self>,
        options: CpuLossOptions,
    ) -> FloatTensor<Self> {
        let (x1, node1) = x1.into_parts();
        let (x2, node2) = x2.into_parts();
        let center = center.into_primitive();
        match NtXentBackward
            .prepare::<C>([node1, node2])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (value, grad) = compute::<B>(&x1, &x2, &center, options, true);
                prep.finish(grad.expect("asked for the gradient"), value)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(compute::<B>(&x1, &x2, &center, options, false).0)
            }
        }
    }
}
