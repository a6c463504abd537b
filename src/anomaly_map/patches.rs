//! Patch features and the bank of normal patches: what an anomaly map is measured against.

use burn::tensor::module::{avg_pool2d, interpolate};
use burn::tensor::ops::{AvgPoolOptions, InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::PatchMapConfig;
use super::coreset::greedy_coreset;
use crate::augment::EvalTransform;
use crate::data::ImageSource;
use crate::encoder::PreparedEncoder;
use crate::features::load_images;
use crate::knn::KnnScorer;
use crate::{Error, Result};

/// At most this many times `max_patches` patches are kept (a uniform random sample) for the
/// greedy coreset to choose among: it bounds both fitting's memory and the coreset's time.
const PRESELECT: usize = 8;

/// The patch features of a batch: one row per position of the finest stage's grid, each the
/// concatenation over stages of the locally averaged, channel-pooled features there.
///
/// Returns the rows (B·h·w × D, image-major then row-major positions) and the grid (h, w).
pub(crate) fn patch_features(
    maps: Vec<Tensor<4>>,
    config: &PatchMapConfig,
) -> Result<(Tensor<2>, (usize, usize))> {
    let Some((gh, gw)) = maps.iter().map(|m| (m.dims()[2], m.dims()[3])).max() else {
        return Err(Error::invalid("anomaly map stages", "no stage chosen"));
    };
    let n = config.neighbourhood;
    let mut parts = Vec::with_capacity(maps.len());
    for map in maps {
        let [b, c, h, w] = map.dims();
        let device = map.device();
        let mut x = if n > 1 {
            avg_pool2d(
                map,
                AvgPoolOptions::new([n, n])
                    .with_stride([1, 1])
                    .with_padding([n / 2, n / 2])
                    .with_count_include_pad(true),
            )
        } else {
            map
        };
        if (h, w) != (gh, gw) {
            x = interpolate(
                x,
                InterpolateOptions::new(InterpolateMode::Bilinear)
                    .with_align_corners(false)
                    .with_output_size([gh, gw]),
            );
        }
        let rows = x.permute([0, 2, 3, 1]).reshape([b * gh * gw, c]);
        let kept = config.channels_per_stage.min(c);
        parts.push(if kept < c {
            rows.matmul(channel_pooling(c, kept, &device))
        } else {
            rows
        });
    }
    Ok((Tensor::cat(parts, 1), (gh, gw)))
}

/// The `c` × `kept` matrix of an adaptive average over channel groups (PyTorch's
/// `adaptive_avg_pool1d` over channels): output t averages channels ⌊t·c/kept⌋ .. ⌈(t+1)·c/kept⌉.
fn channel_pooling(c: usize, kept: usize, device: &Device) -> Tensor<2> {
    let mut weights = vec![0f32; c * kept];
    for t in 0..kept {
        let start = t * c / kept;
        let end = ((t + 1) * c).div_ceil(kept);
        for ch in start..end {
            weights[ch * kept + t] = 1.0 / (end - start) as f32;
        }
    }
    Tensor::from_data(TensorData::new(weights, [c, kept]), device)
}

/// A uniform random sample of at most `capacity` rows of a stream (Vitter's algorithm R,
/// seeded): memory stays at `capacity` rows whatever the stream's length.
struct Reservoir {
    capacity: usize,
    seen: usize,
    /// The kept rows, concatenated.
    rows: Vec<f32>,
    rng: StdRng,
}

impl Reservoir {
    fn new(capacity: usize, seed: u64) -> Self {
        Self {
            capacity,
            seen: 0,
            rows: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Offers the next row of the stream (every row of the same length).
    fn offer(&mut self, row: &[f32]) {
        if self.seen < self.capacity {
            self.rows.extend_from_slice(row);
        } else {
            let slot = self.rng.random_range(0..=self.seen);
            if slot < self.capacity {
                self.rows[slot * row.len()..(slot + 1) * row.len()].copy_from_slice(row);
            }
        }
        self.seen += 1;
    }
}

/// The bank of normal patch features and its nearest-neighbour search.
#[derive(Debug, Clone)]
pub(crate) struct PatchBank {
    pub(crate) config: PatchMapConfig,
    /// M × D patch features.
    pub(crate) patches: Tensor<2>,
    pub(crate) knn: KnnScorer,
}

impl PatchBank {
    /// A bank over given patches (M × D), checked finite.
    pub(crate) fn new(config: PatchMapConfig, patches: Tensor<2>) -> Result<Self> {
        config.check()?;
        let knn = KnnScorer::new(patches.clone(), 1)?;
        Ok(Self {
            config,
            patches,
            knn,
        })
    }

    /// The patches of every image of `normal`: a uniform sample of at most
    /// `PRESELECT · max_patches` kept as they stream, then `config.max_patches` of those
    /// chosen by the greedy coreset.
    pub(crate) fn fit(
        encoder: &PreparedEncoder,
        normal: &dyn ImageSource,
        eval: &EvalTransform,
        batch_size: usize,
        config: &PatchMapConfig,
        device: &Device,
    ) -> Result<Self> {
        config.check()?;
        let n = normal.len();
        if n == 0 || batch_size == 0 {
            return Err(Error::invalid(
                "anomaly maps",
                "the patch bank needs at least one normal image (and a batch size ≥ 1)",
            ));
        }
        let capacity = config.max_patches.saturating_mul(PRESELECT);
        let mut reservoir = Reservoir::new(capacity, config.seed);
        let mut dim = 0;
        for start in (0..n).step_by(batch_size) {
            let indices: Vec<usize> = (start..(start + batch_size).min(n)).collect();
            let images = load_images(normal, &indices)?;
            let (_, maps) = encoder
                .try_forward_with_stages(eval.try_batch(&images, device)?, &config.stages)?;
            let (rows, _) = patch_features(maps, config)?;
            dim = rows.dims()[1];
            let values = crate::host::vec_from_tensor(rows)?;
            for row in values.chunks_exact(dim) {
                reservoir.offer(row);
            }
        }
        let kept = reservoir.rows;
        if let Some(i) = kept.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "the normal patch features".into(),
                detail: format!("row {}, column {} is {}", i / dim, i % dim, kept[i]),
            });
        }
        let chosen = greedy_coreset(&kept, dim, config.max_patches, config.seed);
        let mut bank = Vec::with_capacity(chosen.len() * dim);
        for &i in &chosen {
            bank.extend_from_slice(&kept[i * dim..(i + 1) * dim]);
        }
        let patches = Tensor::from_data(TensorData::new(bank, [chosen.len(), dim]), device);
        Self::new(config.clone(), patches)
    }

    /// The distance of each patch row (Q × D) to its nearest normal patch, on the host.
    pub(crate) fn distances(&self, rows: Tensor<2>) -> Result<Vec<f32>> {
        crate::host::vec_from_tensor(self.knn.score(rows)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reservoir_keeps_a_uniform_sample_of_its_capacity() {
        let mut reservoir = Reservoir::new(100, 3);
        for i in 0..10_000 {
            reservoir.offer(&[i as f32, -(i as f32)]);
        }
        assert_eq!(reservoir.rows.len(), 200);
        let kept: Vec<f32> = reservoir.rows.chunks_exact(2).map(|r| r[0]).collect();
        assert!(reservoir.rows.chunks_exact(2).all(|r| r[1] == -r[0]));
        // Uniform over the stream: the mean index is near the stream's 5,000 (σ ≈ 290).
        let mean = kept.iter().sum::<f32>() / kept.len() as f32;
        assert!((4_000.0..6_000.0).contains(&mean), "{mean}");
        let late = kept.iter().filter(|&&i| i >= 5_000.0).count();
        assert!((30..70).contains(&late), "{late}");
        // A short stream is kept whole, in order.
        let mut short = Reservoir::new(10, 0);
        for i in 0..4 {
            short.offer(&[i as f32]);
        }
        assert_eq!(short.rows, vec![0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn channel_pooling_averages_groups_as_adaptive_pooling_does() {
        let device = Device::flex();
        let pool = channel_pooling(5, 2, &device);
        let values = crate::host::vec_from_tensor(pool).unwrap();
        // adaptive_avg_pool1d(5 → 2): channels 0..3 and 2..5.
        let third = 1.0 / 3.0;
        assert_eq!(
            values,
            vec![third, 0.0, third, 0.0, third, third, 0.0, third, 0.0, third]
        );
    }
}
