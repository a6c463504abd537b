//! In-memory images shared between splits: a selection of indices into one decoded set.

use std::sync::Arc;

use image::RgbImage;

use super::ImageSource;
use crate::{Error, Result};

/// A selection of images held in memory, named `<dataset>:<split>:<original index>`.
///
/// The pixels are shared ([`Arc`]) with the dataset they come from: making a split copies
/// indices, not images; [`ImageSource::get`] copies one image.
pub(crate) struct InMemorySubset {
    /// `<dataset>:<split>`, e.g. `cifar10:test`.
    prefix: String,
    images: Arc<[RgbImage]>,
    indices: Vec<usize>,
}

impl InMemorySubset {
    /// The images of `images` at `indices` (each below `images.len()`).
    pub(crate) fn new(
        prefix: impl Into<String>,
        images: Arc<[RgbImage]>,
        indices: Vec<usize>,
    ) -> Self {
        debug_assert!(indices.iter().all(|&i| i < images.len()));
        Self {
            prefix: prefix.into(),
            images,
            indices,
        }
    }
}

impl ImageSource for InMemorySubset {
    fn len(&self) -> usize {
        self.indices.len()
    }

    fn get(&self, index: usize) -> Result<RgbImage> {
        self.indices
            .get(index)
            .and_then(|&i| self.images.get(i))
            .cloned()
            .ok_or_else(|| {
                Error::invalid(
                    "image index",
                    format!(
                        "{index} is out of range for the {} images of {}",
                        self.len(),
                        self.prefix
                    ),
                )
            })
    }

    fn name(&self, index: usize) -> String {
        match self.indices.get(index) {
            Some(original) => format!("{}:{original}", self.prefix),
            None => format!("{}:<index {index} out of range>", self.prefix),
        }
    }
}
