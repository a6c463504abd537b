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
    // θ = (x − c) / max(‖x − c‖, eps), one pass per row.
    let mut norm = vec![0f32; n];
    let mut live = vec![false; n];
    let mut squares = 0f64;
    for (i, t) in theta.chunks_exact_mut(d).enumerate() {
        match center {
            Some(c) => {
                for ((t, x), c) in t.iter_mut().zip(row(i)).zip(c) {
                    *t = x - c;
                }
            }
            None => t.copy_from_slice(row(i)),
        }
        let ss = dot(t, t);
        squares += ss as f64;
        let raw = ss.sqrt();
        live[i] = raw > super::NORM_EPS;
        norm[i] = raw.max(super::NORM_EPS);
        let inv = 1.0 / norm[i];
        t.iter_mut().for_each(|v| *v *= inv);
    }
    let mut s = gram(theta, n, d);

    // Off-diagonal log-sum-exp per row of the scaled similarities.
    let mut value = 0f64;
    let mut lse = vec![0f32; n];
    for i in 0..n {
        let off_diagonal = || {
            s[i * n..(i + 1) * n]
                .iter()
                .enumerate()
                .filter(move |(j, _)| *j != i)
                .map(|(_, v)| v * inv_tau)
        };
        let m = off_diagonal().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = off_diagonal().map(|v| (v - m).exp()).sum();
        lse[i] = m + z.ln();
        let pos = s[i * n + (i + b) % n] * inv_tau;
        value += lse[i] as f64 - pos as f64;
    }
    value /= n as f64;
    if angular {
        value += squares / b as f64;
    }
    if !with_grad {
        return Output { value, grad: None };
    }

    // dL/dS = (P − Π) / 2B with P the off-diagonal softmax and Π the positive pairs;
    // dL/dθ = (dL/dS + dL/dSᵀ) θ / τ.
    for i in 0..n {
        for j in 0..n {
            let v = &mut s[i * n + j];
            *v = if i == j {
                0.0
            } else {
                (*v * inv_tau - lse[i]).exp()
            };
        }
    }
    let scale = inv_tau / n as f32;
    let mut sym = vec![0f32; n * n];
    for i in 0..n {
        for j in 0..n {
            let positive = if j == (i + b) % n { 2.0 } else { 0.0 };
            sym[i * n + j] = (s[i * n + j] + s[j * n + i] - positive) * scale;
        }
    }
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
    for (i, g) in grad.chunks_exact_mut(d).enumerate() {
        let t = &theta[i * d..(i + 1) * d];
        let radial = if live[i] { dot(t, g) } else { 0.0 };
        let inv = 1.0 / norm[i];
        for (j, (gv, tv)) in g.iter_mut().zip(t).enumerate() {
            *gv = (*gv - tv * radial) * inv;
            if angular {
                let u = row(i)[j] - center.map_or(0.0, |c| c[j]);
                *gv += u * ang;
            }
        }
    }
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
