//! Segmentation metrics over anomaly maps: pixel ROC-AUC and the area under the per-region
//! overlap curve (AUPRO).
//!
//! Both take one anomaly map per image (higher = more anomalous) and its ground-truth mask of
//! the same shape (`true` = anomalous pixel), as [`ndarray::ArrayView2`]s indexed
//! `[row, column]`. Images may differ in size from one another.

use ndarray::ArrayView2;
use rayon::prelude::*;

use crate::{Error, Result};

/// The false positive rate up to which [`pro_auc`] integrates by default, 0.3: the limit of
/// the MVTec AD paper and of anomalib's `AUPRO`.
///
/// ```
/// assert_eq!(msad::metrics::DEFAULT_MAX_FPR, 0.3);
/// ```
pub const DEFAULT_MAX_FPR: f64 = 0.3;

/// Checks that there is one mask per map, of the map's shape, and that every map value is
/// finite. Returns the number of anomalous and of normal pixels.
fn check(maps: &[ArrayView2<'_, f32>], masks: &[ArrayView2<'_, bool>]) -> Result<(usize, usize)> {
    if maps.len() != masks.len() {
        return Err(Error::invalid(
            "anomaly maps and masks",
            format!("{} anomaly maps but {} masks", maps.len(), masks.len()),
        ));
    }
    let (mut anomalous, mut normal) = (0usize, 0usize);
    for (i, (map, mask)) in maps.iter().zip(masks).enumerate() {
        if map.shape() != mask.shape() {
            return Err(Error::InvalidShape {
                what: format!("the mask of image {i}"),
                expected: format!("{:?} (the shape of anomaly map {i})", map.shape()),
                found: mask.shape().to_vec(),
            });
        }
        if let Some(((row, column), value)) = map.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: format!("anomaly map {i}"),
                detail: format!("pixel (row {row}, column {column}) is {value}"),
            });
        }
        let positives = mask.iter().filter(|&&m| m).count();
        anomalous += positives;
        normal += mask.len() - positives;
    }
    Ok((anomalous, normal))
}

/// The pixel-level ROC-AUC: the ROC-AUC of all pixels of all images pooled, as
/// `sklearn.metrics.roc_auc_score(masks.ravel(), maps.ravel())` and anomalib's pixel `AUROC`
/// (tied values count one half; see [`roc_auc`](super::roc_auc)).
///
/// `maps[i]` is the anomaly map of image `i`, `masks[i]` its ground truth (`true` = anomalous
/// pixel), of the same shape; images may have different shapes. Memory: a copy of every pixel
/// (5 bytes) and an index (8 bytes a pixel) while it runs.
///
/// Errors: [`Error::InvalidArgument`] when the counts differ or the pixels are all anomalous
/// or all normal; [`Error::InvalidShape`] naming the image whose mask and map differ in shape;
/// [`Error::NonFinite`] naming the image and pixel of a NaN or infinite map value.
///
/// ```
/// use ndarray::array;
///
/// # fn main() -> msad::Result<()> {
/// let map = array![[0.1f32, 0.9], [0.2, 0.3]];
/// let mask = array![[false, true], [false, false]];
/// let auc = msad::metrics::pixel_roc_auc(&[map.view()], &[mask.view()])?;
/// assert_eq!(auc, 1.0);
/// # Ok(())
/// # }
/// ```
pub fn pixel_roc_auc(maps: &[ArrayView2<'_, f32>], masks: &[ArrayView2<'_, bool>]) -> Result<f64> {
    let (anomalous, normal) = check(maps, masks)?;
    if anomalous == 0 || normal == 0 {
        return Err(Error::invalid(
            "masks",
            format!(
                "pixel ROC-AUC needs both anomalous and normal pixels; the {} masks have \
                 {anomalous} anomalous and {normal} normal pixels",
                masks.len()
            ),
        ));
    }
    let scores: Vec<f32> = maps.iter().flat_map(|m| m.iter().copied()).collect();
    let labels: Vec<bool> = masks.iter().flat_map(|m| m.iter().copied()).collect();
    super::roc_auc(&scores, &labels)
}

/// Labels the 8-connected components of `mask` (row-major, `[row, column]`), numbering them
/// from `sizes.len() + 1` on and appending their sizes to `sizes`; 0 = normal pixel.
fn label_regions(mask: &ArrayView2<'_, bool>, sizes: &mut Vec<u64>) -> Vec<usize> {
    let (rows, columns) = mask.dim();
    let mut labels = vec![0usize; rows * columns];
    let mut stack = Vec::new();
    for row in 0..rows {
        for column in 0..columns {
            if !mask[[row, column]] || labels[row * columns + column] != 0 {
                continue;
            }
            sizes.push(0);
            let id = sizes.len();
            labels[row * columns + column] = id;
            stack.push((row, column));
            let mut size = 0u64;
            while let Some((r, c)) = stack.pop() {
                size += 1;
                for nr in r.saturating_sub(1)..=(r + 1).min(rows - 1) {
                    for nc in c.saturating_sub(1)..=(c + 1).min(columns - 1) {
                        let k = nr * columns + nc;
                        if mask[[nr, nc]] && labels[k] == 0 {
                            labels[k] = id;
                            stack.push((nr, nc));
                        }
                    }
                }
            }
            sizes[id - 1] = size;
        }
    }
    labels
}

/// The per-region overlap curve: (FPR, PRO) at every distinct map value, highest value first,
/// preceded by (0, 0) and followed by (1, 1).
fn pro_curve(
    maps: &[ArrayView2<'_, f32>],
    masks: &[ArrayView2<'_, bool>],
) -> Result<Vec<(f64, f64)>> {
    let mut sizes = Vec::new();
    // (score, region): region 0 = normal pixel, k = the k-th ground-truth region.
    let mut pixels: Vec<(f32, usize)> = Vec::new();
    for (map, mask) in maps.iter().zip(masks) {
        let labels = label_regions(mask, &mut sizes);
        pixels.extend(map.iter().copied().zip(labels));
    }
    let normal = pixels.iter().filter(|p| p.1 == 0).count();
    if sizes.is_empty() || normal == 0 {
        return Err(Error::invalid(
            "masks",
            format!(
                "the per-region overlap needs at least one anomalous region and one normal \
                 pixel; the {} masks have {} regions and {normal} normal pixels",
                masks.len(),
                sizes.len()
            ),
        ));
    }
    pixels.par_sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    let (normal, regions) = (normal as f64, sizes.len() as f64);
    let mut curve = Vec::with_capacity(pixels.len() + 2);
    curve.push((0.0, 0.0));
    let (mut false_positives, mut overlap) = (0u64, 0.0f64);
    let mut i = 0;
    while i < pixels.len() {
        let threshold = pixels[i].0;
        while i < pixels.len() && pixels[i].0 == threshold {
            match pixels[i].1 {
                0 => false_positives += 1,
                region => overlap += 1.0 / sizes[region - 1] as f64,
            }
            i += 1;
        }
        let fpr = (false_positives as f64 / normal).min(1.0);
        curve.push((fpr, (overlap / regions).min(1.0)));
    }
    curve.push((1.0, 1.0));
    Ok(curve)
}

/// The area under the per-region overlap (PRO) curve up to a false positive rate of `max_fpr`,
/// divided by `max_fpr` (so 1 is perfect): the segmentation metric of the MVTec AD paper
/// (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021, Sec. 5.2), called
/// AUPRO in anomalib. [`DEFAULT_MAX_FPR`] (0.3) is the paper's limit.
///
/// The definition followed is that of the MVTec AD evaluation code (`compute_pro` and
/// `trapezoid` in its `pro_curve_util.py` / `generic_util.py`):
///
/// - the ground-truth regions are the **8-connected** components of each mask (the 3 × 3
///   structure of `scipy.ndimage.label` there; `cv2.connectedComponents`, 8-connected by
///   default, in anomalib); a region never spans two images;
/// - the thresholds are **every distinct map value** (no resampling); at threshold t a pixel
///   is predicted anomalous when its value is ≥ t;
/// - FPR(t) = normal pixels predicted anomalous / normal pixels, pooled over all images;
///   PRO(t) = the mean over all regions of all images of |region ∩ predicted| / |region|;
/// - the curve runs from (0, 0) through the thresholds, highest first, to (1, 1); it is
///   integrated with the trapezoid rule from FPR 0 to `max_fpr`, the point at `max_fpr`
///   linearly interpolated between its neighbours, and the area divided by `max_fpr`.
///
/// anomalib's `AUPRO` computes the same curve but resamples each region's ROC curve onto a
/// common grid before averaging, so it can differ from this exact value in the last digits.
///
/// `maps[i]` is the anomaly map of image `i`, `masks[i]` its ground truth (`true` = anomalous
/// pixel), of the same shape. Images without anomalous pixels count in the FPR only. Memory:
/// 16 bytes a pixel while it runs.
///
/// Errors: [`Error::InvalidArgument`] when the counts differ, `max_fpr` is not in (0, 1], or
/// the masks have no anomalous region or no normal pixel; [`Error::InvalidShape`] naming the
/// image whose mask and map differ in shape; [`Error::NonFinite`] naming the image and pixel of
/// a NaN or infinite map value.
///
/// ```
/// use ndarray::array;
/// use msad::metrics::{DEFAULT_MAX_FPR, pro_auc};
///
/// # fn main() -> msad::Result<()> {
/// let map = array![[0.9f32, 0.1, 0.2], [0.3, 0.0, 0.8]];
/// let mask = array![[true, false, false], [false, false, true]];
/// // Two regions, each found before any normal pixel: perfect.
/// let value = pro_auc(&[map.view()], &[mask.view()], DEFAULT_MAX_FPR)?;
/// assert!((value - 1.0).abs() < 1e-12);
/// # Ok(())
/// # }
/// ```
pub fn pro_auc(
    maps: &[ArrayView2<'_, f32>],
    masks: &[ArrayView2<'_, bool>],
    max_fpr: f64,
) -> Result<f64> {
    if !(max_fpr > 0.0 && max_fpr <= 1.0) {
        return Err(Error::invalid(
            "max_fpr",
            format!("{max_fpr} is not in (0, 1]"),
        ));
    }
    check(maps, masks)?;
    let curve = pro_curve(maps, masks)?;
    let mut area = 0.0f64;
    for pair in curve.windows(2) {
        let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
        if x0 >= max_fpr {
            break;
        }
        if x1 > max_fpr {
            let y_at = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0);
            area += 0.5 * (y0 + y_at) * (max_fpr - x0);
            break;
        }
        area += 0.5 * (y0 + y1) * (x1 - x0);
    }
    Ok(area / max_fpr)
}

#[cfg(test)]
mod tests {
    use ndarray::{Array2, array};

    use super::*;

    #[test]
    fn regions_are_eight_connected() {
        let mask = array![
            [true, false, false, true],
            [false, true, false, false],
            [false, false, false, true],
        ];
        let mut sizes = Vec::new();
        let labels = label_regions(&mask.view(), &mut sizes);
        assert_eq!(sizes, vec![2, 1, 1]);
        assert_eq!(labels, vec![1, 0, 0, 2, 0, 1, 0, 0, 0, 0, 0, 3]);
        // Numbering continues across images.
        let labels = label_regions(&mask.view(), &mut sizes);
        assert_eq!(labels[0], 4);
        assert_eq!(sizes.len(), 6);
    }

    #[test]
    fn perfect_inverted_and_constant_maps() {
        let mask = array![[false, true, true], [false, false, true]];
        let perfect = mask.mapv(|m| if m { 1.0f32 } else { 0.0 });
        let inverted = perfect.mapv(|v| 1.0 - v);
        let constant = Array2::from_elem((2, 3), 0.5f32);
        let auc = |map: &Array2<f32>| pixel_roc_auc(&[map.view()], &[mask.view()]).unwrap();
        assert_eq!(auc(&perfect), 1.0);
        assert_eq!(auc(&inverted), 0.0);
        assert_eq!(auc(&constant), 0.5);
        let pro = |map: &Array2<f32>, max| pro_auc(&[map.view()], &[mask.view()], max).unwrap();
        assert_eq!(pro(&perfect, 0.3), 1.0);
        assert_eq!(pro(&inverted, 0.3), 0.0);
        // One threshold: (0, 0) → (1, 1), a diagonal: 0.5 over [0, 1], 0.15 / 0.3 below 0.3.
        assert!((pro(&constant, 1.0) - 0.5).abs() < 1e-12);
        assert!((pro(&constant, 0.3) - 0.15).abs() < 1e-12);
    }

    #[test]
    fn regions_count_equally_whatever_their_size() {
        // A region of 4 pixels found, one of 1 pixel missed at every FPR below 1/3.
        let mask = array![[true, true, false, false], [true, true, false, true]];
        let map = array![[5.0f32, 5.0, 2.0, 3.0], [5.0, 5.0, 1.0, 0.0]];
        // Curve: (0, 0.5) after the large region, then (1/3, 0.5), (2/3, 0.5), (1, 0.5),
        // (1, 1). Pixel recall would be 0.8; the region mean is 0.5.
        let value = pro_auc(&[map.view()], &[mask.view()], 0.3).unwrap();
        assert!((value - 0.5).abs() < 1e-12, "{value}");
    }

    #[test]
    fn errors_name_the_image() {
        let map = array![[0.0f32, 1.0]];
        let mask = array![[false, true]];
        let wide = array![[false, true, false]];
        let err = pixel_roc_auc(&[map.view(), map.view()], &[mask.view(), wide.view()]);
        let message = err.unwrap_err().to_string();
        assert!(
            message.contains("image 1") && message.contains("[1, 3]"),
            "{message}"
        );
        let nan = array![[0.0f32, f32::NAN]];
        let message = pro_auc(&[map.view(), nan.view()], &[mask.view(), mask.view()], 0.3)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("anomaly map 1") && message.contains("column 1"),
            "{message}"
        );
        assert!(pixel_roc_auc(&[map.view()], &[]).is_err());
        let normal = array![[false, false]];
        assert!(pixel_roc_auc(&[map.view()], &[normal.view()]).is_err());
        assert!(pro_auc(&[map.view()], &[normal.view()], 0.3).is_err());
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            assert!(
                pro_auc(&[map.view()], &[mask.view()], bad).is_err(),
                "{bad}"
            );
        }
    }
}
