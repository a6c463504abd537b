//! A detector's HTML report of a scored set ([`crate::report`] renders it).

use super::{Detector, indices_to_vec};
use crate::data::ImageSource;
use crate::metrics::{average_precision, roc_auc};
use crate::report::{AnomalyHeatmap, FeaturedImage, Report, ReportEntry};
use crate::{Error, Result};

impl Detector {
    /// The `k` nearest normal training images of `image`, nearest first, as (index in the
    /// bank, i.e. in the source the detector was fitted on; squared distance).
    ///
    /// Errors: those of [`Detector::score_image`].
    pub fn nearest_normal(&self, image: &image::RgbImage) -> Result<Vec<(usize, f32)>> {
        let (distances, indices) = self.knn.neighbours(self.embed_image(image)?)?;
        let distances = crate::host::vec_from_tensor(distances)?;
        let indices = indices_to_vec(indices)?;
        Ok(indices
            .into_iter()
            .zip(distances)
            .map(|(i, d)| (i as usize, d))
            .collect())
    }

    /// A report of every image of `scored`: the scores (streamed, [`Detector::score_each`];
    /// unreadable images are counted and named in the description), the ROC curve and
    /// ROC-AUC / average precision when `labels` (one per image, `true` = anomalous) are
    /// given, and the `featured` highest-scoring images with their anomaly maps (when the
    /// detector has a patch bank) and their nearest normal images from `normal` (the source
    /// the detector was fitted on; `None` leaves them out).
    ///
    /// Errors: a label count that differs from the image count; a `normal` source whose
    /// length is not the bank's (not the source the detector was fitted on); those of the maps
    /// and neighbours of the featured images.
    ///
    /// ```no_run
    /// # fn demo(detector: &msad::Detector, train: &msad::data::ImageFolder, test: &msad::data::ImageFolder) -> msad::Result<()> {
    /// use msad::data::ImageSource;
    /// detector.report("incoming parts", test, None, Some(train as &dyn ImageSource), 8)?.write("report.html")?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn report(
        &self,
        title: &str,
        scored: &dyn ImageSource,
        labels: Option<&[bool]>,
        normal: Option<&dyn ImageSource>,
        featured: usize,
    ) -> Result<Report> {
        if let Some(labels) = labels
            && labels.len() != scored.len()
        {
            return Err(Error::invalid(
                "report labels",
                format!("{} labels for {} images", labels.len(), scored.len()),
            ));
        }
        let rows = self.bank.dims()[0];
        if let Some(normal) = normal
            && normal.len() != rows
        {
            return Err(Error::invalid(
                "report's normal images",
                format!(
                    "{} images, but the detector's bank has {rows}: pass the source it was \
                     fitted on (its neighbours are indices into it), or None",
                    normal.len()
                ),
            ));
        }
        let calibration = *self.require_calibration()?;
        let mut entries = Vec::with_capacity(scored.len());
        let mut unreadable = Vec::new();
        let mut ranked = Vec::new();
        for result in self.score_each(scored) {
            let label = labels.map(|l| l[result.index]);
            match result.outcome {
                Ok(s) => {
                    let mut entry = ReportEntry::new(&result.name, s.normalized, s.raw);
                    if let Some(label) = label {
                        entry = entry.with_label(label);
                    }
                    entries.push(entry);
                    ranked.push((result.index, s.raw));
                }
                Err(e) => unreadable.push(format!("{}: {e}", result.name)),
            }
        }
        let mut report = Report::new(title)
            .with_raw_threshold(calibration.threshold)
            .with_entries(entries.iter().cloned());
        if labels.is_some() {
            let scores: Vec<f32> = entries.iter().map(|e| e.raw).collect();
            let truth: Vec<bool> = entries.iter().map(|e| e.label == Some(true)).collect();
            if truth.iter().any(|&t| t) && truth.iter().any(|&t| !t) {
                report = report
                    .with_figure("image ROC-AUC", format!("{:.3}", roc_auc(&scores, &truth)?))
                    .with_figure(
                        "average precision",
                        format!("{:.3}", average_precision(&scores, &truth)?),
                    );
            }
        }
        let mut description = format!(
            "{} images scored by a ResNet ({} features) with k = {} nearest normal images; the \
             threshold is the {} quantile of the normal images' leave-one-out scores{}.",
            entries.len(),
            self.encoder().feature_dim(),
            self.knn.k(),
            calibration.quantile,
            if self.patch_bank.is_some() {
                "; maps by patch kNN against the normal patches"
            } else {
                ""
            }
        );
        if !unreadable.is_empty() {
            description.push_str(&format!(
                "\n\n{} images could not be scored: {}",
                unreadable.len(),
                unreadable.join("; ")
            ));
        }
        report = report.with_description(description);
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        for &(index, _) in ranked.iter().take(featured) {
            let image = scored.get(index)?;
            // The map carries the score; without a patch bank, score alone.
            let (score, map) = match self.patch_bank {
                Some(_) => {
                    let map = self.anomaly_map(&image)?;
                    (map.score, Some(map))
                }
                None => (self.score_image(&image)?, None),
            };
            let mut card = FeaturedImage::new(
                scored.name(index),
                image.clone(),
                score.normalized,
                score.raw,
                score.anomalous,
            );
            if let Some(label) = labels.map(|l| l[index]) {
                card = card.with_label(label);
            }
            if let Some(map) = map {
                let (h, w) = map.values.dim();
                card = card.with_heatmap(AnomalyHeatmap::new(
                    w as u32,
                    h as u32,
                    map.values.into_iter().collect(),
                )?);
            }
            if let Some(normal) = normal {
                for (i, _) in self.nearest_normal(&image)? {
                    card = card.with_neighbor(normal.name(i), normal.get(i)?);
                }
            }
            report = report.with_featured(card);
        }
        Ok(report)
    }
}
