//! Images as `data:image/png;base64,…` URIs, downscaled to what the page shows.

use base64::Engine as _;
use image::imageops::FilterType;
use image::{ExtendedColorType, ImageEncoder, RgbImage};

use crate::{Error, Result};

/// An image ready for an `<img>`: its data URI and the size it was encoded at.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Embedded {
    /// `data:image/png;base64,…`.
    pub uri: String,
    /// Width in pixels, as encoded.
    pub width: u32,
    /// Height in pixels, as encoded.
    pub height: u32,
    /// Whether the original was small enough that the page should scale it up without
    /// smoothing (`image-rendering: pixelated`), so single pixels stay visible.
    pub pixelated: bool,
}

/// Images whose longer side is below this are shown with sharp pixels.
const PIXELATED_BELOW: u32 = 128;

/// `image` as a PNG data URI, first downscaled (aspect kept) so that its longer side is at most
/// `max_side`. `None` for an image with no pixels (the page shows a placeholder). `name` names
/// the image in errors ([`Error::InvalidArgument`] if the encoder fails).
pub(super) fn png_data_uri(
    image: &RgbImage,
    max_side: u32,
    name: &str,
) -> Result<Option<Embedded>> {
    let (width, height) = image.dimensions();
    if width == 0 || height == 0 {
        return Ok(None);
    }
    let pixelated = width.max(height) < PIXELATED_BELOW;
    let scaled;
    let image = if width.max(height) > max_side.max(1) {
        let (w, h) = fit(width, height, max_side.max(1));
        scaled = image::imageops::resize(image, w, h, FilterType::Triangle);
        &scaled
    } else {
        image
    };
    let (width, height) = image.dimensions();
    let len = width as usize * height as usize * 3;
    let pixels = image.as_raw().get(..len).ok_or_else(|| {
        Error::invalid(
            format!("image `{name}`"),
            format!("its buffer holds fewer than {width} × {height} RGB pixels"),
        )
    })?;
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(pixels, width, height, ExtendedColorType::Rgb8)
        .map_err(|e| {
            Error::invalid(
                format!("image `{name}`"),
                format!("PNG encoding failed: {e}"),
            )
        })?;
    let mut uri = String::from("data:image/png;base64,");
    base64::engine::general_purpose::STANDARD.encode_string(&png, &mut uri);
    Ok(Some(Embedded {
        uri,
        width,
        height,
        pixelated,
    }))
}

/// `(width, height)` scaled so that the longer side is `max_side`, each side at least 1.
fn fit(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let scale = f64::from(max_side) / f64::from(width.max(height));
    let side = |s: u32| ((f64::from(s) * scale).round() as u32).clamp(1, max_side);
    (side(width), side(height))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn round_trips_through_png() {
        let mut image = RgbImage::new(3, 2);
        image.put_pixel(2, 1, Rgb([250, 10, 20]));
        let embedded = png_data_uri(&image, 512, "a").unwrap().unwrap();
        assert_eq!((embedded.width, embedded.height), (3, 2));
        assert!(embedded.pixelated);
        let b64 = embedded.uri.strip_prefix("data:image/png;base64,").unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let decoded = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(decoded, image);
    }

    #[test]
    fn downscales_large_images_and_skips_empty_ones() {
        let image = RgbImage::new(1000, 250);
        let embedded = png_data_uri(&image, 200, "big").unwrap().unwrap();
        assert_eq!((embedded.width, embedded.height), (200, 50));
        assert!(!embedded.pixelated);
        assert_eq!(fit(1, 5000, 100), (1, 100));
        assert!(
            png_data_uri(&RgbImage::new(0, 7), 200, "empty")
                .unwrap()
                .is_none()
        );
        assert!(
            png_data_uri(&RgbImage::new(7, 0), 200, "empty")
                .unwrap()
                .is_none()
        );
    }
}
