//! Which parameters of the encoder train.
//!
//! The reference fine-tunes all of ResNet-18 but freezes `conv1`, `bn1`, `layer1` and `layer2`
//! of ResNet-152. A [`FreezePolicy`] freezes any leading run of the stages
//! (stem, layer1, ..., layer4): frozen parameters require no gradient, so
//! `GradientsParams::from_grads` holds none for them and the optimiser neither updates nor
//! decays them.

use burn::module::{Module, ParamGroup};

use super::{Arch, ResNet};

/// The parts of a ResNet in forward order.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Stage {
    /// `conv1` and `bn1`.
    Stem,
    /// `layer1`.
    Layer1,
    /// `layer2`.
    Layer2,
    /// `layer3`.
    Layer3,
    /// `layer4`.
    Layer4,
}

impl Stage {
    /// All stages in forward order.
    pub const ALL: [Stage; 5] = [
        Stage::Stem,
        Stage::Layer1,
        Stage::Layer2,
        Stage::Layer3,
        Stage::Layer4,
    ];

    /// The top-level module names of the stage (`["conv1", "bn1"]` for the stem).
    pub fn module_names(self) -> &'static [&'static str] {
        match self {
            Stage::Stem => &["conv1", "bn1"],
            Stage::Layer1 => &["layer1"],
            Stage::Layer2 => &["layer2"],
            Stage::Layer3 => &["layer3"],
            Stage::Layer4 => &["layer4"],
        }
    }
}

/// Freezes the stages up to and including `through`; the rest train.
///
/// ```
/// use msad::encoder::{Arch, FreezePolicy, Stage};
///
/// assert_eq!(FreezePolicy::reference(Arch::Resnet152), FreezePolicy::through(Stage::Layer2));
/// assert_eq!(FreezePolicy::reference(Arch::Resnet18), FreezePolicy::NONE);
/// assert!(FreezePolicy::through(Stage::Layer2).is_frozen("layer2.3.bn1.weight"));
/// assert!(!FreezePolicy::through(Stage::Layer2).is_frozen("layer3.0.conv1.weight"));
/// ```
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct FreezePolicy {
    through: Option<Stage>,
}

impl FreezePolicy {
    /// Nothing frozen.
    pub const NONE: FreezePolicy = FreezePolicy { through: None };

    /// Freeze every stage from the stem up to and including `stage`.
    pub fn through(stage: Stage) -> Self {
        Self {
            through: Some(stage),
        }
    }

    /// The reference code's choice: `conv1`, `bn1`, `layer1`, `layer2` for ResNet-152, nothing
    /// otherwise.
    pub fn reference(arch: Arch) -> Self {
        match arch {
            Arch::Resnet152 => Self::through(Stage::Layer2),
            _ => Self::NONE,
        }
    }

    /// The last frozen stage, if any.
    pub fn last_frozen(&self) -> Option<Stage> {
        self.through
    }

    /// The frozen stages in forward order.
    pub fn frozen_stages(&self) -> Vec<Stage> {
        Stage::ALL
            .into_iter()
            .filter(|s| self.through.is_some_and(|t| *s <= t))
            .collect()
    }

    /// Whether the parameter at `path` (a torchvision key or a burn module path such as
    /// `layer1.0.Basic.conv1.weight`) is frozen.
    pub fn is_frozen(&self, path: &str) -> bool {
        let head = path.split('.').next().unwrap_or_default();
        self.frozen_stages()
            .iter()
            .any(|s| s.module_names().contains(&head))
    }

    /// Applies the policy: frozen parameters stop requiring gradients; the others are left as
    /// they are.
    pub fn apply(&self, model: ResNet) -> ResNet {
        let names: Vec<&str> = self
            .frozen_stages()
            .iter()
            .flat_map(|s| s.module_names().iter().copied())
            .collect();
        if names.is_empty() {
            return model;
        }
        let pattern = format!(r"^({})\.", names.join("|"));
        let group = ParamGroup::from_regex(&pattern).expect("a fixed, valid pattern");
        model.set_require_grad_group(group, false)
    }
}
