//! A self-contained HTML report of an anomaly-detection run: one file that opens in any browser
//! with no network access (inline CSS, inline SVG charts, images as embedded PNGs, no scripts).
//!
//! A [`Report`] is plain data that other code fills: every scored image ([`ReportEntry`]),
//! headline figures (ROC-AUC, ...), and a few [`FeaturedImage`]s shown large with their
//! [`AnomalyHeatmap`] and their nearest normal training images. The page holds
//!
//! - a header with the title, the description and the figures;
//! - the ROC curve (when labels of both classes exist) and the histograms of normalised scores
//!   by ground truth, with the threshold;
//! - a card per featured image: the image, its anomaly map blended on it (colour scale fixed:
//!   0 cold, the threshold 0.5 in the middle, 1 and above hot), scores, decision, ground truth,
//!   neighbours;
//! - a table of every entry by normalised score, highest first (at most [`MAX_TABLE_ROWS`]).
//!
//! Scores follow [`Detector`](crate::Detector)'s convention: the normalised score maps the
//! threshold to [`THRESHOLD`] (0.5) and an image is anomalous when it is above it; the raw
//! score is shown beside it. Every user string is HTML-escaped. NaN (or infinite) scores are
//! listed in the table as such and left out of the charts, with a note saying how many.
//!
//! ```
//! use image::{Rgb, RgbImage};
//! use msad::report::{AnomalyHeatmap, FeaturedImage, Report, ReportEntry};
//!
//! # fn main() -> msad::Result<()> {
//! let image = RgbImage::from_pixel(8, 8, Rgb([90, 90, 90]));
//! let map = AnomalyHeatmap::new(8, 8, vec![0.2; 64])?;
//! let report = Report::new("bottle: test set")
//!     .with_description("ResNet-18, 10 epochs of MSC fine-tuning.")
//!     .with_raw_threshold(4.2)
//!     .with_figure("image ROC-AUC", "0.981")
//!     .with_entry(ReportEntry::new("good/000.png", 0.31, 2.9).with_label(false))
//!     .with_entry(ReportEntry::new("broken/003.png", 0.87, 9.6).with_label(true))
//!     .with_featured(
//!         FeaturedImage::new("broken/003.png", image.clone(), 0.87, 9.6, true)
//!             .with_label(true)
//!             .with_heatmap(map)
//!             .with_neighbor("train/good/017.png", image),
//!     );
//! let html = report.to_html()?;
//! assert!(html.contains("bottle: test set") && html.contains("data:image/png;base64,"));
//! let dir = tempfile::tempdir().unwrap();
//! report.write(dir.path().join("report.html"))?;
//! # Ok(())
//! # }
//! ```

mod charts;
mod embed;
mod heatmap;
mod html;

use std::io::Write as _;
use std::path::Path;

use image::RgbImage;

pub use heatmap::AnomalyHeatmap;

use crate::{Error, Result};

/// The decision threshold in normalised-score units: an image whose normalised score is above
/// it is anomalous ([`Calibration::normalize`](crate::Calibration::normalize) maps the raw
/// threshold here).
///
/// ```
/// assert_eq!(msad::report::THRESHOLD, 0.5);
/// ```
pub const THRESHOLD: f32 = 0.5;

/// The table of entries lists at most this many (the highest scores); a note says how many
/// more were left out.
///
/// ```
/// assert_eq!(msad::report::MAX_TABLE_ROWS, 500);
/// ```
pub const MAX_TABLE_ROWS: usize = 500;

/// An HTML report of a scored image set; see the [module docs](self).
///
/// Build it with [`Report::new`] and the `with_*` methods (or fill the public fields), then
/// [`Report::to_html`] or [`Report::write`].
///
/// ```
/// use msad::report::{Report, ReportEntry};
///
/// let report = Report::new("digits: 8 vs rest")
///     .with_entries([
///         ReportEntry::new("0", 0.2, 1.1).with_label(false),
///         ReportEntry::new("1", 0.9, 6.0).with_label(true),
///     ]);
/// assert_eq!(report.entries.len(), 2);
/// assert!(report.to_html()?.contains("ROC-AUC 1.000"));
/// # Ok::<(), msad::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The page's title (and `<title>`).
    pub title: String,
    /// A paragraph under the title; blank lines separate paragraphs.
    pub description: Option<String>,
    /// The detector's raw-score threshold, shown beside the normalised one ([`THRESHOLD`]).
    pub raw_threshold: Option<f32>,
    /// Every scored image.
    pub entries: Vec<ReportEntry>,
    /// Headline figures `(name, value)`, shown in the header in this order (e.g.
    /// `("image ROC-AUC", "0.981")`).
    pub figures: Vec<(String, String)>,
    /// Images shown large, in this order.
    pub featured: Vec<FeaturedImage>,
}

impl Report {
    /// An empty report titled `title`.
    ///
    /// ```
    /// let report = msad::report::Report::new("screws, lot 42");
    /// assert_eq!(report.title, "screws, lot 42");
    /// assert!(report.entries.is_empty());
    /// ```
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            ..Self::default()
        }
    }

    /// With a description under the title (blank lines separate paragraphs).
    ///
    /// ```
    /// let report = msad::report::Report::new("t").with_description("ResNet-18 at 224 px.");
    /// assert_eq!(report.description.as_deref(), Some("ResNet-18 at 224 px."));
    /// ```
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// With the detector's raw-score threshold, for display.
    ///
    /// ```
    /// let report = msad::report::Report::new("t").with_raw_threshold(4.25);
    /// assert_eq!(report.raw_threshold, Some(4.25));
    /// ```
    pub fn with_raw_threshold(mut self, raw: f32) -> Self {
        self.raw_threshold = Some(raw);
        self
    }

    /// With one more scored image.
    ///
    /// ```
    /// use msad::report::{Report, ReportEntry};
    ///
    /// let report = Report::new("t").with_entry(ReportEntry::new("a.png", 0.7, 5.0));
    /// assert_eq!(report.entries[0].name, "a.png");
    /// ```
    pub fn with_entry(mut self, entry: ReportEntry) -> Self {
        self.entries.push(entry);
        self
    }

    /// With more scored images.
    ///
    /// ```
    /// use msad::report::{Report, ReportEntry};
    ///
    /// let scores = [0.1f32, 0.4, 0.9];
    /// let report = Report::new("t").with_entries(
    ///     scores.iter().enumerate().map(|(i, &s)| ReportEntry::new(i.to_string(), s, s * 10.0)),
    /// );
    /// assert_eq!(report.entries.len(), 3);
    /// ```
    pub fn with_entries(mut self, entries: impl IntoIterator<Item = ReportEntry>) -> Self {
        self.entries.extend(entries);
        self
    }

    /// With a headline figure, e.g. `("image ROC-AUC", "0.981")`.
    ///
    /// ```
    /// let report = msad::report::Report::new("t").with_figure("image ROC-AUC", "0.981");
    /// assert_eq!(report.figures, [("image ROC-AUC".to_string(), "0.981".to_string())]);
    /// ```
    pub fn with_figure(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.figures.push((name.into(), value.into()));
        self
    }

    /// With one more featured image.
    ///
    /// ```
    /// use image::RgbImage;
    /// use msad::report::{FeaturedImage, Report};
    ///
    /// let image = RgbImage::new(4, 4);
    /// let report = Report::new("t").with_featured(FeaturedImage::new("a", image, 0.9, 7.0, true));
    /// assert_eq!(report.featured.len(), 1);
    /// ```
    pub fn with_featured(mut self, image: FeaturedImage) -> Self {
        self.featured.push(image);
        self
    }

    /// The report as one self-contained HTML document.
    ///
    /// Errors: [`Error::InvalidShape`] naming the image when a featured image's heatmap does
    /// not have the image's size (or holds the wrong number of values).
    ///
    /// ```
    /// use msad::report::{Report, ReportEntry};
    ///
    /// let html = Report::new("<b>odd</b> title")
    ///     .with_entry(ReportEntry::new("x", f32::NAN, f32::NAN))
    ///     .to_html()?;
    /// assert!(html.starts_with("<!DOCTYPE html>"));
    /// assert!(html.contains("&lt;b&gt;odd&lt;/b&gt; title") && !html.contains("<b>odd"));
    /// assert!(html.contains("NaN"));
    /// # Ok::<(), msad::Error>(())
    /// ```
    pub fn to_html(&self) -> Result<String> {
        html::render(self)
    }

    /// Writes [`Report::to_html`] to `path`: into a temporary file in the same directory, then
    /// renamed over `path`, so that a reader never sees half a report.
    ///
    /// Errors: those of [`Report::to_html`] (nothing is written then), and [`Error::Io`] naming
    /// `path` when the directory cannot be written or the rename fails.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("report.html");
    /// msad::report::Report::new("empty").write(&path)?;
    /// assert!(std::fs::read_to_string(&path).unwrap().contains("empty"));
    /// # Ok::<(), msad::Error>(())
    /// ```
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let html = self.to_html()?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let io = |e: std::io::Error| Error::io(path, e);
        let mut builder = tempfile::Builder::new();
        builder.prefix(".msad-report-").suffix(".tmp");
        // A report is for reading: the usual file mode (less the umask), not tempfile's 0600.
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
        let mut file = builder.tempfile_in(dir).map_err(io)?;
        file.write_all(html.as_bytes()).map_err(io)?;
        file.as_file().sync_all().map_err(io)?;
        file.persist(path).map_err(|e| io(e.error))?;
        Ok(())
    }
}

/// One scored image of a [`Report`].
///
/// ```
/// use msad::report::ReportEntry;
///
/// let entry = ReportEntry::new("screw/042.png", 0.73, 8.1).with_label(true);
/// assert_eq!(entry.anomalous(), Some(true));
/// assert_eq!(ReportEntry::new("x", f32::NAN, 0.0).anomalous(), None);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ReportEntry {
    /// The image's name (a path, an index).
    pub name: String,
    /// The normalised score: [`THRESHOLD`] (0.5) is the decision threshold.
    pub normalized: f32,
    /// The raw score (larger = more anomalous).
    pub raw: f32,
    /// The ground truth when known: `true` for an anomaly.
    pub label: Option<bool>,
}

impl ReportEntry {
    /// An unlabeled entry.
    ///
    /// ```
    /// let entry = msad::report::ReportEntry::new("a.png", 0.2, 1.5);
    /// assert_eq!((entry.normalized, entry.raw, entry.label), (0.2, 1.5, None));
    /// ```
    pub fn new(name: impl Into<String>, normalized: f32, raw: f32) -> Self {
        Self {
            name: name.into(),
            normalized,
            raw,
            label: None,
        }
    }

    /// With its ground truth: `true` for an anomaly.
    ///
    /// ```
    /// let entry = msad::report::ReportEntry::new("a.png", 0.2, 1.5).with_label(false);
    /// assert_eq!(entry.label, Some(false));
    /// ```
    pub fn with_label(mut self, anomalous: bool) -> Self {
        self.label = Some(anomalous);
        self
    }

    /// The decision: whether the normalised score is above [`THRESHOLD`]; `None` when it is
    /// NaN.
    ///
    /// ```
    /// use msad::report::ReportEntry;
    ///
    /// assert_eq!(ReportEntry::new("a", 0.5, 4.0).anomalous(), Some(false)); // strict
    /// assert_eq!(ReportEntry::new("b", 0.51, 4.1).anomalous(), Some(true));
    /// ```
    pub fn anomalous(&self) -> Option<bool> {
        (!self.normalized.is_nan()).then_some(self.normalized > THRESHOLD)
    }
}

/// An image shown large in a [`Report`]: the image, its anomaly map overlaid, its scores,
/// decision and ground truth, and its nearest normal training images.
///
/// ```
/// use image::RgbImage;
/// use msad::report::{AnomalyHeatmap, FeaturedImage};
///
/// let image = RgbImage::new(2, 2);
/// let featured = FeaturedImage::new("a.png", image.clone(), 0.8, 6.5, true)
///     .with_label(true)
///     .with_heatmap(AnomalyHeatmap::new(2, 2, vec![0.1, 0.2, 0.9, 1.3])?)
///     .with_neighbor("train/7.png", image);
/// assert_eq!(featured.neighbors.len(), 1);
/// assert_eq!(featured.overlay()?.unwrap().dimensions(), (2, 2));
/// # Ok::<(), msad::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct FeaturedImage {
    /// The image's name.
    pub name: String,
    /// The image as scored (any size; shown downscaled to at most 512 px).
    pub image: RgbImage,
    /// The normalised score ([`THRESHOLD`] is the decision threshold).
    pub normalized: f32,
    /// The raw score.
    pub raw: f32,
    /// The detector's decision.
    pub anomalous: bool,
    /// The ground truth when known: `true` for an anomaly.
    pub label: Option<bool>,
    /// The anomaly map, of the image's size, in normalised-score units.
    pub map: Option<AnomalyHeatmap>,
    /// The nearest normal training images `(name, image)`, nearest first.
    pub neighbors: Vec<(String, RgbImage)>,
}

impl FeaturedImage {
    /// A featured image with its scores and decision, no label, map or neighbours.
    ///
    /// ```
    /// let f = msad::report::FeaturedImage::new("a", image::RgbImage::new(1, 1), 0.3, 2.0, false);
    /// assert!(!f.anomalous && f.map.is_none());
    /// ```
    pub fn new(
        name: impl Into<String>,
        image: RgbImage,
        normalized: f32,
        raw: f32,
        anomalous: bool,
    ) -> Self {
        Self {
            name: name.into(),
            image,
            normalized,
            raw,
            anomalous,
            label: None,
            map: None,
            neighbors: Vec::new(),
        }
    }

    /// With its ground truth: `true` for an anomaly.
    ///
    /// ```
    /// let f = msad::report::FeaturedImage::new("a", image::RgbImage::new(1, 1), 0.3, 2.0, false)
    ///     .with_label(true);
    /// assert_eq!(f.label, Some(true));
    /// ```
    pub fn with_label(mut self, anomalous: bool) -> Self {
        self.label = Some(anomalous);
        self
    }

    /// With its anomaly map (checked against the image's size when rendered).
    ///
    /// ```
    /// use msad::report::{AnomalyHeatmap, FeaturedImage};
    ///
    /// let map = AnomalyHeatmap::new(1, 1, vec![0.9])?;
    /// let f = FeaturedImage::new("a", image::RgbImage::new(1, 1), 0.9, 7.0, true).with_heatmap(map);
    /// assert!(f.map.is_some());
    /// # Ok::<(), msad::Error>(())
    /// ```
    pub fn with_heatmap(mut self, map: AnomalyHeatmap) -> Self {
        self.map = Some(map);
        self
    }

    /// With one more nearest normal training image (add them nearest first).
    ///
    /// ```
    /// let f = msad::report::FeaturedImage::new("a", image::RgbImage::new(1, 1), 0.3, 2.0, false)
    ///     .with_neighbor("train/1.png", image::RgbImage::new(1, 1));
    /// assert_eq!(f.neighbors[0].0, "train/1.png");
    /// ```
    pub fn with_neighbor(mut self, name: impl Into<String>, image: RgbImage) -> Self {
        self.neighbors.push((name.into(), image));
        self
    }

    /// The image with its anomaly map blended on at 50 % in the report's colour scale
    /// ([`AnomalyHeatmap::color`]); `None` without a map.
    ///
    /// Errors: [`Error::InvalidShape`] naming the image when the map's size differs from the
    /// image's or its `values` has the wrong length.
    ///
    /// ```
    /// use msad::report::{AnomalyHeatmap, FeaturedImage};
    ///
    /// let f = FeaturedImage::new("a.png", image::RgbImage::new(2, 2), 0.9, 7.0, true)
    ///     .with_heatmap(AnomalyHeatmap::new(3, 1, vec![0.0; 3])?);
    /// assert!(f.overlay().unwrap_err().to_string().contains("a.png"));
    /// # Ok::<(), msad::Error>(())
    /// ```
    pub fn overlay(&self) -> Result<Option<RgbImage>> {
        self.map
            .as_ref()
            .map(|map| map.overlay(&self.image, &self.name))
            .transpose()
    }
}

/// `text` with `&`, `<`, `>`, `"` and `'` replaced by entities: safe in element content and in
/// quoted attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
