//! The report's charts, drawn with plotters' SVG backend into strings: the ROC curve and the
//! histograms of normalised scores.
//!
//! Without plotters' `ttf` feature, text is laid out with a crude width estimate and written as
//! plain SVG `<text>` elements that the browser sets in its own sans-serif font: no font is
//! read at build or run time.

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::{Error, Result};

/// Size in pixels of each chart's SVG canvas (the page scales it to its column).
pub(super) const CHART_SIZE: (u32, u32) = (560, 400);

const FONT: &str = "sans-serif";
const INK: RGBColor = RGBColor(45, 55, 72);
const GRID: RGBColor = RGBColor(226, 232, 240);
/// Normal images (blue).
pub(super) const NORMAL_COLOR: RGBColor = RGBColor(49, 130, 206);
/// Anomalous images (red).
pub(super) const ANOMALOUS_COLOR: RGBColor = RGBColor(229, 62, 62);
/// Unlabeled images (grey).
pub(super) const UNLABELED_COLOR: RGBColor = RGBColor(113, 128, 150);

/// A drawing error as an [`Error::InvalidArgument`] naming the chart (drawing into a string
/// does not fail in practice; this keeps the library free of panics if it ever does).
fn drawing_error(chart: &'static str) -> impl Fn(DrawingAreaErrorKind<std::io::Error>) -> Error {
    move |e| Error::invalid(chart, format!("plotters could not draw it: {e}"))
}

/// Draws with `draw` onto a white SVG canvas of [`CHART_SIZE`] and returns the `<svg>` element,
/// tagged for the page (`class="chart-svg"`, `role="img"`, `aria-label`).
fn render(
    label: &str,
    chart: &'static str,
    draw: impl FnOnce(
        &DrawingArea<SVGBackend<'_>, Shift>,
    ) -> Result<(), DrawingAreaErrorKind<std::io::Error>>,
) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, CHART_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(drawing_error(chart))?;
        draw(&root).map_err(drawing_error(chart))?;
        root.present().map_err(drawing_error(chart))?;
    }
    let attributes = format!(
        "<svg class=\"chart-svg\" role=\"img\" aria-label=\"{}\" ",
        super::escape(label)
    );
    Ok(svg.replacen("<svg ", &attributes, 1))
}

/// The ROC curve of `points` ([`crate::metrics::roc_curve`]) as an SVG element, with `auc` in its title.
pub(super) fn roc_svg(points: &[(f64, f64)], auc: f64) -> Result<String> {
    let title = format!("ROC curve (ROC-AUC {auc:.3})");
    let label = title.clone();
    render(&label, "the ROC chart", move |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 22).into_font().color(&INK))
            .margin(16)
            .x_label_area_size(54)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0f64..1.0f64, 0.0f64..1.0f64)?;
        chart
            .configure_mesh()
            .x_desc("false positive rate")
            .y_desc("true positive rate")
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&|v| format!("{v:.1}"))
            .y_label_formatter(&|v| format!("{v:.1}"))
            .label_style((FONT, 16).into_font().color(&INK))
            .axis_desc_style((FONT, 16).into_font().color(&INK))
            .axis_style(INK)
            .bold_line_style(GRID)
            .light_line_style(WHITE)
            .draw()?;
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, 0.0), (1.0, 1.0)],
                6,
                5,
                UNLABELED_COLOR.stroke_width(1),
            ))?
            .label("chance")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], UNLABELED_COLOR));
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                NORMAL_COLOR.stroke_width(3),
            ))?
            .label(format!("ROC (AUC {auc:.3})"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], NORMAL_COLOR.stroke_width(3)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 16).into_font().color(&INK))
            .background_style(WHITE.mix(0.9))
            .border_style(GRID)
            .draw()?;
        Ok(())
    })
}

/// `color` as CSS `rgba(…)` at `alpha`, for legends drawn in HTML.
pub(super) fn css_color(color: RGBColor, alpha: f64) -> String {
    format!("rgba({},{},{},{alpha})", color.0, color.1, color.2)
}

/// One histogram series: a name for the legend, its colour, its (finite) values.
pub(super) struct Series<'a> {
    /// Legend text.
    pub name: &'a str,
    /// Bar colour (drawn half transparent, so that series overlap visibly).
    pub color: RGBColor,
    /// Finite normalised scores.
    pub values: Vec<f32>,
}

/// A histogram axis label: one decimal, or scientific notation for far-out scores.
fn axis_number(v: f64) -> String {
    if v.abs() >= 1e4 {
        format!("{v:.1e}")
    } else {
        format!("{v:.1}")
    }
}

/// Bin width in normalised-score units: 20 bins over [0, 1], the threshold on an edge.
const BIN: f64 = 0.05;
/// At most this many bins, however far the scores spread.
const MAX_BINS: usize = 200;

/// The bins' range `[lo, hi)` and count: [0, 1] widened to whole bins covering every value.
fn bin_layout(series: &[Series<'_>]) -> (f64, f64, usize) {
    let (min, max) = series
        .iter()
        .flat_map(|s| s.values.iter())
        .fold((0.0f64, 1.0f64), |(lo, hi), &v| {
            (lo.min(f64::from(v)), hi.max(f64::from(v)))
        });
    let lo = (min / BIN).floor() * BIN;
    let hi = (max / BIN).ceil() * BIN;
    let bins = (((hi - lo) / BIN).round() as usize).clamp(1, MAX_BINS);
    (lo, hi, bins)
}

/// How many of `values` fall in each of `bins` equal bins over `[lo, hi]` (the last bin closed).
fn counts(values: &[f32], lo: f64, hi: f64, bins: usize) -> Vec<u32> {
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0u32; bins];
    for &v in values {
        let index = ((f64::from(v) - lo) / width).floor();
        let index = if index.is_finite() && index > 0.0 {
            (index as usize).min(bins - 1)
        } else {
            0
        };
        counts[index] += 1;
    }
    counts
}

/// Overlaid histograms of `series` (fills at 45 % opacity, outlines on top) with a dashed
/// vertical line at `threshold`. The legend is left to the page ([`css_color`]), where it
/// cannot cover a bar.
pub(super) fn histogram_svg(series: &[Series<'_>], threshold: f32) -> Result<String> {
    let (lo, hi, bins) = bin_layout(series);
    let width = (hi - lo) / bins as f64;
    let binned: Vec<Vec<u32>> = series
        .iter()
        .map(|s| counts(&s.values, lo, hi, bins))
        .collect();
    let peak = binned.iter().flatten().copied().max().unwrap_or(0).max(1);
    let top = peak + (peak / 8).max(1);
    let threshold = f64::from(threshold);
    render(
        "Histogram of normalised scores",
        "the score histogram",
        move |root| {
            let mut chart = ChartBuilder::on(root)
                .caption("Normalised scores", (FONT, 22).into_font().color(&INK))
                .margin(16)
                .x_label_area_size(54)
                .y_label_area_size(64)
                .build_cartesian_2d(lo..hi, 0u32..top)?;
            chart
                .configure_mesh()
                .x_desc("normalised score")
                .y_desc("images")
                .x_labels(11)
                .y_labels(6)
                .x_label_formatter(&|v| axis_number(*v))
                .label_style((FONT, 16).into_font().color(&INK))
                .axis_desc_style((FONT, 16).into_font().color(&INK))
                .axis_style(INK)
                .bold_line_style(GRID)
                .light_line_style(WHITE)
                .disable_x_mesh()
                .draw()?;
            for (s, counts) in series.iter().zip(&binned) {
                let color = s.color;
                chart.draw_series(counts.iter().enumerate().filter(|(_, c)| **c > 0).map(
                    |(i, &c)| {
                        let x0 = lo + i as f64 * width;
                        Rectangle::new([(x0, 0), (x0 + width, c)], color.mix(0.45).filled())
                    },
                ))?;
                // Outlines on top of the fills keep overlapping bars readable.
                chart.draw_series(counts.iter().enumerate().filter(|(_, c)| **c > 0).map(
                    |(i, &c)| {
                        let x0 = lo + i as f64 * width;
                        Rectangle::new([(x0, 0), (x0 + width, c)], color.stroke_width(1))
                    },
                ))?;
            }
            chart.draw_series(DashedLineSeries::new(
                [(threshold, 0), (threshold, top)],
                8,
                5,
                INK.stroke_width(2),
            ))?;
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_cover_every_value() {
        let series = [Series {
            name: "n",
            color: NORMAL_COLOR,
            values: vec![0.0, 0.5, 0.999, 1.0],
        }];
        let (lo, hi, bins) = bin_layout(&series);
        assert_eq!((lo, hi, bins), (0.0, 1.0, 20));
        let c = counts(&series[0].values, lo, hi, bins);
        assert_eq!((c[0], c[10], c[19]), (1, 1, 2));
        assert_eq!(c.iter().sum::<u32>(), 4);
        // Out-of-range scores widen the axis by whole bins.
        let wide = [Series {
            name: "w",
            color: NORMAL_COLOR,
            values: vec![-0.12, 1.31],
        }];
        let (lo, hi, bins) = bin_layout(&wide);
        assert!((lo + 0.15).abs() < 1e-9 && (hi - 1.35).abs() < 1e-9 && bins == 30);
        // Huge spreads are capped.
        let huge = [Series {
            name: "h",
            color: NORMAL_COLOR,
            values: vec![-3e38, 3e38],
        }];
        let (lo, hi, bins) = bin_layout(&huge);
        assert_eq!(bins, MAX_BINS);
        assert_eq!(counts(&huge[0].values, lo, hi, bins).iter().sum::<u32>(), 2);
        assert_eq!(
            (axis_number(0.5), axis_number(-3e38)),
            ("0.5".into(), "-3.0e38".into())
        );
        assert!(histogram_svg(&huge, 0.5).unwrap().contains("3.0e38"));
    }

    #[test]
    fn charts_are_svg_with_text() {
        let svg = roc_svg(&[(0.0, 0.0), (0.0, 1.0), (1.0, 1.0)], 1.0).unwrap();
        assert!(
            svg.starts_with("<svg class=\"chart-svg\""),
            "{}",
            &svg[..80]
        );
        assert!(svg.contains("ROC-AUC 1.000") && svg.contains("<text"));
        assert!(svg.trim_end().ends_with("</svg>"));
        let series = [
            Series {
                name: "normal",
                color: NORMAL_COLOR,
                values: vec![0.1, 0.2, 0.2],
            },
            Series {
                name: "anomalous",
                color: ANOMALOUS_COLOR,
                values: vec![0.8],
            },
        ];
        let svg = histogram_svg(&series, 0.5).unwrap();
        assert!(svg.contains("<rect") && svg.contains("Normalised scores"));
        assert_eq!(css_color(NORMAL_COLOR, 0.5), "rgba(49,130,206,0.5)");
    }
}
