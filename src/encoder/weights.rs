//! torchvision checkpoints → [`ResNet`].
//!
//! Reads a torchvision `state_dict` as `torch.save` writes it (`.pth`, zip or legacy pickle) or
//! the same keys as `.safetensors`, through burn's store, with no conversion step: the official
//! files (`resnet18-f37072fd.pth`, `resnet152-394f9c45.pth`, ...) load as they are.
//!
//! Before any weight is applied, every key and shape is checked against the layout: a missing
//! key, an unexpected key or a shape mismatch is an [`Error`] naming the key and both shapes.
//! `fc.*` (the classifier MSC drops) and `*.num_batches_tracked` are ignored. Once applied,
//! every value is checked: a NaN or infinite weight ([`Error::NonFinite`]) or a negative
//! BatchNorm `running_var` ([`Error::Checkpoint`]) is an error naming the file, the key, the
//! value and its index, never a model that answers NaN.
//!
//! ```no_run
//! # fn main() -> msad::Result<()> {
//! use msad::encoder::ResNet;
//! use msad::encoder::weights::Checkpoint;
//!
//! let device = burn::tensor::Device::flex();
//! // The architecture is inferred from the keys...
//! let encoder = ResNet::from_torchvision("resnet18-f37072fd.pth", &device)?;
//! // ...or inspected first.
//! let checkpoint = Checkpoint::open("resnet152-394f9c45.pth")?;
//! println!("{:?}", checkpoint.infer_config()?.arch());
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::store::{
    ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter, PytorchStore, SafetensorsStore,
};
use burn::tensor::{Bool, DType, Device, Tensor};

use super::{BlockKind, MAX_BLOCKS_PER_STAGE, ResNet, ResNetConfig};
use crate::{Error, Result};

/// The on-disk formats [`Checkpoint`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// `torch.save` output: a zip archive (PyTorch ≥ 1.6) or a legacy pickle.
    Pytorch,
    /// A `.safetensors` file with torchvision's key names.
    Safetensors,
}

/// Our module paths differ from torchvision's keys only in the downsample shortcut.
const REMAPS: [(&str, &str, &str); 2] = [
    (r"\.downsample\.0\.", ".downsample.conv.", ".downsample.0."),
    (r"\.downsample\.1\.", ".downsample.bn.", ".downsample.1."),
];

/// Back from our module path to the torchvision key.
fn torchvision_key(path: &str) -> String {
    REMAPS
        .iter()
        .fold(path.to_string(), |p, (_, ours, theirs)| {
            p.replace(ours, theirs)
        })
}

/// Keys every torchvision checkpoint has that MSC does not use.
fn is_ignored(key: &str) -> bool {
    key.starts_with("fc.") || key.ends_with(".num_batches_tracked")
}

enum Store {
    Pytorch(Box<PytorchStore>),
    Safetensors(Box<SafetensorsStore>),
}

/// An opened checkpoint: its format and the shape of every tensor, by torchvision key.
pub struct Checkpoint {
    path: PathBuf,
    format: CheckpointFormat,
    shapes: BTreeMap<String, Vec<usize>>,
    store: Store,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("tensors", &self.shapes.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens a `.pth` / `.pt` or `.safetensors` file (the format is read from the file's first
    /// bytes) and lists its tensors. A missing, truncated or foreign file is an
    /// [`Error::Io`] or [`Error::Checkpoint`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let format = sniff_format(&path)?;
        let bad = |reason: String| Error::Checkpoint {
            path: path.clone(),
            reason,
        };
        let mut store = match format {
            CheckpointFormat::Pytorch => {
                let store = REMAPS.iter().fold(PytorchStore::from_file(&path), |s, r| {
                    s.with_key_remapping(r.0, r.1)
                });
                Store::Pytorch(Box::new(store.map_indices_contiguous(false)))
            }
            CheckpointFormat::Safetensors => {
                let store = REMAPS
                    .iter()
                    .fold(SafetensorsStore::from_file(&path), |s, r| {
                        s.with_key_remapping(r.0, r.1)
                    });
                Store::Safetensors(Box::new(
                    store
                        .with_from_adapter(PyTorchToBurnAdapter)
                        .skip_enum_variants(true),
                ))
            }
        };
        // The readers are third-party parsers of untrusted bytes: a panic in one is reported
        // as an unreadable checkpoint rather than brought down on the caller.
        let listed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let tensors = match &mut store {
                Store::Pytorch(s) => s.get_all_tensors().map_err(|e| e.to_string())?,
                Store::Safetensors(s) => s.get_all_tensors().map_err(|e| e.to_string())?,
            };
            Ok::<_, String>(
                tensors
                    .iter()
                    .map(|(name, t)| (torchvision_key(name), t.dtype, t.shape.to_vec()))
                    .collect::<Vec<_>>(),
            )
        }))
        .map_err(|_| bad("the reader failed on this file".into()))?
        .map_err(bad)?;
        if listed.is_empty() {
            return Err(bad("no tensors found".into()));
        }
        let mut shapes = BTreeMap::new();
        for (key, dtype, shape) in listed {
            if !is_ignored(&key) && dtype != DType::F32 {
                return Err(bad(format!(
                    "key `{key}` is stored as {dtype:?}; msad loads float32 weights"
                )));
            }
            shapes.insert(key, shape);
        }
        Ok(Self {
            path,
            format,
            shapes,
            store,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its format.
    pub fn format(&self) -> CheckpointFormat {
        self.format
    }

    /// Every tensor's shape, by torchvision key (`fc.*` included).
    pub fn shapes(&self) -> &BTreeMap<String, Vec<usize>> {
        &self.shapes
    }

    /// Infers the layout from the keys ([`ResNetConfig::from_torchvision_shapes`]). Returns a
    /// torchvision preset when the file is one (check with [`ResNetConfig::arch`]).
    pub fn infer_config(&self) -> Result<ResNetConfig> {
        ResNetConfig::from_torchvision_shapes(&self.shapes).map_err(|e| {
            Error::UnknownArchitecture {
                path: self.path.clone(),
                reason: match e {
                    Error::InvalidArgument { reason, .. } => reason,
                    other => other.to_string(),
                },
            }
        })
    }

    /// Checks every key and shape against `config`: the first problem in key order is returned
    /// as [`Error::MissingKey`], [`Error::ShapeMismatch`] or [`Error::UnexpectedKey`].
    pub fn check(&self, config: &ResNetConfig) -> Result<()> {
        config.validate()?;
        let expected: BTreeMap<String, Vec<usize>> =
            config.torchvision_keys().into_iter().collect();
        for (key, shape) in &expected {
            match self.shapes.get(key) {
                None => {
                    return Err(Error::MissingKey {
                        path: self.path.clone(),
                        key: key.clone(),
                        expected: shape.clone(),
                    });
                }
                Some(found) if found != shape => {
                    return Err(Error::ShapeMismatch {
                        path: self.path.clone(),
                        key: key.clone(),
                        expected: shape.clone(),
                        found: found.clone(),
                    });
                }
                Some(_) => {}
            }
        }
        if let Some((key, found)) = self
            .shapes
            .iter()
            .find(|(k, _)| !is_ignored(k) && !expected.contains_key(*k))
        {
            return Err(Error::UnexpectedKey {
                path: self.path.clone(),
                key: key.clone(),
                found: found.clone(),
            });
        }
        Ok(())
    }

    /// Builds the ResNet for `config` on `device` and loads the weights, after
    /// [`Checkpoint::check`]. A NaN or infinite value is an [`Error::NonFinite`], a negative
    /// BatchNorm `running_var` an [`Error::Checkpoint`], each naming the key.
    pub fn load(self, config: &ResNetConfig, device: &Device) -> Result<ResNet> {
        self.check(config)?;
        let path = self.path.clone();
        let model = self.apply(config.build(device)?)?;
        super::initialise_in_order(&model);
        check_weight_values(&model, &path)?;
        Ok(model)
    }

    /// Builds the ResNet of the inferred layout ([`Checkpoint::infer_config`]) and loads it.
    pub fn load_inferred(self, device: &Device) -> Result<(ResNet, ResNetConfig)> {
        let config = self.infer_config()?;
        let model = self.load(&config, device)?;
        Ok((model, config))
    }

    fn apply(mut self, mut model: ResNet) -> Result<ResNet> {
        let path = self.path.clone();
        let failed = |reason: String| Error::Checkpoint {
            path: path.clone(),
            reason,
        };
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &mut self.store {
                Store::Pytorch(s) => model.load_from(s.as_mut()).map_err(|e| e.to_string()),
                Store::Safetensors(s) => model.load_from(s.as_mut()).map_err(|e| e.to_string()),
            }))
            .map_err(|_| failed("the reader failed while loading tensors".into()))?
            .map_err(failed)?;
        if let Some(err) = result.errors.first() {
            return Err(failed(err.to_string()));
        }
        if let Some((missing, _)) = result.missing.first() {
            return Err(failed(format!("parameter `{missing}` was not loaded")));
        }
        if let Some(unused) = result
            .unused
            .iter()
            .find(|k| !is_ignored(&torchvision_key(k)))
        {
            return Err(failed(format!(
                "tensor `{}` was not used",
                torchvision_key(unused)
            )));
        }
        Ok(model)
    }
}

/// Checks the values of every weight of `model`, as loaded from the file `path`: every float
/// finite, every BatchNorm `running_var` at least 0 (its square root divides). The first
/// offender in the module's order is an error naming the file, its torchvision key, the value
/// and its index (row-major):
///
/// - a NaN or ±inf value: [`Error::NonFinite`], e.g. "resnet18.pth: tensor
///   `layer2.0.conv1.weight` is not finite: value 5 (row-major) is NaN";
/// - a negative variance: [`Error::Checkpoint`], e.g. "resnet18.pth: not a readable checkpoint:
///   tensor `layer1.0.bn1.running_var` has a negative value (-0.5) at index 3".
///
/// On the device: one reduction per tensor and a single read-back of the verdict; a tensor is
/// read back only to name an offender.
pub(crate) fn check_weight_values(model: &ResNet, path: &Path) -> Result<()> {
    let mut tensors = Flattened::default();
    model.visit(&mut tensors);
    let flags: Vec<Tensor<1, Bool>> = tensors
        .found
        .iter()
        .flat_map(|(key, values)| {
            let non_finite = values.clone().is_finite().bool_not().any();
            let negative = is_variance(key).then(|| values.clone().lower_elem(0.0).any());
            std::iter::once(non_finite).chain(negative)
        })
        .collect();
    if flags.is_empty() || !Tensor::cat(flags, 0).any().into_scalar::<bool>() {
        return Ok(());
    }
    for (key, values) in tensors.found {
        let values = crate::host::vec_from_tensor(values)?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: format!("{}: tensor `{key}`", path.display()),
                detail: format!("value {i} (row-major) is {}", values[i]),
            });
        }
        if is_variance(&key)
            && let Some(i) = values.iter().position(|v| *v < 0.0)
        {
            return Err(Error::Checkpoint {
                path: path.to_path_buf(),
                reason: format!(
                    "tensor `{key}` has a negative value ({}) at index {i}",
                    values[i]
                ),
            });
        }
    }
    Err(Error::Backend(format!(
        "{}: the device flagged a non-finite weight or a negative running_var that the values \
         read back do not hold",
        path.display()
    )))
}

/// Whether a torchvision key is a BatchNorm's running variance.
fn is_variance(key: &str) -> bool {
    key.ends_with(".running_var")
}

/// Every float tensor of a module, flattened, by torchvision key.
#[derive(Default)]
struct Flattened {
    /// The module path; `None` for an enum's variant, which torchvision's keys do not name.
    path: Vec<Option<String>>,
    found: Vec<(String, Tensor<1>)>,
}

impl ModuleVisitor for Flattened {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path
            .push((!container_type.starts_with("Enum:")).then(|| name.to_string()));
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let mut path: Vec<&str> = self.path.iter().flatten().map(String::as_str).collect();
        // burn's BatchNorm calls torchvision's `weight` and `bias` `gamma` and `beta`.
        if let Some(last) = path.last_mut() {
            *last = match *last {
                "gamma" => "weight",
                "beta" => "bias",
                other => other,
            };
        }
        let values = param.val();
        let count = values.shape().num_elements();
        self.found
            .push((torchvision_key(&path.join(".")), values.reshape([count])));
    }
}

/// Tells the format from the first bytes: a zip archive or a pickle is `torch.save` output; an
/// 8-byte little-endian header length followed by `{` is safetensors.
fn sniff_format(path: &Path) -> Result<CheckpointFormat> {
    let mut head = [0u8; 9];
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let n = file.read(&mut head).map_err(|e| Error::io(path, e))?;
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") || head.first() == Some(&0x80) {
        return Ok(CheckpointFormat::Pytorch);
    }
    if n == 9 && head[8] == b'{' {
        let header = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        if header.saturating_add(8) <= len {
            return Ok(CheckpointFormat::Safetensors);
        }
        return Err(Error::Checkpoint {
            path: path.into(),
            reason: format!(
                "safetensors header of {header} bytes in a file of {len} bytes (truncated?)"
            ),
        });
    }
    Err(Error::Checkpoint {
        path: path.into(),
        reason: "neither a torch.save file (zip or pickle) nor safetensors".into(),
    })
}

impl ResNet {
    /// Loads a torchvision checkpoint (`.pth` or `.safetensors`), inferring the architecture
    /// from its keys.
    ///
    /// ```no_run
    /// # fn main() -> msad::Result<()> {
    /// let device = burn::tensor::Device::flex();
    /// let encoder = msad::encoder::ResNet::from_torchvision("resnet152-394f9c45.pth", &device)?;
    /// assert_eq!(encoder.feature_dim(), 2048);
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_torchvision(path: impl AsRef<Path>, device: &Device) -> Result<ResNet> {
        Checkpoint::open(path)?
            .load_inferred(device)
            .map(|(m, _)| m)
    }
}

impl ResNetConfig {
    /// Infers the layout of a torchvision `state_dict` from its keys and shapes: the block
    /// design from `layer1.0.conv3`, block counts from the highest block index of each stage,
    /// widths from `conv1` and the first conv of each stage. Whether every other key fits is
    /// [`Checkpoint::check`]'s business.
    ///
    /// ```
    /// use msad::encoder::{Arch, ResNetConfig};
    /// let shapes = ResNetConfig::from_arch(Arch::Resnet34).torchvision_keys().into_iter().collect();
    /// assert_eq!(ResNetConfig::from_torchvision_shapes(&shapes)?.arch(), Some(Arch::Resnet34));
    /// # Ok::<(), msad::Error>(())
    /// ```
    pub fn from_torchvision_shapes(shapes: &BTreeMap<String, Vec<usize>>) -> Result<ResNetConfig> {
        let unknown = |reason: String| Error::invalid("torchvision state_dict", reason);
        let stem = shapes
            .get("conv1.weight")
            .and_then(|s| s.first().copied())
            .ok_or_else(|| {
                unknown("no `conv1.weight`: not a torchvision ResNet state_dict".into())
            })?;
        let block = if shapes.contains_key("layer1.0.conv3.weight") {
            BlockKind::Bottleneck
        } else {
            BlockKind::Basic
        };
        let mut layers = [0; 4];
        let mut widths = [0; 4];
        for stage in 0..4 {
            let prefix = format!("layer{}.", stage + 1);
            let mut blocks = 0;
            for key in shapes.keys() {
                let Some(index) = key
                    .strip_prefix(&prefix)
                    .and_then(|rest| rest.split('.').next()?.parse::<usize>().ok())
                else {
                    continue;
                };
                // Refused here, by name: the layout's key list (`check`) has entries per block.
                if index >= MAX_BLOCKS_PER_STAGE {
                    return Err(unknown(format!(
                        "key `{key}` names block {index}; a stage has at most \
                         {MAX_BLOCKS_PER_STAGE} blocks"
                    )));
                }
                blocks = blocks.max(index + 1);
            }
            layers[stage] = blocks;
            let first = format!("{prefix}0.conv1.weight");
            widths[stage] = shapes
                .get(&first)
                .and_then(|s| s.first().copied())
                .ok_or_else(|| unknown(format!("no `{first}`")))?;
        }
        let config = ResNetConfig::new(block, layers)
            .with_stem_width(stem)
            .with_widths(widths);
        config.validate().map_err(|e| unknown(e.to_string()))?;
        Ok(config)
    }

    /// Builds this layout and loads a torchvision checkpoint into it, refusing a file whose
    /// keys or shapes differ.
    ///
    /// ```no_run
    /// # fn main() -> msad::Result<()> {
    /// use msad::encoder::{Arch, ResNetConfig};
    /// let device = burn::tensor::Device::flex();
    /// let encoder = ResNetConfig::from_arch(Arch::Resnet18)
    ///     .init_from_torchvision("resnet18-f37072fd.pth", &device)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn init_from_torchvision(&self, path: impl AsRef<Path>, device: &Device) -> Result<ResNet> {
        Checkpoint::open(path)?.load(self, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remapped_paths_round_trip_to_torchvision_keys() {
        assert_eq!(
            torchvision_key("layer2.0.downsample.conv.weight"),
            "layer2.0.downsample.0.weight"
        );
        assert_eq!(
            torchvision_key("layer2.0.downsample.bn.running_var"),
            "layer2.0.downsample.1.running_var"
        );
        assert_eq!(
            torchvision_key("layer1.0.conv1.weight"),
            "layer1.0.conv1.weight"
        );
    }

    #[test]
    fn ignored_keys() {
        assert!(is_ignored("fc.weight"));
        assert!(is_ignored("layer1.0.bn1.num_batches_tracked"));
        assert!(!is_ignored("layer1.0.bn1.running_mean"));
    }
}
