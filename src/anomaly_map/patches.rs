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

/// At most this many times `max_patches` patches are drawn (uniformly at random) before the
/// greedy coreset chooses among them: it bounds both fitting's memory and the coreset's time.
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

    /// The patches of every image of `normal`, drawn down to at most
    /// `PRESELECT · max_patches` uniformly at random as they stream, then to
    /// `config.max_patches` by the greedy coreset.
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
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut kept: Vec<f32> = Vec::new();
        let mut dim = 0;
        let mut keep_fraction = 1.0f64;
        for start in (0..n).step_by(batch_size) {
            let indices: Vec<usize> = (start..(start + batch_size).min(n)).collect();
            let images = load_images(normal, &indices)?;
            let (_, maps) = encoder
                .try_forward_with_stages(eval.try_batch(&images, device)?, &config.stages)?;
            let (rows, (gh, gw)) = patch_features(maps, config)?;
            dim = rows.dims()[1];
            if start == 0 {
                let total = (n * gh * gw) as f64;
                let budget = config.max_patches.saturating_mul(PRESELECT) as f64;
                keep_fraction = (budget / total).min(1.0);
            }
            let values = crate::host::vec_from_tensor(rows)?;
            for row in values.chunks_exact(dim) {
                if keep_fraction >= 1.0 || rng.random::<f64>() < keep_fraction {
                    kept.extend_from_slice(row);
                }
            }
        }
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
