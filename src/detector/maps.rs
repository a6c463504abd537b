//! The detector's anomaly maps: the patch bank's fitting and the maps of images and streams
//! (the method is [`crate::anomaly_map`]'s).

use image::RgbImage;
use rayon::prelude::*;

use super::{BatchStream, Detector, decode_each, scored};
use crate::anomaly_map::{
    AnomalyMap, PatchBank, PatchMapConfig, map_from_distances, patch_features,
};
use crate::augment::check_image_named;
use crate::data::ImageSource;
use crate::encoder::l2_normalize;
use crate::{Error, Result};

impl Detector {
    /// Builds the bank of normal patches that anomaly maps are measured against, from
    /// `normal` (the images the detector was fitted on, or more like them) through the
    /// detector's fine-tuned encoder, and keeps it (saved and loaded with the detector).
    ///
    /// Errors: those of the images; [`Error::InvalidArgument`] for unusable settings or no
    /// images; [`Error::NonFinite`] for non-finite patch features.
    pub fn fit_anomaly_maps(
        &mut self,
        normal: &dyn ImageSource,
        config: &PatchMapConfig,
    ) -> Result<()> {
        self.patch_bank = Some(PatchBank::fit(
            &self.encoder,
            normal,
            &self.eval,
            self.eval_batch_size,
            config,
            &self.device,
        )?);
        Ok(())
    }

    /// The anomaly maps' settings, when the detector has a patch bank.
    pub fn anomaly_map_config(&self) -> Option<&PatchMapConfig> {
        self.patch_bank.as_ref().map(|bank| &bank.config)
    }

    /// The number of normal patches in the bank (0 without one).
    pub fn patch_bank_len(&self) -> usize {
        self.patch_bank
            .as_ref()
            .map_or(0, |bank| bank.patches.dims()[0])
    }

    /// Where `image` is anomalous: a map at its resolution whose maximum is its normalised
    /// score (see [`crate::anomaly_map`]), from the same forward pass as its score.
    ///
    /// Errors: those of [`Detector::score_image`]; [`Error::InvalidArgument`] when the
    /// detector has no patch bank ([`Detector::fit_anomaly_maps`]).
    pub fn anomaly_map(&self, image: &RgbImage) -> Result<AnomalyMap> {
        let mut maps = self.anomaly_maps(std::slice::from_ref(image))?;
        maps.pop()
            .ok_or_else(|| Error::Backend("no anomaly map for one image".into()))
    }

    /// [`Detector::anomaly_map`] of several images, in one batch (a batch of the configured
    /// evaluation size at a time). Strict: one bad image fails the call;
    /// [`Detector::anomaly_map_each`] goes on past it.
    pub fn anomaly_maps(&self, images: &[RgbImage]) -> Result<Vec<AnomalyMap>> {
        for (i, image) in images.iter().enumerate() {
            check_image_named(image, || format!("image {i}"))?;
        }
        self.maps_or_errors(images)?.into_iter().collect()
    }

    /// The maps of `images` (checked non-empty by the caller), a batch of the evaluation size
    /// at a time: `Err` when a batch cannot run at all (no patch bank or calibration, a backend
    /// failure), else one result per image, an image whose score or distances are not finite
    /// failing alone.
    fn maps_or_errors(&self, images: &[RgbImage]) -> Result<Vec<Result<AnomalyMap>>> {
        let bank = self.require_patch_bank()?;
        let calibration = *self.require_calibration()?;
        let mut out = Vec::with_capacity(images.len());
        for (c, chunk) in images.chunks(self.eval_batch_size).enumerate() {
            let batch = self.eval.try_batch(chunk, &self.device)?;
            let (pooled, stage_maps) = self
                .encoder
                .try_forward_with_stages(batch, &bank.config.stages)?;
            let raw = self.score_features(l2_normalize(pooled))?;
            let (rows, (gh, gw)) = patch_features(stage_maps, &bank.config)?;
            let distances = bank.distances(rows)?;
            let cells = gh * gw;
            let first = c * self.eval_batch_size;
            let maps: Vec<Result<AnomalyMap>> = chunk
                .par_iter()
                .enumerate()
                .map(|(i, image)| {
                    let what = format!("the score of image {}", first + i);
                    map_from_distances(
                        &distances[i * cells..(i + 1) * cells],
                        (gh, gw),
                        image,
                        &self.eval,
                        &bank.config,
                        scored(raw[i], &calibration, &what)?,
                    )
                })
                .collect();
            out.extend(maps);
        }
        Ok(out)
    }

    /// Every image of `source` mapped as a stream, in order: one [`MapResult`] per image, where
    /// an unreadable, empty or too large image is an error for that image only. Memory holds
    /// one batch of decoded images and their maps.
    pub fn anomaly_map_each<'a>(&'a self, source: &'a dyn ImageSource) -> MapStream<'a> {
        BatchStream::new(self, source, Self::map_batch)
    }

    /// The patch bank, or an error saying how to get one.
    fn require_patch_bank(&self) -> Result<&PatchBank> {
        self.patch_bank.as_ref().ok_or_else(|| {
            Error::invalid(
                "detector",
                "has no patch bank for anomaly maps: call fit_anomaly_maps with the normal images",
            )
        })
    }

    /// The results of images `start..end` of `source`, in order.
    fn map_batch(&self, source: &dyn ImageSource, start: usize, end: usize) -> Vec<MapResult> {
        let decoded = decode_each(source, start..end, Ok);
        let good: Vec<RgbImage> = decoded
            .iter()
            .filter_map(|(_, image)| image.as_ref().ok().cloned())
            .collect();
        // Without a patch bank or calibration every image gets that error (as the score
        // stream does); a batch that fails to run gives each image the backend's error.
        let not_ready = self
            .require_patch_bank()
            .and(self.require_calibration())
            .err()
            .map(|e| e.to_string());
        let mut maps = match &not_ready {
            Some(_) => Ok(Vec::new().into_iter()),
            None => self
                .maps_or_errors(&good)
                .map(Vec::into_iter)
                .map_err(|e| e.to_string()),
        };
        decoded
            .into_iter()
            .enumerate()
            .map(|(offset, (name, image))| {
                let outcome = match (image, &not_ready, &mut maps) {
                    (Err(e), _, _) => Err(e),
                    (Ok(_), Some(message), _) => Err(Error::invalid("detector", message.clone())),
                    (Ok(_), None, Err(message)) => Err(Error::Backend(message.clone())),
                    (Ok(_), None, Ok(maps)) => maps
                        .next()
                        .unwrap_or_else(|| Err(Error::Backend("missing anomaly map".into()))),
                };
                MapResult {
                    index: start + offset,
                    name,
                    outcome,
                }
            })
            .collect()
    }
}

/// The anomaly map of one image of a source ([`Detector::anomaly_map_each`]).
#[derive(Debug)]
pub struct MapResult {
    /// The image's index in the source.
    pub index: usize,
    /// The image's name in the source (its path, for folders).
    pub name: String,
    /// Its map, or why it has none.
    pub outcome: Result<AnomalyMap>,
}

/// The stream of [`Detector::anomaly_map_each`]: one [`MapResult`] per image.
pub type MapStream<'a> = BatchStream<'a, MapResult>;
