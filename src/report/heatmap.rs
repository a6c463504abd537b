//! Anomaly maps: the per-pixel data ([`AnomalyHeatmap`]), its fixed colour scale
//! ([`AnomalyHeatmap::color`]) and the overlay drawn onto an image.

use image::{Rgb, RgbImage};

use crate::{Error, Result};

/// A per-pixel anomaly map, in normalised-score units: 0.5 is the decision threshold, larger is
/// more anomalous.
///
/// `values` is row-major (`values[y * width + x]`) and must hold `width × height` values; a map
/// shown over an image must have the image's size. The fields are public; [`AnomalyHeatmap::new`]
/// checks the length, and rendering checks both again.
///
/// ```
/// use msad::report::AnomalyHeatmap;
///
/// let map = AnomalyHeatmap::new(2, 1, vec![0.1, 0.9])?;
/// assert_eq!(map.value(1, 0), Some(0.9));
/// assert_eq!(map.value(2, 0), None);
/// assert!(AnomalyHeatmap::new(2, 2, vec![0.0; 3]).is_err());
/// # Ok::<(), msad::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyHeatmap {
    /// Columns.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// `width × height` values, row-major; larger = more anomalous, 0.5 = the threshold.
    pub values: Vec<f32>,
}

impl AnomalyHeatmap {
    /// A map of `width × height` row-major values.
    ///
    /// Errors: [`Error::InvalidShape`] when `values.len() != width × height`.
    ///
    /// ```
    /// use msad::report::AnomalyHeatmap;
    ///
    /// let map = AnomalyHeatmap::new(3, 2, vec![0.0; 6])?;
    /// assert_eq!((map.width, map.height), (3, 2));
    /// # Ok::<(), msad::Error>(())
    /// ```
    pub fn new(width: u32, height: u32, values: Vec<f32>) -> Result<Self> {
        let map = Self {
            width,
            height,
            values,
        };
        map.check_len("anomaly map")?;
        Ok(map)
    }

    /// The value at column `x`, row `y`; `None` outside the map (or when `values` is short).
    ///
    /// ```
    /// use msad::report::AnomalyHeatmap;
    ///
    /// let map = AnomalyHeatmap::new(2, 2, vec![0.0, 0.25, 0.5, 1.0])?;
    /// assert_eq!(map.value(0, 1), Some(0.5));
    /// # Ok::<(), msad::Error>(())
    /// ```
    pub fn value(&self, x: u32, y: u32) -> Option<f32> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let index = y as usize * self.width as usize + x as usize;
        self.values.get(index).copied()
    }

    /// The report's colour for a normalised anomaly value: Google's Turbo ramp (a perceptual
    /// rainbow), 0 (or less) cold dark blue, the threshold 0.5 in the middle (yellow-green),
    /// 1 (or more) hot dark red. `None` for NaN.
    ///
    /// ```
    /// use msad::report::AnomalyHeatmap;
    ///
    /// let cold = AnomalyHeatmap::color(0.0).unwrap();
    /// let hot = AnomalyHeatmap::color(1.0).unwrap();
    /// assert!(cold[2] > cold[0] && hot[0] > hot[2]); // blue end, red end
    /// assert_eq!(AnomalyHeatmap::color(7.0), Some(hot)); // clamped
    /// assert_eq!(AnomalyHeatmap::color(f32::NAN), None);
    /// ```
    pub fn color(value: f32) -> Option<[u8; 3]> {
        if value.is_nan() {
            return None;
        }
        Some(turbo(value))
    }

    /// [`Error::InvalidShape`] unless `values` holds `width × height` values.
    fn check_len(&self, what: &str) -> Result<()> {
        let expected = self.width as u64 * self.height as u64;
        if self.values.len() as u64 != expected {
            return Err(Error::InvalidShape {
                what: what.to_string(),
                expected: format!(
                    "{expected} values (width {} × height {})",
                    self.width, self.height
                ),
                found: vec![self.values.len()],
            });
        }
        Ok(())
    }

    /// The image with this map blended onto it at 50 % ([`AnomalyHeatmap::color`]; NaN values
    /// leave their pixel as it is). `name` names the image in the errors:
    /// [`Error::InvalidShape`] when the map's size differs from the image's or `values` has the
    /// wrong length.
    pub(crate) fn overlay(&self, image: &RgbImage, name: &str) -> Result<RgbImage> {
        let what = format!("the anomaly map of image `{name}`");
        if (self.width, self.height) != image.dimensions() {
            return Err(Error::InvalidShape {
                what,
                expected: format!(
                    "[{}, {}] (height, width of the image)",
                    image.height(),
                    image.width()
                ),
                found: vec![self.height as usize, self.width as usize],
            });
        }
        self.check_len(&what)?;
        let mut out = image.clone();
        for (x, y, pixel) in out.enumerate_pixels_mut() {
            if let Some(color) = self.value(x, y).and_then(Self::color) {
                *pixel = blend(*pixel, color);
            }
        }
        Ok(out)
    }
}

/// `pixel` and `color` mixed half and half.
fn blend(pixel: Rgb<u8>, color: [u8; 3]) -> Rgb<u8> {
    let mix = |a: u8, b: u8| (u16::from(a) + u16::from(b)).div_ceil(2) as u8;
    Rgb([
        mix(pixel[0], color[0]),
        mix(pixel[1], color[1]),
        mix(pixel[2], color[2]),
    ])
}

/// Google's Turbo colormap (Apache-2.0,
/// <https://ai.googleblog.com/2019/08/turbo-improved-rainbow-colormap-for.html>): every 16th
/// of its 256 entries and the last, as (entry, [r, g, b]); [`turbo`] interpolates linearly.
const TURBO: [(u8, [f32; 3]); 17] = [
    (0, [0.18995, 0.07176, 0.23217]),
    (16, [0.25107, 0.25237, 0.63374]),
    (32, [0.27628, 0.42118, 0.89123]),
    (48, [0.25862, 0.57958, 0.99876]),
    (64, [0.15844, 0.73551, 0.92305]),
    (80, [0.09267, 0.86554, 0.76230]),
    (96, [0.19659, 0.94901, 0.59466]),
    (112, [0.42778, 0.99419, 0.38575]),
    (128, [0.64362, 0.98999, 0.23356]),
    (144, [0.80473, 0.92452, 0.20459]),
    (160, [0.93301, 0.81236, 0.22667]),
    (176, [0.99314, 0.67408, 0.20348]),
    (192, [0.98360, 0.49291, 0.12849]),
    (208, [0.92105, 0.31489, 0.05475]),
    (224, [0.81608, 0.18462, 0.01809]),
    (240, [0.66449, 0.08436, 0.00424]),
    (255, [0.47960, 0.01583, 0.01055]),
];

/// Turbo at `t` in [0, 1] (clamped), as 8-bit RGB.
fn turbo(t: f32) -> [u8; 3] {
    let position = t.clamp(0.0, 1.0) * 255.0;
    // The last stop whose entry is at or below `position` (the first stop is at 0).
    let lower = TURBO
        .iter()
        .rposition(|(entry, _)| f32::from(*entry) <= position)
        .unwrap_or(0);
    let (entry0, rgb0) = TURBO[lower];
    let (entry1, rgb1) = TURBO[(lower + 1).min(TURBO.len() - 1)];
    let span = f32::from(entry1) - f32::from(entry0);
    let w = if span > 0.0 {
        (position - f32::from(entry0)) / span
    } else {
        0.0
    };
    let channel = |c: usize| {
        let v = rgb0[c] + (rgb1[c] - rgb0[c]) * w;
        (v.clamp(0.0, 1.0) * 255.0).round() as u8
    };
    [channel(0), channel(1), channel(2)]
}

/// CSS `linear-gradient` stops sampling the colour scale over [0, 1], for the legend.
pub(super) fn css_gradient() -> String {
    let stops: Vec<String> = (0..=10)
        .map(|i| {
            let t = i as f32 / 10.0;
            let [r, g, b] = AnomalyHeatmap::color(t).unwrap_or([0, 0, 0]);
            format!("rgb({r},{g},{b}) {}%", i * 10)
        })
        .collect();
    format!("linear-gradient(to right, {})", stops.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colormap_ends_and_middle() {
        let cold = AnomalyHeatmap::color(0.0).unwrap();
        let hot = AnomalyHeatmap::color(1.0).unwrap();
        let middle = AnomalyHeatmap::color(0.5).unwrap();
        // Cold: dark, with blue ≥ red; hot: red dominates, little blue.
        assert!(cold.iter().all(|&c| c < 60), "{cold:?}");
        assert!(cold[2] >= cold[0], "{cold:?}");
        assert!(hot[0] > 100 && hot[1] < 40 && hot[2] < 20, "{hot:?}");
        // The threshold is bright green-yellow.
        assert!(middle[1] > 200, "{middle:?}");
        // Clamped beyond the ends; NaN has no colour.
        assert_eq!(AnomalyHeatmap::color(-3.0), Some(cold));
        assert_eq!(AnomalyHeatmap::color(f32::INFINITY), Some(hot));
        assert_eq!(AnomalyHeatmap::color(f32::NAN), None);
        // The hue runs from blue to red: red grows from the cold half to the hot half.
        let quarter = AnomalyHeatmap::color(0.25).unwrap();
        let three_quarters = AnomalyHeatmap::color(0.75).unwrap();
        assert!(quarter[2] > quarter[0], "{quarter:?}");
        assert!(three_quarters[0] > three_quarters[2], "{three_quarters:?}");
    }

    #[test]
    fn size_mismatch_names_the_image() {
        let image = RgbImage::new(4, 3);
        let map = AnomalyHeatmap::new(3, 4, vec![0.0; 12]).unwrap();
        let err = map.overlay(&image, "bottle/017.png").unwrap_err();
        assert!(matches!(err, Error::InvalidShape { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains("bottle/017.png"), "{message}");
        assert!(message.contains("[3, 4]"), "{message}");
        // A map of the right size whose values are short is refused too (public fields).
        let short = AnomalyHeatmap {
            width: 4,
            height: 3,
            values: vec![0.0; 5],
        };
        let message = short.overlay(&image, "x.png").unwrap_err().to_string();
        assert!(
            message.contains("x.png") && message.contains("12 values"),
            "{message}"
        );
    }

    #[test]
    fn overlay_blends_half_and_leaves_nan() {
        let image = RgbImage::from_pixel(2, 1, Rgb([200, 200, 200]));
        let map = AnomalyHeatmap::new(2, 1, vec![1.0, f32::NAN]).unwrap();
        let out = map.overlay(&image, "a").unwrap();
        let hot = AnomalyHeatmap::color(1.0).unwrap();
        let expected = hot.map(|h| ((200 + u16::from(h)).div_ceil(2)) as u8);
        assert_eq!(out.get_pixel(0, 0).0, expected);
        assert_eq!(*out.get_pixel(1, 0), Rgb([200, 200, 200]));
        // Zero-size images with zero-size maps are fine.
        let empty = AnomalyHeatmap::new(0, 0, vec![]).unwrap();
        assert_eq!(
            empty
                .overlay(&RgbImage::new(0, 0), "e")
                .unwrap()
                .dimensions(),
            (0, 0)
        );
    }

    #[test]
    fn legend_gradient_has_eleven_stops() {
        let css = css_gradient();
        assert!(css.starts_with("linear-gradient(to right, rgb("), "{css}");
        assert_eq!(css.matches("rgb(").count(), 11);
        assert!(css.ends_with("100%)"), "{css}");
    }
}
