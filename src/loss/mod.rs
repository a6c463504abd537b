//! The Mean-Shifted Contrastive loss and its plain contrastive ablation.
//!
//! For a batch of B images with views x′, x″ and the fixed center c (METHOD.md in the repository, Loss):
//!
//! ```text
//! θ′ᵢ = normalize(φ(x′ᵢ) − c),  θ″ᵢ = normalize(φ(x″ᵢ) − c)        (F.normalize, eps 1e-12)
//! Z = [θ′; θ″] (2B × D),  S = Z Zᵀ / τ
//! ℓᵢ = −S[i, pos(i)] + log Σ_{j≠i} exp(S[i, j]),   L_msc = mean over the 2B rows
//! angular:  L = L_msc + mean‖φ′ᵢ − c‖² + mean‖φ″ᵢ − c‖²
//! ```
//!
//! The log-sum-exp runs on the off-diagonal maximum, so no temperature overflows. Forward and
//! backward are one closed-form computation: the value and the exact gradients with respect to
//! φ′ and φ″ are computed together without an autodiff graph (two matrix products and a few
//! row operations). On the CPU backends (flex, ndarray) this is one backend operation, read in
//! place from the tensors' memory, whose backward step hands the kept gradients to φ′ and φ″;
//! it computes in f32 (views of another float type are converted, and the results cast back).
//! On other backends (wgpu) the same formulas run as tensor operations and enter the autodiff
//! graph through a surrogate whose value is the loss and whose gradient is exactly those
//! gradients. The center is a constant: it receives no gradient.
//!
//! ```
//! use burn::tensor::{Device, Tensor, Distribution};
//! use msad::encoder::l2_normalize;
//! use msad::loss::MeanShiftedContrastiveLossConfig;
//!
//! # fn main() -> msad::Result<()> {
//! let device = Device::flex().autodiff();
//! let phi1 = l2_normalize(Tensor::<2>::random([8, 16], Distribution::Normal(0.0, 1.0), &device)).require_grad();
//! let phi2 = l2_normalize(Tensor::<2>::random([8, 16], Distribution::Normal(0.0, 1.0), &device)).require_grad();
//! let center = Tensor::<1>::zeros([16], &device);
//! let loss = MeanShiftedContrastiveLossConfig::new().try_init()?.try_forward(phi1.clone(), phi2, center)?;
//! let grads = loss.backward();
//! assert_eq!(phi1.grad(&grads).unwrap().dims(), [8, 16]);
//! # Ok(())
//! # }
//! ```

// The extension macro names the deprecated `NdArray` backend in code it generates.
#[cfg(any(feature = "flex", feature = "ndarray"))]
#[allow(deprecated)]
mod cpu_op;

use burn::config::Config;
use burn::tensor::Tensor;

#[cfg(any(feature = "flex", feature = "ndarray"))]
use crate::device::{Route, Work, route};
use crate::{Error, NORM_EPS, Result};

/// Configuration of [`MeanShiftedContrastiveLoss`].
#[derive(Config, Debug, PartialEq)]
pub struct MeanShiftedContrastiveLossConfig {
    /// Softmax temperature τ. Default: 0.25 (the reference).
    #[config(default = 0.25)]
    pub temperature: f64,
    /// Add the angular center loss mean‖φ′−c‖² + mean‖φ″−c‖² (c must then be unit-norm).
    /// Default: false.
    #[config(default = false)]
    pub angular: bool,
}

impl MeanShiftedContrastiveLossConfig {
    /// The loss.
    ///
    /// # Panics
    /// On a non-positive or non-finite temperature; [`Self::try_init`] returns an error instead.
    pub fn init(&self) -> MeanShiftedContrastiveLoss {
        self.try_init()
            .expect("invalid MeanShiftedContrastiveLossConfig")
    }

    /// The loss, or [`Error::InvalidArgument`] for a temperature that is not finite and positive.
    pub fn try_init(&self) -> Result<MeanShiftedContrastiveLoss> {
        Ok(MeanShiftedContrastiveLoss {
            kernel: NtXent::new(self.temperature)?,
            angular: self.angular,
        })
    }
}

/// The Mean-Shifted Contrastive loss (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct MeanShiftedContrastiveLoss {
    kernel: NtXent,
    angular: bool,
}

impl MeanShiftedContrastiveLoss {
    /// The loss (a one-element tensor) for views `phi1`, `phi2` (B × D, the encoder's
    /// normalised features) and the center `center` (D).
    ///
    /// # Panics
    /// On inputs [`Self::try_forward`] rejects (shapes, devices, float types).
    pub fn forward(&self, phi1: Tensor<2>, phi2: Tensor<2>, center: Tensor<1>) -> Tensor<1> {
        self.try_forward(phi1, phi2, center)
            .expect("invalid input to MeanShiftedContrastiveLoss")
    }

    /// [`Self::forward`], returning [`Error::InvalidShape`] when `phi1` and `phi2` differ in
    /// shape, B < 2, or the center's length is not D, and [`Error::InvalidArgument`] when the
    /// views or the center differ in device (autodiff aside) or float type.
    pub fn try_forward(
        &self,
        phi1: Tensor<2>,
        phi2: Tensor<2>,
        center: Tensor<1>,
    ) -> Result<Tensor<1>> {
        let [_, d] = check_views(&phi1, &phi2)?;
        if center.dims() != [d] {
            return Err(Error::InvalidShape {
                what: "center".into(),
                expected: format!("[{d}] (the views' feature dimension)"),
                found: center.dims().to_vec(),
            });
        }
        check_same_kind("center", &center, &phi1)?;
        let c = center.unsqueeze_dim::<2>(0);
        Ok(self
            .kernel
            .loss(phi1, phi2, Some(c.without_autodiff()), self.angular))
    }

    /// The loss and its gradient with respect to φ for features on host memory: `phi` holds
    /// the B rows of the first view then the B rows of the second (2B × D, row-major), `center`
    /// is c (D). Shapes are the caller's to check (the kernel panics on a mismatch).
    pub(crate) fn value_and_grad_host(
        &self,
        phi: &[f32],
        center: &[f32],
        b: usize,
        d: usize,
    ) -> (f64, Vec<f32>) {
        let inv_tau = (1.0 / self.kernel.temperature) as f32;
        let views = phi.split_at(phi.len() / 2);
        let out = crate::cpu::loss::nt_xent(
            [views.0, views.1],
            Some(center),
            b,
            d,
            inv_tau,
            self.angular,
            true,
        );
        (out.value, out.grad.unwrap_or_default())
    }

    /// The temperature τ.
    pub fn temperature(&self) -> f64 {
        self.kernel.temperature
    }

    /// Whether the angular center loss is added.
    pub fn angular(&self) -> bool {
        self.angular
    }
}

/// Configuration of [`ContrastiveLoss`].
#[derive(Config, Debug, PartialEq)]
pub struct ContrastiveLossConfig {
    /// Softmax temperature τ. Default: 0.25.
    #[config(default = 0.25)]
    pub temperature: f64,
}

impl ContrastiveLossConfig {
    /// The loss, or [`Error::InvalidArgument`] for a temperature that is not finite and positive.
    pub fn try_init(&self) -> Result<ContrastiveLoss> {
        Ok(ContrastiveLoss {
            kernel: NtXent::new(self.temperature)?,
        })
    }
}

/// Plain NT-Xent (SimCLR) on normalize(φ), without the mean shift: the paper's ablation. It
/// shares [`MeanShiftedContrastiveLoss`]'s kernel.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use msad::loss::ContrastiveLossConfig;
///
/// let device = Device::flex();
/// let z = Tensor::<2>::from_floats([[1.0, 0.0], [0.0, 1.0]], &device);
/// let loss = ContrastiveLossConfig::new().try_init()?.try_forward(z.clone(), z)?;
/// assert!(loss.into_scalar::<f32>() > 0.0);
/// # Ok::<(), msad::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ContrastiveLoss {
    kernel: NtXent,
}

impl ContrastiveLoss {
    /// The loss for views `z1`, `z2` (B × D), B ≥ 2.
    pub fn try_forward(&self, z1: Tensor<2>, z2: Tensor<2>) -> Result<Tensor<1>> {
        check_views(&z1, &z2)?;
        Ok(self.kernel.loss(z1, z2, None, false))
    }
}

fn check_views(a: &Tensor<2>, b: &Tensor<2>) -> Result<[usize; 2]> {
    check_same_kind("second view", b, a)?;
    let (da, db) = (a.dims(), b.dims());
    if da != db {
        return Err(Error::InvalidShape {
            what: "second view".into(),
            expected: format!("{da:?} (the first view's shape)"),
            found: db.to_vec(),
        });
    }
    if da[0] < 2 || da[1] == 0 {
        return Err(Error::InvalidShape {
            what: "views".into(),
            expected: "[B, D] with B ≥ 2 and D ≥ 1".into(),
            found: da.to_vec(),
        });
    }
    Ok(da)
}

/// `tensor` (named `what`) is on the device of `first` (autodiff or not) with its float type.
fn check_same_kind<const D: usize, const E: usize>(
    what: &str,
    tensor: &Tensor<D>,
    first: &Tensor<E>,
) -> Result<()> {
    let (device, expected) = (tensor.device(), first.device());
    if device.clone().without_autodiff() != expected.clone().without_autodiff() {
        return Err(Error::invalid(
            what,
            format!("on {device:?}, the first view on {expected:?}"),
        ));
    }
    let (dtype, expected) = (tensor.dtype(), first.dtype());
    if dtype != expected {
        return Err(Error::invalid(
            what,
            format!("of {dtype:?}, the first view of {expected:?}"),
        ));
    }
    Ok(())
}

/// The shared kernel: NT-Xent over normalize(u) for u = [x1 − c; x2 − c], value and closed-form
/// gradient in one pass.
#[derive(Clone, Debug)]
struct NtXent {
    temperature: f64,
}

impl NtXent {
    fn new(temperature: f64) -> Result<Self> {
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(Error::invalid(
                "temperature",
                format!("{temperature}; must be finite and positive"),
            ));
        }
        Ok(Self { temperature })
    }

    /// The loss of `x1`, `x2` (B × D) shifted by `center` (1 × D, plain device) if given,
    /// plus the angular term if asked. On autodiff inputs, the result carries the exact
    /// gradient.
    fn loss(
        &self,
        x1: Tensor<2>,
        x2: Tensor<2>,
        center: Option<Tensor<2>>,
        angular: bool,
    ) -> Tensor<1> {
        #[cfg(any(feature = "flex", feature = "ndarray"))]
        if route(&x1.device(), Work::Loss) == Route::Cpu {
            let shifted = center.is_some();
            // Not read unshifted: any tensor of the device will do.
            let center =
                center.unwrap_or_else(|| Tensor::zeros([1, 1], &x1.device().without_autodiff()));
            let options = cpu_op::CpuLossOptions {
                inv_tau: (1.0 / self.temperature) as f32,
                shifted,
                angular,
            };
            return cpu_op::loss(x1, x2, center, options);
        }
        let tracked = x1.is_autodiff() || x2.is_autodiff();
        let (p1, p2) = (x1.clone().without_autodiff(), x2.clone().without_autodiff());
        let (u1, u2) = match center {
            Some(c) => (p1 - c.clone(), p2 - c),
            None => (p1, p2),
        };
        let (value, grads) = self.value_and_grad(u1, u2, angular, tracked);
        let Some((g1, g2)) = grads else {
            return value;
        };
        // Surrogate: value + s − detach(s) with s = ⟨x1, g1⟩ + ⟨x2, g2⟩. Its value is the loss
        // (s − s is exactly 0) and its gradient with respect to x1, x2 is exactly g1, g2.
        let s = (x1 * g1.autodiff()).sum() + (x2 * g2.autodiff()).sum();
        value.autodiff() + s.clone() - s.detach()
    }

    /// Loss value and, if `with_grad`, its gradients with respect to u1 and u2.
    #[allow(clippy::type_complexity)]
    fn value_and_grad(
        &self,
        u1: Tensor<2>,
        u2: Tensor<2>,
        angular: bool,
        with_grad: bool,
    ) -> (Tensor<1>, Option<(Tensor<2>, Tensor<2>)>) {
        let [b, _] = u1.dims();
        let n = 2 * b;
        let device = u1.device();
        let inv_tau = (1.0 / self.temperature) as f32;
        let u = Tensor::cat(vec![u1.clone(), u2.clone()], 0);
        let raw_norm = u.clone().square().sum_dim(1).sqrt(); // n × 1
        let norm = raw_norm.clone().clamp_min(NORM_EPS);
        let theta = u / norm.clone();
        let s = theta.clone().matmul(theta.clone().transpose()) * inv_tau; // n × n
        // |S| ≤ 1/τ, so subtracting 4/τ on the diagonal puts it below every off-diagonal entry:
        // the row maximum is then the off-diagonal one, and exp() never overflows.
        let eye = Tensor::<2>::eye(n, &device);
        let masked = s.clone() - eye.clone() * (4.0 * inv_tau);
        let m = masked.clone().max_dim(1); // n × 1
        let e = (masked - m.clone()).exp() * (eye.neg() + 1.0);
        let z = e.clone().sum_dim(1);
        let lse = m + z.clone().log(); // n × 1
        let [t1, t2] = halves(theta.clone(), b);
        let pos = (t1.clone() * t2.clone()).sum_dim(1) * inv_tau; // b × 1, S[i, i ± B]
        let mut value = (lse.sum() - pos.sum() * 2.0) / n as f32;
        if angular {
            value = value + (u1.clone().square().sum() + u2.clone().square().sum()) / b as f32;
        }
        if !with_grad {
            return (value, None);
        }
        // dL/dS = (P − Π) / 2B with P the off-diagonal softmax and Π the positive-pair
        // permutation; dL/dZ = (dL/dS + dL/dSᵀ) Z / τ.
        let p = e / z;
        let swapped = Tensor::cat(vec![t2, t1], 0);
        let g_theta = (p.clone() + p.transpose()).matmul(theta.clone()) - swapped * 2.0;
        let g_theta = g_theta * (inv_tau / n as f32);
        // Back through normalize: (g − θ⟨θ, g⟩) / ‖u‖ where ‖u‖ > eps; g / eps where clamped.
        let live = raw_norm.greater_elem(NORM_EPS).float();
        let radial = theta.clone() * ((theta * g_theta.clone()).sum_dim(1) * live);
        let g_u = (g_theta - radial) / norm;
        let [mut g1, mut g2] = halves(g_u, b);
        if angular {
            let scale = 2.0 / b as f32;
            g1 = g1 + u1 * scale;
            g2 = g2 + u2 * scale;
        }
        (value, Some((g1, g2)))
    }
}

/// Rows `0..b` and `b..2b`.
fn halves(x: Tensor<2>, b: usize) -> [Tensor<2>; 2] {
    let d = x.dims()[1];
    [x.clone().slice([0..b, 0..d]), x.slice([b..2 * b, 0..d])]
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution};

    use super::*;

    /// The host operation (CPU devices, its backward closed-form) and the tensor path (GPUs)
    /// compute the same value and gradients, on flex and ndarray: shifted or not, with or
    /// without the angular term, under an upstream gradient other than 1, from a
    /// non-contiguous view, and with one tensor as both views (its gradients add up).
    #[test]
    fn host_operation_and_tensor_path_agree() {
        #[allow(unused_mut)]
        let mut devices: Vec<Device> = vec![];
        #[cfg(feature = "flex")]
        devices.push(Device::flex());
        #[cfg(feature = "ndarray")]
        #[allow(deprecated)]
        devices.push(Device::ndarray());
        for plain in devices {
            for (b, d, angular, tau, shifted, upstream) in [
                (2, 3, false, 0.25, true, 1.0),
                (7, 64, true, 0.25, true, 3.0),
                (16, 300, false, 0.05, false, 1.0),
                (5, 40, true, 0.5, false, -0.5),
            ] {
                let case = format!("{plain:?} {b}x{d}");
                let kernel = NtXent::new(tau).unwrap();
                let random = |shape: [usize; 2], std| {
                    Tensor::<2>::random(shape, Distribution::Normal(0.0, std), &plain)
                };
                // The first view is a transposed one, so the host reads a copy of it.
                let (x1, x2) = (random([d, b], 1.0).transpose(), random([b, d], 1.0));
                let c = random([1, d], 0.3);
                let center = shifted.then(|| c.clone());

                let (t1, t2) = (
                    x1.clone().autodiff().require_grad(),
                    x2.clone().autodiff().require_grad(),
                );
                let value = kernel.loss(t1.clone(), t2.clone(), center.clone(), angular) * upstream;
                let got = value.clone().into_scalar::<f32>() / upstream;
                let grads = value.backward();
                let (g1, g2) = (t1.grad(&grads).unwrap(), t2.grad(&grads).unwrap());

                let shift = |x: Tensor<2>| match &center {
                    Some(c) => x - c.clone(),
                    None => x,
                };
                let (want, want_grads) =
                    kernel.value_and_grad(shift(x1.clone()), shift(x2), angular, true);
                let want = want.into_scalar::<f32>();
                // The value is a difference of terms up to 1/τ: its rounding is relative to
                // them, and a small value (positives far ahead) is all cancellation.
                let tolerance = 1e-4 * (want.abs() + 1.0 / tau as f32);
                assert!((got - want).abs() <= tolerance, "{case}: {got} vs {want}");
                let (w1, w2) = want_grads.unwrap();
                // Errors relative to the largest entry of `scale`; 1e-4 because the inputs
                // are random and tiny cases (B 2, D 3) cancel in float (tests/loss.rs holds
                // both paths to 1e-5 against PyTorch on fixed inputs). A wrong formula is off
                // by far more.
                let close = |g: Tensor<2>, w: Tensor<2>, scale: Tensor<2>, what: &str| {
                    let scale = scale.abs().max().into_scalar::<f32>();
                    let err = (g - w).abs().max().into_scalar::<f32>();
                    assert!(
                        err <= 1e-4 * scale,
                        "{case} {what}: gradient error {err} (scale {scale})"
                    );
                };
                let (w1, w2) = (w1 * upstream, w2 * upstream);
                close(g1, w1.clone(), w1, "x1");
                close(g2, w2.clone(), w2, "x2");

                // Without autodiff, the same value.
                let plain_value = kernel
                    .loss(t1.inner(), t2.inner(), center.clone(), angular)
                    .into_scalar::<f32>();
                assert!((plain_value - want).abs() <= tolerance, "{case}");

                // One tensor as both views: the two gradients reach it summed, as they reach
                // two tensors holding the same values. (Against the tensor path the sum would
                // be float noise: with θ′ = θ″ the two gradients nearly cancel.)
                let z = x1.clone().autodiff().require_grad();
                let grads = kernel
                    .loss(z.clone(), z.clone(), center.clone(), angular)
                    .backward();
                let (a, b) = (
                    x1.clone().autodiff().require_grad(),
                    x1.clone().autodiff().require_grad(),
                );
                let apart = kernel
                    .loss(a.clone(), b.clone(), center.clone(), angular)
                    .backward();
                let (ga, gb) = (a.grad(&apart).unwrap(), b.grad(&apart).unwrap());
                let terms = ga.clone().abs() + gb.clone().abs();
                close(z.grad(&grads).unwrap(), ga + gb, terms, "both views");
            }
        }
    }
}
