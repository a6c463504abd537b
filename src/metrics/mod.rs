//! Detection metrics over anomaly scores, equal to scikit-learn's, and segmentation metrics
//! over anomaly maps ([`pixel_roc_auc`], [`pro_auc`]).
//!
//! Labels are `true` for anomalies (the positive class) and higher scores mean "more
//! anomalous", as in the one-class protocol of the paper.
//!
//! ```
//! # fn main() -> msad::Result<()> {
//! let scores = [0.1, 0.4, 0.35, 0.8];
//! let labels = [false, false, true, true];
//! assert_eq!(msad::metrics::roc_auc(&scores, &labels)?, 0.75);
//! let ap = msad::metrics::average_precision(&scores, &labels)?;
//! assert!((ap - 0.8333333333333333).abs() < 1e-12);
//! # Ok(())
//! # }
//! ```

use crate::{Error, Result};

mod pixel;

pub use pixel::{DEFAULT_MAX_FPR, pixel_roc_auc, pro_auc};

fn check(scores: &[f32], labels: &[bool]) -> Result<()> {
    if scores.len() != labels.len() {
        return Err(Error::invalid(
            "scores and labels",
            format!("{} scores but {} labels", scores.len(), labels.len()),
        ));
    }
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        return Err(Error::invalid("scores", format!("score {i} is NaN")));
    }
    Ok(())
}

/// Indices sorting `scores` ascending (NaN-free input).
fn ascending(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_unstable_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    order
}

/// Area under the ROC curve, as `sklearn.metrics.roc_auc_score(labels, scores)`: tied scores
/// count one half (average ranks).
///
/// An error when the lengths differ, a score is NaN, or only one class is present.
pub fn roc_auc(scores: &[f32], labels: &[bool]) -> Result<f64> {
    check(scores, labels)?;
    let positives = labels.iter().filter(|l| **l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return Err(Error::invalid(
            "labels",
            format!("ROC-AUC needs both classes; got {positives} anomalous and {negatives} normal"),
        ));
    }
    // Mann-Whitney U with average ranks for ties: AUC = (R₊ − n₊(n₊+1)/2) / (n₊ n₋).
    let order = ascending(scores);
    let mut rank_sum = 0.0f64;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        // 1-based ranks i+1 ..= j+1, averaged.
        let average_rank = (i + j + 2) as f64 / 2.0;
        let tied_positives = order[i..=j].iter().filter(|&&k| labels[k]).count();
        rank_sum += average_rank * tied_positives as f64;
        i = j + 1;
    }
    let (p, n) = (positives as f64, negatives as f64);
    Ok((rank_sum - p * (p + 1.0) / 2.0) / (p * n))
}

/// The ROC curve's points `(false positive rate, true positive rate)`: `(0, 0)`, then one point
/// per distinct score from the highest down, tied scores grouped into one step (scikit-learn's
/// `roc_curve(labels, scores, drop_intermediate=False)` less its leading `inf` threshold).
///
/// An error when the lengths differ, a score is NaN, or only one class is present.
///
/// ```
/// let points = msad::metrics::roc_curve(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true])?;
/// assert_eq!(points, [(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]);
/// # Ok::<(), msad::Error>(())
/// ```
pub fn roc_curve(scores: &[f32], labels: &[bool]) -> Result<Vec<(f64, f64)>> {
    check(scores, labels)?;
    let positives = labels.iter().filter(|l| **l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return Err(Error::invalid(
            "labels",
            format!(
                "a ROC curve needs both classes; got {positives} anomalous and {negatives} normal"
            ),
        ));
    }
    let rates = cumulative_counts(scores, labels)
        .into_iter()
        .map(|(tp, fp)| (fp as f64 / negatives as f64, tp as f64 / positives as f64));
    Ok(std::iter::once((0.0, 0.0)).chain(rates).collect())
}

/// (true positives, false positives) above each distinct score, from the highest score down:
/// one entry per threshold, ties counted together.
fn cumulative_counts(scores: &[f32], labels: &[bool]) -> Vec<(usize, usize)> {
    let mut order = ascending(scores);
    order.reverse();
    let mut counts = Vec::new();
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut i = 0;
    while i < order.len() {
        let threshold = scores[order[i]];
        while i < order.len() && scores[order[i]] == threshold {
            if labels[order[i]] {
                tp += 1;
            } else {
                fp += 1;
            }
            i += 1;
        }
        counts.push((tp, fp));
    }
    counts
}

/// Average precision, as `sklearn.metrics.average_precision_score(labels, scores)`:
/// Σ (Rₙ − Rₙ₋₁) Pₙ over the distinct score thresholds, highest first.
///
/// An error when the lengths differ, a score is NaN, or there is no anomaly (recall is then
/// undefined). With anomalies only it is 1, as in scikit-learn.
pub fn average_precision(scores: &[f32], labels: &[bool]) -> Result<f64> {
    check(scores, labels)?;
    let positives = labels.iter().filter(|l| **l).count();
    if positives == 0 {
        return Err(Error::invalid(
            "labels",
            "average precision needs at least one anomalous (true) label",
        ));
    }
    let (mut ap, mut prev_recall) = (0.0f64, 0.0f64);
    for (tp, fp) in cumulative_counts(scores, labels) {
        let recall = tp as f64 / positives as f64;
        let precision = tp as f64 / (tp + fp) as f64;
        ap += (recall - prev_recall) * precision;
        prev_recall = recall;
    }
    Ok(ap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roc_curve_groups_ties_and_its_area_is_roc_auc() {
        // Ties form one diagonal step: sklearn's roc_curve([1, 0, 0], [0.5, 0.5, 0.2]).
        let points = roc_curve(&[0.5, 0.5, 0.2], &[true, false, false]).unwrap();
        assert_eq!(points, [(0.0, 0.0), (0.5, 1.0), (1.0, 1.0)]);
        assert!(roc_curve(&[0.1, 0.2], &[true, true]).is_err());
        assert!(roc_curve(&[0.1], &[true, false]).is_err());
        assert!(roc_curve(&[f32::NAN, 0.2], &[true, false]).is_err());
        let scores = [0.3, 0.9, 0.3, 0.1, 0.7, 0.7, 0.5, 0.2, 0.3, 0.8];
        let labels = [
            false, true, true, false, false, true, false, false, true, true,
        ];
        let points = roc_curve(&scores, &labels).unwrap();
        let area: f64 = points
            .windows(2)
            .map(|w| (w[1].0 - w[0].0) * (w[1].1 + w[0].1) / 2.0)
            .sum();
        let auc = roc_auc(&scores, &labels).unwrap();
        assert!((area - auc).abs() < 1e-12, "{area} vs {auc}");
    }

    #[test]
    fn perfect_and_reversed_rankings() {
        let labels = [false, false, true, true];
        assert_eq!(roc_auc(&[0.0, 1.0, 2.0, 3.0], &labels).unwrap(), 1.0);
        assert_eq!(roc_auc(&[3.0, 2.0, 1.0, 0.0], &labels).unwrap(), 0.0);
        assert_eq!(
            average_precision(&[0.0, 1.0, 2.0, 3.0], &labels).unwrap(),
            1.0
        );
    }

    #[test]
    fn all_tied_scores_give_one_half() {
        assert_eq!(
            roc_auc(&[1.0; 6], &[true, false, true, false, false, true]).unwrap(),
            0.5
        );
        assert_eq!(
            average_precision(&[1.0; 4], &[true, false, false, false]).unwrap(),
            0.25
        );
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(
            roc_auc(&[1.0, 2.0], &[true])
                .unwrap_err()
                .to_string()
                .contains("1 labels")
        );
        assert!(roc_auc(&[1.0, 2.0], &[true, true]).is_err());
        assert!(
            roc_auc(&[f32::NAN, 2.0], &[true, false])
                .unwrap_err()
                .to_string()
                .contains("NaN")
        );
        assert!(average_precision(&[1.0, 2.0], &[false, false]).is_err());
        assert_eq!(average_precision(&[1.0, 2.0], &[true, true]).unwrap(), 1.0);
    }
}
