//! NT-Xent value and closed-form gradient on host memory: two matrix products (`crate::sgemm`)
//! and a few vectorised passes over the rows. Used when the features live on a CPU device,
//! where it replaces a chain of tensor operations (each a fresh allocation and a pass over
//! memory) by one computation.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::sgemm::{Operand, sgemm, sgemm_serial};

/// The loss and, when asked, dL/dx for the 2B rows (x₁ then x₂; 2B × D, row-major).
pub(super) struct Output {
    pub value: f64,
    pub grad: Option<Vec<f32>>,
}

thread_local! {
    /// θ (2B × D), reused across calls so that each step does not fault in fresh pages.
    static THETA: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// NT-Xent over θ = normalize(x − c) for the 2B rows of `x` (the first view's B rows, then
/// the second's).
#[allow(clippy::too_many_arguments)]
pub(super) fn nt_xent(
    x: &[f32],
    center: Option<&[f32]>,
    b: usize,
    d: usize,
    inv_tau: f32,
    angular: bool,
    with_grad: bool,
) -> Output {
    THETA.with_borrow_mut(|theta| {
        theta.resize(2 * b * d, 0.0);
        compute(x, center, b, d, inv_tau, angular, with_grad, theta)
    })
}

#[allow(clippy::too_many_arguments)]
fn compute(
    x: &[f32],
    center: Option<&[f32]>,
    b: usize,
    d: usize,
    inv_tau: f32,
    angular: bool,
    with_grad: bool,
    theta: &mut [f32],
) -> Output {
    let n = 2 * b;
    let row = |i: usize| &x[i * d..(i + 1) * d];
    // θ = (x − c) / max(‖x − c‖, eps), one task per row: (clamped norm, ‖x − c‖²).
    let norms: Vec<(f32, f32)> = theta
        .par_chunks_exact_mut(d)
        .enumerate()
        .map(|(i, t)| {
            match center {
                Some(c) => {
                    for ((t, x), c) in t.iter_mut().zip(row(i)).zip(c) {
                        *t = x - c;
                    }
                }
                None => t.copy_from_slice(row(i)),
            }
            let ss = dot(t, t);
            let norm = ss.sqrt().max(super::NORM_EPS);
            let inv = 1.0 / norm;
            t.iter_mut().for_each(|v| *v *= inv);
            (norm, ss)
        })
        .collect();
    let mut s = gram(theta, n, d);

    // Per row i: the off-diagonal softmax of the scaled similarities, overwriting S (0 on the
    // diagonal), and its log-sum-exp less the positive pair's logit.
    let terms: Vec<f64> = s
        .par_chunks_exact_mut(n)
        .enumerate()
        .map(|(i, r)| {
            let pos = r[(i + b) % n] * inv_tau;
            r[i] = f32::NEG_INFINITY;
            let m = r.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * inv_tau;
            let mut z = 0f32;
            for v in r.iter_mut() {
                *v = (*v * inv_tau - m).exp();
                z += *v;
            }
            let inv_z = 1.0 / z;
            r.iter_mut().for_each(|v| *v *= inv_z);
            (m + z.ln()) as f64 - pos as f64
        })
        .collect();
    let mut value = terms.iter().sum::<f64>() / n as f64;
    if angular {
        value += norms.iter().map(|&(_, ss)| ss as f64).sum::<f64>() / b as f64;
    }
    if !with_grad {
        return Output { value, grad: None };
    }

    // dL/dS = (P − Π) / 2B with P the off-diagonal softmax and Π the positive pairs;
    // dL/dθ = (dL/dS + dL/dSᵀ) θ / τ.
    let scale = inv_tau / n as f32;
    let mut sym = vec![0f32; n * n];
    sym.par_chunks_exact_mut(n).enumerate().for_each(|(i, r)| {
        for (j, v) in r.iter_mut().enumerate() {
            let positive = if j == (i + b) % n { 2.0 } else { 0.0 };
            *v = (s[i * n + j] + s[j * n + i] - positive) * scale;
        }
    });
    let mut grad = vec![0f32; n * d];
    sgemm(
        (n, d, n),
        Operand::rows(&sym, n),
        Operand::rows(theta, d),
        &mut grad,
        d,
        false,
    );
    // Back through normalize — (g − θ⟨θ, g⟩) / ‖u‖, or g / eps where the norm was clamped —
    // then the angular term 2 (x − c) / B.
    let ang = if angular { 2.0 / b as f32 } else { 0.0 };
    let theta = &*theta;
    grad.par_chunks_exact_mut(d).enumerate().for_each(|(i, g)| {
        let t = &theta[i * d..(i + 1) * d];
        let (norm, ss) = norms[i];
        let radial = if ss.sqrt() > super::NORM_EPS {
            dot(t, g)
        } else {
            0.0
        };
        let inv = 1.0 / norm;
        for (gv, tv) in g.iter_mut().zip(t) {
            *gv = (*gv - tv * radial) * inv;
        }
        if angular {
            // u = x − c = θ·‖u‖ where the norm was not clamped; recomputed to stay exact.
            let x = row(i);
            match center {
                Some(c) => g
                    .iter_mut()
                    .zip(x)
                    .zip(c)
                    .for_each(|((gv, x), c)| *gv += (x - c) * ang),
                None => g.iter_mut().zip(x).for_each(|(gv, x)| *gv += x * ang),
            }
        }
    });
    Output {
        value,
        grad: Some(grad),
    }
}

/// Σ a·b in 8 independent f32 lanes, so that it vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((l, p), q) in lanes.iter_mut().zip(x).zip(y) {
            *l += p * q;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// θ θᵀ (n × n) for θ (n × d, row-major). The output is small and the inner dimension long,
/// which the `gemm` crate does not split across threads: there, each thread takes a slice of
/// the columns and the partial products are summed.
fn gram(theta: &[f32], n: usize, d: usize) -> Vec<f32> {
    if crate::sgemm::library() == "openblas" {
        // OpenBLAS threads this shape well by itself.
        let mut s = vec![0f32; n * n];
        sgemm(
            (n, n, d),
            Operand::rows(theta, d),
            Operand::transposed(theta, d),
            &mut s,
            n,
            false,
        );
        return s;
    }
    let parts = (2 * rayon::current_num_threads()).clamp(1, d.div_ceil(256));
    let width = d.div_ceil(parts);
    let partial: Vec<Vec<f32>> = (0..parts)
        .into_par_iter()
        .map(|p| {
            let k0 = (p * width).min(d);
            let k1 = (k0 + width).min(d);
            let mut out = vec![0f32; n * n];
            if k1 > k0 {
                // Columns k0..k1 of the n × d row-major θ, times their transpose.
                sgemm_serial(
                    (n, n, k1 - k0),
                    Operand::rows(&theta[k0..], d),
                    Operand::transposed(&theta[k0..], d),
                    &mut out,
                    n,
                    false,
                );
            }
            out
        })
        .collect();
    let mut parts = partial.into_iter();
    let mut s = parts.next().unwrap_or_else(|| vec![0f32; n * n]);
    for part in parts {
        s.iter_mut().zip(part).for_each(|(a, b)| *a += b);
    }
    s
}
