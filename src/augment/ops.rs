//! The image operations of torchvision's PIL path, each with explicit parameters.
//!
//! Each follows Pillow's C implementation (`Resample.c`, `BoxBlur.c`, `Convert.c`,
//! `Blend.c`, `ImageEnhance.py`) and torchvision's `_functional_pil.py`, in 8-bit arithmetic
//! where they use it, so that the outputs match torchvision on PIL images to a unit or two in
//! the last place (tests/augment.rs checks them against fixtures written by torchvision).
//!
//! ```
//! use image::RgbImage;
//! use msad::augment::ops::{self, CropBox, Filter};
//!
//! let img = RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, 128]));
//! let crop = ops::crop(&img, CropBox { top: 5, left: 10, height: 20, width: 20 })?;
//! let small = ops::resize(&crop, 8, 8, Filter::Bilinear);
//! let jittered = ops::adjust_brightness(&ops::hflip(&small), 1.2);
//! assert_eq!(jittered.dimensions(), (8, 8));
//! // A box reaching outside the image is an error, not a panic.
//! assert!(ops::crop(&img, CropBox { top: 25, left: 0, height: 10, width: 10 }).is_err());
//! # Ok::<(), msad::Error>(())
//! ```

use image::{Rgb, RgbImage};
use rayon::prelude::*;

use crate::{Error, Result};

/// Resampling filters (PIL's `Image.BILINEAR` and `Image.BICUBIC`), antialiased when shrinking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Filter {
    /// Triangle filter, support 1.
    Bilinear,
    /// Keys cubic with a = −0.5, support 2.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// A rectangle in pixels: rows `top..top + height`, columns `left..left + width`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CropBox {
    /// First row.
    pub top: u32,
    /// First column.
    pub left: u32,
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
}

impl CropBox {
    /// An error unless the box is non-empty and lies inside `img`.
    pub fn check_inside(&self, img: &RgbImage) -> Result<()> {
        let bottom = self.top as u64 + self.height as u64;
        let right = self.left as u64 + self.width as u64;
        if self.width == 0
            || self.height == 0
            || bottom > img.height() as u64
            || right > img.width() as u64
        {
            return Err(Error::invalid(
                "crop box",
                format!(
                    "{self:?} is empty or reaches outside the {}x{} image",
                    img.width(),
                    img.height()
                ),
            ));
        }
        Ok(())
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel of a run of output indices: the first input index, the number of taps,
/// and fixed-point weights (Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc`).
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

impl Coefficients {
    /// The weights of output index `i` of the run (`bounds[i].1` of them).
    fn of(&self, i: usize) -> &[i32] {
        &self.weights[i * self.ksize..i * self.ksize + self.bounds[i].1]
    }
}

/// The coefficients of output indices `first..first + count` of a resize from `in_size` to
/// `out_size` samples. Each index's coefficients depend only on the index, so a run gives
/// exactly the values the whole resize gives there (which is what lets [`resize_and_center_crop`]
/// compute only its crop). The first input indices and the tap ends (`xmin + taps`) never
/// decrease along the run, and stay within `0..=in_size`.
fn coefficients(
    in_size: usize,
    out_size: u64,
    first: u64,
    count: usize,
    filter: Filter,
) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(count);
    let mut weights = vec![0i32; count * ksize];
    let mut k = vec![0f64; ksize];
    for i in 0..count {
        let xx = first + i as u64;
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates toward zero, and `center - support + 0.5` can be negative.
        let xmin = ((center - support + 0.5) as i64).clamp(0, in_size as i64) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let taps = xmax.saturating_sub(xmin).min(ksize);
        let mut total = 0.0;
        for (x, w) in k.iter_mut().enumerate().take(taps) {
            *w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            total += *w;
        }
        for x in 0..taps {
            let w = if total != 0.0 { k[x] / total } else { k[x] };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            weights[i * ksize + x] = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, taps));
    }
    Coefficients {
        bounds,
        ksize,
        weights,
    }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes the `region` of `img` to `width` × `height` as PIL's `Image.resize` resizes the
/// cropped image (torchvision's `resized_crop` crops first): a horizontal then a vertical pass,
/// each in 22-bit fixed point with 8-bit intermediate rounding; a pass is skipped when its
/// size does not change. A `region` outside the image is an error; a zero output size gives an
/// empty image.
///
/// Memory: the output, the filters' weights (about 16 bytes per pixel of the region's width
/// and height) and at most 1 MiB of accumulators, whatever the region's shape.
pub fn resize_region(
    img: &RgbImage,
    region: CropBox,
    width: u32,
    height: u32,
    filter: Filter,
) -> Result<RgbImage> {
    region.check_inside(img)?;
    Ok(resize_inside(img, region, width, height, filter))
}

/// [`resize_region`] for a region known to lie inside the image.
fn resize_inside(
    img: &RgbImage,
    region: CropBox,
    width: u32,
    height: u32,
    filter: Filter,
) -> RgbImage {
    let whole = Window {
        left: 0,
        top: 0,
        width,
        height,
    };
    resize_window(
        img,
        region,
        (u64::from(width), u64::from(height)),
        whole,
        filter,
    )
}

/// A rectangle of a resized image, which may be far larger than `u32` coordinates reach
/// (the window's own size is at most the crop's).
#[derive(Clone, Copy, Debug)]
struct Window {
    left: u64,
    top: u64,
    width: u32,
    height: u32,
}

/// The most bytes of vertical-pass accumulators [`resize_window`] holds at a time (at least
/// one output row's).
const ACCUMULATOR_BYTES: usize = 1 << 20;

/// Output bytes of [`resize_window`] from which its vertical pass runs in blocks on rayon
/// (64 KiB: a 150 × 150 crop). A 224 px crop from a 500 × 375 photo took 1.35 ms on one
/// thread of a 2-core Zen 4, a tenth of ResNet-18's forward on one image.
const PARALLEL_BYTES: usize = 1 << 16;

/// The pixels `window` of the `region` of `img` resized to `out_size` = (width, height),
/// computed without the rest of the resized image: `window` must lie inside `out_size` (a
/// region inside `img` is the caller's promise too). Each output pixel is the one a full
/// resize gives there, bit for bit: Pillow's horizontal pass (8-bit rounded) on the source rows
/// the window's vertical taps read, then its vertical pass; the vertical sums are accumulated
/// source row by source row, in the order of the taps, for at most [`ACCUMULATOR_BYTES`] of
/// output rows at a time.
fn resize_window(
    img: &RgbImage,
    region: CropBox,
    out_size: (u64, u64),
    window: Window,
    filter: Filter,
) -> RgbImage {
    let (in_w, in_h) = (region.width as usize, region.height as usize);
    let (win_w, win_h) = (window.width as usize, window.height as usize);
    if win_w == 0 || win_h == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(window.width, window.height);
    }
    let (out_w, out_h) = out_size;
    let src = img.as_raw();
    let stride = img.width() as usize * 3;
    let origin = region.top as usize * stride + region.left as usize * 3;
    let row_len = win_w * 3;

    // Without a horizontal change, window columns are region columns.
    let horiz =
        (out_w != in_w as u64).then(|| coefficients(in_w, out_w, window.left, win_w, filter));
    // Row `y` of the region after the horizontal pass, window columns only.
    let horizontal_row = |y: usize, out_row: &mut [u8]| {
        let row = origin + y * stride;
        match &horiz {
            None => {
                let start = row + window.left as usize * 3;
                out_row.copy_from_slice(&src[start..start + row_len]);
            }
            Some(horiz) => {
                for (xx, px) in out_row.chunks_exact_mut(3).enumerate() {
                    let (xmin, _) = horiz.bounds[xx];
                    let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
                    let base = row + xmin * 3;
                    for (t, w) in horiz.of(xx).iter().enumerate() {
                        let p = base + t * 3;
                        acc[0] += src[p] as i32 * w;
                        acc[1] += src[p + 1] as i32 * w;
                        acc[2] += src[p + 2] as i32 * w;
                    }
                    px[0] = clip8(acc[0]);
                    px[1] = clip8(acc[1]);
                    px[2] = clip8(acc[2]);
                }
            }
        }
    };

    let mut out = vec![0u8; win_h * row_len];
    if out_h == in_h as u64 {
        // No vertical change: window rows are region rows.
        for (yy, out_row) in out.chunks_exact_mut(row_len).enumerate() {
            horizontal_row(window.top as usize + yy, out_row);
        }
    } else {
        let vert = coefficients(in_h, out_h, window.top, win_h, filter);
        // Blocks of output rows, on rayon where the window is large: a 224 px crop is two
        // blocks per thread (each block makes the horizontal pass of the source rows its taps
        // read, a few rows more than its share at its edges).
        let mut block = (ACCUMULATOR_BYTES / (row_len * 4)).clamp(1, win_h);
        if win_h * row_len >= PARALLEL_BYTES {
            let threads = rayon::current_num_threads().max(1);
            block = block.min(win_h.div_ceil(2 * threads)).max(1);
        }
        out.par_chunks_mut(block * row_len)
            .enumerate()
            .for_each(|(index, out)| {
                let b0 = index * block;
                let b1 = (b0 + block).min(win_h);
                let mut acc = vec![1i32 << (PRECISION_BITS - 1); (b1 - b0) * row_len];
                let mut line = vec![0u8; row_len];
                let tap_end = |yy: usize| vert.bounds[yy].0 + vert.bounds[yy].1;
                let first = vert.bounds[b0].0;
                let last = (b0..b1).map(tap_end).max().unwrap_or(first).min(in_h);
                // Output rows [lo, hi) of the block are those whose taps cover source row y.
                let (mut lo, mut hi) = (b0, b0);
                for y in first..last {
                    horizontal_row(y, &mut line);
                    while lo < b1 && tap_end(lo) <= y {
                        lo += 1;
                    }
                    while hi < b1 && vert.bounds[hi].0 <= y {
                        hi += 1;
                    }
                    for yy in lo..hi {
                        let (ymin, taps) = vert.bounds[yy];
                        if y < ymin || y >= ymin + taps {
                            continue;
                        }
                        let w = vert.of(yy)[y - ymin];
                        let acc_row = &mut acc[(yy - b0) * row_len..(yy - b0 + 1) * row_len];
                        for (a, &v) in acc_row.iter_mut().zip(&line) {
                            *a += v as i32 * w;
                        }
                    }
                }
                for (o, &a) in out.iter_mut().zip(acc.iter()) {
                    *o = clip8(a);
                }
            });
    }
    RgbImage::from_raw(window.width, window.height, out).unwrap_or_default()
}

/// The whole image resized to `width` × `height` (PIL's `Image.resize`).
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let full = CropBox {
        top: 0,
        left: 0,
        height: img.height(),
        width: img.width(),
    };
    resize_inside(img, full, width, height, filter)
}

/// The size torchvision's `Resize(size)` gives a `width` × `height` image: the shorter side
/// becomes `size`, the longer `int(size · long / short)`. In `u64`, where it cannot overflow.
fn shorter_side_size(width: u32, height: u32, size: u32) -> (u64, u64) {
    let (w, h, size) = (u64::from(width), u64::from(height), u64::from(size));
    if w <= h {
        (size, size * h / w.max(1))
    } else {
        (size * w / h.max(1), size)
    }
}

/// torchvision's `Resize(size)` for an int size: the shorter side becomes `size`, the longer
/// `int(size · long / short)`.
///
/// Errors: [`Error::InvalidArgument`] naming the image's size when the longer side would not
/// fit in a `u32` (a 1 × 2²⁴ image resized to 256). The result is allocated whole: to crop it
/// afterwards, [`resize_and_center_crop`] computes only the crop.
pub fn resize_shorter_side(img: &RgbImage, size: u32, filter: Filter) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    let (new_w, new_h) = shorter_side_size(w, h, size);
    match (u32::try_from(new_w), u32::try_from(new_h)) {
        (Ok(new_w), Ok(new_h)) => Ok(resize(img, new_w, new_h, filter)),
        _ => Err(Error::invalid(
            "image",
            format!(
                "the {w}x{h} image resized to a shorter side of {size} would be \
                 {new_w}x{new_h}, more than {} pixels on a side",
                u32::MAX
            ),
        )),
    }
}

/// torchvision's `Resize(size)` followed by `CenterCrop((height, width))` (the evaluation
/// transform), computed for the crop only: equal, bit for bit, to [`center_crop`] of
/// [`resize_shorter_side`], without making the resized image. Its time and memory depend on
/// the crop and on the source pixels under it, not on the resized size: a 1 × 65535 image
/// resized to 224 would be 224 × 14,679,840 (10 GB), of which a 224 × 224 crop costs 150 KB
/// here. Where the resized image is smaller than the crop, the rest is zero, as
/// `CenterCrop`'s padding makes it. A zero-sized image gives a zero (black) crop.
pub fn resize_and_center_crop(
    img: &RgbImage,
    size: u32,
    width: u32,
    height: u32,
    filter: Filter,
) -> RgbImage {
    let (w, h) = img.dimensions();
    let (new_w, new_h) = shorter_side_size(w, h, size);
    let (left, win_w, pad_x) = center_crop_axis(new_w, width);
    let (top, win_h, pad_y) = center_crop_axis(new_h, height);
    let full = CropBox {
        top: 0,
        left: 0,
        height: h,
        width: w,
    };
    let window = Window {
        left,
        top,
        width: win_w,
        height: win_h,
    };
    let inner = resize_window(img, full, (new_w, new_h), window, filter);
    if (win_w, win_h) == (width, height) {
        return inner;
    }
    let mut out = RgbImage::new(width, height);
    image::imageops::replace(&mut out, &inner, i64::from(pad_x), i64::from(pad_y));
    out
}

/// One axis of `CenterCrop(crop)` on a resized side of `resized` pixels: where the crop
/// starts in the resized image, how many resized pixels it covers, and how many zeros
/// CenterCrop pads before them.
fn center_crop_axis(resized: u64, crop: u32) -> (u64, u32, u32) {
    let crop64 = u64::from(crop);
    if resized < crop64 {
        // Padding [(crop − resized) // 2, (crop − resized + 1) // 2], then offset 0. Both
        // numbers are below `crop`, so they fit a u32.
        let covered = u32::try_from(resized).unwrap_or(crop);
        (0, covered, (crop - covered) / 2)
    } else {
        let spare = resized - crop64;
        let offset = (round_half_even(spare as f64 / 2.0) as u64).min(spare);
        (offset, crop, 0)
    }
}

/// Where [`resize_and_center_crop`] puts a source pixel: for a `width` × `height` image, the
/// affine map per axis from source coordinates to crop coordinates (continuous, pixel edges
/// at integers), as `(scale, shift)` with `crop = source · scale + shift`, for x then y.
pub(crate) fn source_to_crop(width: u32, height: u32, size: u32, crop: u32) -> [(f64, f64); 2] {
    let (new_w, new_h) = shorter_side_size(width, height, size);
    let axis = |source: u32, resized: u64| {
        let (start, _, pad) = center_crop_axis(resized, crop);
        (
            resized as f64 / f64::from(source.max(1)),
            f64::from(pad) - start as f64,
        )
    };
    [axis(width, new_w), axis(height, new_h)]
}

/// The pixels of `region`; a region outside the image is an error.
pub fn crop(img: &RgbImage, region: CropBox) -> Result<RgbImage> {
    region.check_inside(img)?;
    Ok(crop_inside(img, region))
}

fn crop_inside(img: &RgbImage, region: CropBox) -> RgbImage {
    RgbImage::from_fn(region.width, region.height, |x, y| {
        *img.get_pixel(region.left + x, region.top + y)
    })
}

/// torchvision's `CenterCrop`: offsets `round((H − h) / 2)`, `round((W − w) / 2)` with Python's
/// round-half-to-even; an image smaller than the crop is first padded with zeros, as
/// torchvision does.
pub fn center_crop(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if w < width || h < height {
        // torchvision pads [left, top, right, bottom] = [(cw − w) // 2, (ch − h) // 2, (cw − w + 1) // 2, ...].
        let (pw, ph) = (width.saturating_sub(w), height.saturating_sub(h));
        let (left, top) = (pw / 2, ph / 2);
        let mut padded = RgbImage::new(w + pw, h + ph);
        image::imageops::replace(&mut padded, img, left as i64, top as i64);
        return center_crop(&padded, width, height);
    }
    let top = round_half_even((h - height) as f64 / 2.0) as u32;
    let left = round_half_even((w - width) as f64 / 2.0) as u32;
    crop_inside(
        img,
        CropBox {
            top,
            left,
            height,
            width,
        },
    )
}

/// Python's `round`: halves go to the even neighbour.
pub(crate) fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// Mirror left to right.
pub fn hflip(img: &RgbImage) -> RgbImage {
    image::imageops::flip_horizontal(img)
}

/// PIL's `convert("L")`: L = (19595 R + 38470 G + 7471 B + 2¹⁵) >> 16 (ITU-R 601-2).
#[inline]
pub fn luma(p: &Rgb<u8>) -> u8 {
    ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

/// torchvision's `Grayscale(num_output_channels=3)`: L replicated to the three channels.
pub fn to_grayscale(img: &RgbImage) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let l = luma(p);
        *p = Rgb([l, l, l]);
    }
    out
}

/// PIL's `Image.blend(degenerate, img, factor)`: `degenerate + factor (img − degenerate)` in
/// float, truncated to 8 bits and clipped, as `ImagingBlend`.
fn blend(img: &RgbImage, factor: f32, degenerate: impl Fn(usize, u8) -> u8) -> RgbImage {
    let mut out = img.clone();
    for (i, v) in out.iter_mut().enumerate() {
        let d = degenerate(i, *v) as f32;
        let t = d + factor * (*v as f32 - d);
        *v = if t <= 0.0 {
            0
        } else if t >= 255.0 {
            255
        } else {
            t as u8
        };
    }
    out
}

/// `ImageEnhance.Brightness(img).enhance(factor)` (torchvision's `adjust_brightness`).
pub fn adjust_brightness(img: &RgbImage, factor: f32) -> RgbImage {
    blend(img, factor, |_, _| 0)
}

/// `ImageEnhance.Contrast(img).enhance(factor)`: blends with a gray image at the rounded mean
/// of L.
pub fn adjust_contrast(img: &RgbImage, factor: f32) -> RgbImage {
    let n = (img.width() as u64 * img.height() as u64).max(1);
    let sum: u64 = img.pixels().map(|p| luma(p) as u64).sum();
    let mean = (sum as f64 / n as f64 + 0.5) as u8;
    blend(img, factor, |_, _| mean)
}

/// `ImageEnhance.Color(img).enhance(factor)` (saturation): blends with the image's L.
pub fn adjust_saturation(img: &RgbImage, factor: f32) -> RgbImage {
    let gray: Vec<u8> = img.pixels().map(luma).collect();
    blend(img, factor, |i, _| gray[i / 3])
}

/// torchvision's `adjust_hue` on PIL: to 8-bit HSV (Pillow's `rgb2hsv`), H shifted by
/// `int(hue_factor · 255)` modulo 256, back to RGB (`hsv2rgb`). `hue_factor` in [−0.5, 0.5].
pub fn adjust_hue(img: &RgbImage, hue_factor: f32) -> RgbImage {
    let shift = (hue_factor as f64 * 255.0) as i32 as u8;
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let [h, s, v] = rgb_to_hsv(p.0);
        *p = Rgb(hsv_to_rgb([h.wrapping_add(shift), s, v]));
    }
    out
}

// Pillow's `rgb2hsv_row` and `hsv2rgb` mix float and double arithmetic; the casts below follow
// C's promotions so that the 8-bit results agree.
fn rgb_to_hsv([r, g, b]: [u8; 3]) -> [u8; 3] {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if maxc == minc {
        return [0, 0, maxc];
    }
    let cr = (maxc - minc) as f32;
    let s = cr / maxc as f32;
    let rc = (maxc - r) as f32 / cr;
    let gc = (maxc - g) as f32 / cr;
    let bc = (maxc - b) as f32 / cr;
    let h: f32 = if r == maxc {
        bc - gc
    } else if g == maxc {
        (2.0 + rc as f64 - bc as f64) as f32
    } else {
        (4.0 + gc as f64 - rc as f64) as f32
    };
    let h = ((h as f64 / 6.0 + 1.0) % 1.0) as f32;
    let clip = |v: f64| (v as i32).clamp(0, 255) as u8;
    [clip(h as f64 * 255.0), clip(s as f64 * 255.0), maxc]
}

fn hsv_to_rgb([h, s, v]: [u8; 3]) -> [u8; 3] {
    if s == 0 {
        return [v, v, v];
    }
    let hf = h as f32 as f64 * 6.0 / 255.0;
    let i = hf.floor() as i32;
    let f = (hf - i as f64) as f32;
    let fs = (s as f32 as f64 / 255.0) as f32;
    let vf = v as f32 as f64;
    let clip = |x: f64| (x.round() as i32).clamp(0, 255) as u8;
    let p = clip(vf * (1.0 - fs as f64));
    let q = clip(vf * (1.0 - (fs * f) as f64));
    let t = clip(vf * (1.0 - fs as f64 * (1.0 - f as f64)));
    match i.rem_euclid(6) {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// PIL's `ImageFilter.GaussianBlur(radius=sigma)` (MoCo v2's blur): three passes of an
/// extended box blur per direction (`ImagingGaussianBlur`, `BoxBlur.c`), 8-bit between passes.
/// σ is clamped to [0, 1000] (beyond, the fixed-point sums would overflow); a σ that is not
/// finite leaves the image as it is.
pub fn gaussian_blur(img: &RgbImage, sigma: f32) -> RgbImage {
    let sigma = if sigma.is_finite() {
        sigma.clamp(0.0, 1000.0)
    } else {
        0.0
    };
    let radius = box_blur_radius(sigma, 3);
    let (w, h) = (img.width() as usize, img.height() as usize);
    if radius == 0.0 || w == 0 || h == 0 {
        return img.clone();
    }
    let mut data = img.as_raw().clone();
    let mut line = vec![0u8; w.max(h) * 3];
    // Horizontal passes, row by row.
    for _ in 0..3 {
        for y in 0..h {
            let row = &mut data[y * w * 3..(y + 1) * w * 3];
            box_blur_line(row, &mut line[..w * 3], w, radius);
            row.copy_from_slice(&line[..w * 3]);
        }
    }
    // Vertical passes, on the transposed image (as Pillow does).
    let mut transposed = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            transposed[(x * h + y) * 3..(x * h + y) * 3 + 3]
                .copy_from_slice(&data[(y * w + x) * 3..(y * w + x) * 3 + 3]);
        }
    }
    for _ in 0..3 {
        for x in 0..w {
            let col = &mut transposed[x * h * 3..(x + 1) * h * 3];
            box_blur_line(col, &mut line[..h * 3], h, radius);
            col.copy_from_slice(&line[..h * 3]);
        }
    }
    for y in 0..h {
        for x in 0..w {
            data[(y * w + x) * 3..(y * w + x) * 3 + 3]
                .copy_from_slice(&transposed[(x * h + y) * 3..(x * h + y) * 3 + 3]);
        }
    }
    RgbImage::from_raw(img.width(), img.height(), data).expect("same size")
}

/// Pillow's `_gaussian_blur_radius`: the extended-box radius whose `passes` passes have the
/// variance of a Gaussian of standard deviation `sigma` (Gwosdek et al., SSVM 2011).
fn box_blur_radius(sigma: f32, passes: u32) -> f32 {
    let sigma2 = sigma * sigma / passes as f32;
    let big_l = (12.0f64 * sigma2 as f64 + 1.0).sqrt() as f32;
    let l = ((big_l as f64 - 1.0) / 2.0).floor() as f32;
    let mut a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0));
    l + a
}

/// One pass of Pillow's `ImagingLineBoxBlur` over `n` RGB pixels, edges extended.
fn box_blur_line(input: &[u8], out: &mut [u8], n: usize, float_radius: f32) {
    let radius = float_radius as usize;
    let ww = ((1u32 << 24) as f32 / (float_radius * 2.0 + 1.0)) as u32;
    let fw = ((1u32 << 24) - (radius as u32 * 2 + 1) * ww) / 2;
    let last = n - 1;
    let edge_a = (radius + 1).min(n);
    let edge_b = n.saturating_sub(radius + 1);
    let px = |i: usize, c: usize| input[i * 3 + c] as u32;
    for c in 0..3 {
        // The accumulator for pixel −1: the first pixel radius + 1 times, then 0..radius − 1
        // (clamped to the line).
        let mut acc = px(0, c) * (radius as u32 + 1);
        for x in 0..edge_a.saturating_sub(1) {
            acc += px(x, c);
        }
        acc += px(last, c) * (radius + 1 - edge_a) as u32;
        let mut save = |x: usize, acc: u32, left: usize, right: usize| {
            let bulk = acc * ww + (px(left, c) + px(right, c)) * fw;
            out[x * 3 + c] = ((bulk + (1 << 23)) >> 24) as u8;
        };
        // acc += in[add] − in[subtract], wrapping as Pillow's unsigned arithmetic does.
        let step = |acc: u32, sub: usize, add: usize| {
            acc.wrapping_add(px(add, c)).wrapping_sub(px(sub, c))
        };
        if edge_a <= edge_b {
            for x in 0..edge_a {
                acc = step(acc, 0, x + radius);
                save(x, acc, 0, x + radius + 1);
            }
            for x in edge_a..edge_b {
                acc = step(acc, x - radius - 1, x + radius);
                save(x, acc, x - radius - 1, x + radius + 1);
            }
            for x in edge_b..=last {
                acc = step(acc, x - radius - 1, last);
                save(x, acc, x - radius - 1, last);
            }
        } else {
            for x in 0..edge_b {
                acc = step(acc, 0, x + radius);
                save(x, acc, 0, x + radius + 1);
            }
            for x in edge_b..edge_a {
                acc = step(acc, 0, last);
                save(x, acc, 0, last);
            }
            for x in edge_a..=last {
                acc = step(acc, x - radius - 1, last);
                save(x, acc, x - radius - 1, last);
            }
        }
    }
}

/// ImageNet channel means (torchvision's `Normalize`).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// `ToTensor` then `Normalize(mean, std)`: CHW float32 values `(v / 255 − mean) / std`, written
/// into `out`, which must hold 3·H·W values (an error otherwise).
pub fn to_normalized_chw(
    img: &RgbImage,
    mean: [f32; 3],
    std: [f32; 3],
    out: &mut [f32],
) -> Result<()> {
    let plane = img.width() as usize * img.height() as usize;
    if out.len() != 3 * plane {
        return Err(Error::InvalidShape {
            what: "normalisation output buffer".into(),
            expected: format!("3 × {} × {} values", img.height(), img.width()),
            found: vec![out.len()],
        });
    }
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, p) in img.pixels().enumerate() {
        r[i] = (p[0] as f32 / 255.0 - mean[0]) / std[0];
        g[i] = (p[1] as f32 / 255.0 - mean[1]) / std[1];
        b[i] = (p[2] as f32 / 255.0 - mean[2]) / std[2];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The brightness-weighted centre (continuous, pixel edges at integers) of `img`.
    fn centroid(img: &RgbImage) -> (f64, f64) {
        let (mut sx, mut sy, mut total) = (0.0, 0.0, 0.0);
        for (x, y, p) in img.enumerate_pixels() {
            let v = f64::from(p.0[0]);
            sx += v * (f64::from(x) + 0.5);
            sy += v * (f64::from(y) + 0.5);
            total += v;
        }
        (sx / total, sy / total)
    }

    /// A bright 3 × 3 marker lands in the crop where `source_to_crop` says: downscaled, upscaled,
    /// cropped on either axis, and padded (the resized image smaller than the crop).
    #[test]
    fn source_to_crop_follows_resize_and_center_crop() {
        for (w, h, size, crop) in [
            (317, 211, 256, 224),
            (211, 317, 256, 224),
            (500, 375, 224, 224),
            (96, 64, 128, 100),
            (40, 30, 16, 24),
        ] {
            for (mx, my) in [(w / 2, h / 2), (w / 2 + w / 8, h / 2 - h / 10)] {
                let mut img = RgbImage::new(w, h);
                for y in my - 1..=my + 1 {
                    for x in mx - 1..=mx + 1 {
                        img.put_pixel(x, y, Rgb([255, 255, 255]));
                    }
                }
                let out = resize_and_center_crop(&img, size, crop, crop, Filter::Bilinear);
                let [(ax, bx), (ay, by)] = source_to_crop(w, h, size, crop);
                let want = (
                    (f64::from(mx) + 0.5) * ax + bx,
                    (f64::from(my) + 0.5) * ay + by,
                );
                let got = centroid(&out);
                assert!(
                    (got.0 - want.0).abs() < 0.5 && (got.1 - want.1).abs() < 0.5,
                    "{w}x{h} → {size}/{crop}, marker ({mx}, {my}): at {got:?}, mapped to {want:?}"
                );
            }
        }
    }
}
