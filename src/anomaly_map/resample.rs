//! The patch grid of distances to a map over the input image: bilinear sampling (grid to
//! crop, crop to image), Gaussian smoothing (host memory; a map is
//! small and these are cheap next to the encoder).

use rayon::prelude::*;

/// An `out_h` × `out_w` grid whose pixel (x, y) is `values` (`h` × `w`) sampled bilinearly at
/// `at(x, y)` (continuous coordinates with pixel centres at integers), clamped to the edges.
pub(crate) fn sample_grid(
    values: &[f32],
    (h, w): (usize, usize),
    (out_h, out_w): (usize, usize),
    at: impl Fn(f64, f64) -> (f64, f64) + Sync,
) -> Vec<f32> {
    let clamp = |v: f64, n: usize| v.clamp(0.0, (n - 1) as f64);
    let mut out = vec![0f32; out_h * out_w];
    out.par_chunks_mut(out_w.max(1))
        .enumerate()
        .for_each(|(y, row)| {
            for (x, dst) in row.iter_mut().enumerate() {
                let (fx, fy) = at(x as f64, y as f64);
                let (fx, fy) = (clamp(fx, w), clamp(fy, h));
                let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
                let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
                let (ax, ay) = ((fx - x0 as f64) as f32, (fy - y0 as f64) as f32);
                let v = |xx: usize, yy: usize| values[yy * w + xx];
                let top = v(x0, y0) * (1.0 - ax) + v(x1, y0) * ax;
                let bottom = v(x0, y1) * (1.0 - ax) + v(x1, y1) * ax;
                *dst = top * (1.0 - ay) + bottom * ay;
            }
        });
    out
}

/// `values` (`h` × `w`) smoothed by a Gaussian of standard deviation `sigma` pixels, as
/// anomalib's `GaussianBlur2d` (kornia): kernel size 2·⌊4σ + 0.5⌋ + 1, normalised, borders
/// reflected (without repeating the edge). `sigma ≤ 0` returns the values unchanged.
pub(crate) fn gaussian_blur(values: &[f32], (h, w): (usize, usize), sigma: f32) -> Vec<f32> {
    if sigma <= 0.0 || !sigma.is_finite() {
        return values.to_vec();
    }
    let radius = (4.0 * sigma + 0.5) as usize;
    let kernel: Vec<f32> = (0..=2 * radius)
        .map(|i| {
            let x = i as f32 - radius as f32;
            (-x * x / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let total: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / total).collect();
    let reflect = |i: isize, n: usize| -> usize {
        if n == 1 {
            return 0;
        }
        let period = 2 * (n as isize - 1);
        let m = i.rem_euclid(period);
        (if m < n as isize { m } else { period - m }) as usize
    };
    let pass = |src: &[f32], out: &mut [f32], along_x: bool| {
        out.par_chunks_mut(w).enumerate().for_each(|(y, row)| {
            for (x, dst) in row.iter_mut().enumerate() {
                *dst = kernel
                    .iter()
                    .enumerate()
                    .map(|(i, k)| {
                        let off = i as isize - radius as isize;
                        let (xx, yy) = if along_x {
                            (reflect(x as isize + off, w), y)
                        } else {
                            (x, reflect(y as isize + off, h))
                        };
                        k * src[yy * w + xx]
                    })
                    .sum();
            }
        });
    };
    let mut tmp = vec![0f32; values.len()];
    let mut out = vec![0f32; values.len()];
    pass(values, &mut tmp, true);
    pass(&tmp, &mut out, false);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_grid_with_half_pixel_centres_matches_pytorch_bilinear() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0., 1.], [2., 3.]]]]), size=(4, 4),
        // mode="bilinear", align_corners=False)
        let half_pixel = |v: f64| (v + 0.5) * 0.5 - 0.5;
        let out = sample_grid(&[0.0, 1.0, 2.0, 3.0], (2, 2), (4, 4), |x, y| {
            (half_pixel(x), half_pixel(y))
        });
        let expected = [
            0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0,
        ];
        for (a, b) in out.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn gaussian_blur_keeps_the_sum_of_an_inner_impulse_and_its_peak_in_place() {
        let (h, w) = (41, 41);
        let mut values = vec![0f32; h * w];
        values[20 * w + 20] = 1.0;
        let out = gaussian_blur(&values, (h, w), 2.0);
        let sum: f32 = out.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "{sum}");
        let peak = out
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i);
        assert_eq!(peak, Some(20 * w + 20));
        // The 1-D kernel's centre is 1/(σ√(2π)); the 2-D peak its square.
        let centre = 1.0 / (2.0 * (2.0 * std::f32::consts::PI).sqrt());
        assert!((out[20 * w + 20] - centre * centre).abs() < 1e-4);
        // A constant stays constant (reflected borders).
        let flat = gaussian_blur(&[3.0; 35], (5, 7), 4.0);
        assert!(flat.iter().all(|v| (v - 3.0).abs() < 1e-5), "{flat:?}");
        assert_eq!(gaussian_blur(&values, (h, w), 0.0), values);
    }
}
