//! Picking a compute device by name: `auto`, `wgpu`, `flex` or `ndarray`.
//!
//! burn 0.22 chooses the backend at run time through [`burn::tensor::Device`]; this module turns
//! the names users type on a command line into a device, and says which adapter it got.
//!
//! | name      | backend                                   | cargo feature |
//! |-----------|-------------------------------------------|---------------|
//! | `wgpu`    | GPU through wgpu (Vulkan, Metal, DX12); on a machine without a GPU the Vulkan CPU driver (Mesa lavapipe) if installed | `wgpu` |
//! | `flex`    | burn's fast pure-Rust CPU backend          | `flex` |
//! | `ndarray` | burn's portable CPU fallback               | `ndarray` |
//! | `auto`    | `wgpu` on a real GPU adapter, else `flex`, else `ndarray`, else any `wgpu` adapter | — |
//!
//! ```
//! # fn main() -> msad::Result<()> {
//! let selected = msad::device::select("auto")?;
//! println!("running on {selected}");
//! let x = burn::tensor::Tensor::<2>::ones([2, 3], selected.device());
//! assert_eq!(x.dims(), [2, 3]);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

use crate::{Error, Result};

/// The compute backends msad can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// GPUs (and Vulkan CPU drivers) through wgpu.
    Wgpu,
    /// burn's pure-Rust CPU backend.
    Flex,
    /// burn's ndarray CPU backend.
    NdArray,
}

impl Backend {
    /// The backends compiled into this build, in `auto`'s order of preference for CPUs.
    ///
    /// ```
    /// assert!(!msad::device::Backend::enabled().is_empty());
    /// ```
    pub fn enabled() -> Vec<Backend> {
        let mut out = Vec::new();
        if cfg!(feature = "flex") {
            out.push(Backend::Flex);
        }
        if cfg!(feature = "ndarray") {
            out.push(Backend::NdArray);
        }
        if cfg!(feature = "wgpu") {
            out.push(Backend::Wgpu);
        }
        out
    }

    /// The name used on command lines (`wgpu`, `flex`, `ndarray`).
    pub fn name(self) -> &'static str {
        match self {
            Backend::Wgpu => "wgpu",
            Backend::Flex => "flex",
            Backend::NdArray => "ndarray",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A device request as users write it: `auto`, `wgpu`, `flex` or `ndarray`.
///
/// ```
/// use msad::device::DeviceRequest;
/// let req: DeviceRequest = "flex".parse()?;
/// assert_eq!(req, DeviceRequest::Backend(msad::device::Backend::Flex));
/// assert!("cuda".parse::<DeviceRequest>().is_err());
/// # Ok::<(), msad::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceRequest {
    /// A GPU if there is one, else the fastest CPU backend built in.
    Auto,
    /// That backend, or an error if it is not built in or has no adapter.
    Backend(Backend),
}

impl FromStr for DeviceRequest {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceRequest::Auto),
            "wgpu" | "gpu" => Ok(DeviceRequest::Backend(Backend::Wgpu)),
            "flex" | "cpu" => Ok(DeviceRequest::Backend(Backend::Flex)),
            "ndarray" => Ok(DeviceRequest::Backend(Backend::NdArray)),
            other => Err(Error::invalid(
                "device name",
                format!("`{other}`; expected one of auto, wgpu, flex, ndarray"),
            )),
        }
    }
}

/// A device with the backend it runs on and a description of its adapter.
#[derive(Clone, Debug)]
pub struct SelectedDevice {
    device: Device,
    backend: Backend,
    adapter: String,
}

impl SelectedDevice {
    /// The burn device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The backend behind it.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The adapter, e.g. `NVIDIA H200 (DiscreteGpu, Vulkan)` or `CPU (flex)`.
    pub fn adapter(&self) -> &str {
        &self.adapter
    }

    /// The burn device, by value.
    pub fn into_device(self) -> Device {
        self.device
    }
}

impl fmt::Display for SelectedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.backend, self.adapter)
    }
}

/// Picks a device by name (`auto`, `wgpu`, `flex`, `ndarray`).
///
/// `auto` takes wgpu on a discrete, integrated or virtual GPU adapter, else flex, else ndarray,
/// else wgpu on a CPU adapter (lavapipe). Asking for a backend that is not compiled in, or for
/// `wgpu` on a machine without any wgpu adapter, is an [`Error::DeviceUnavailable`].
///
/// ```
/// # fn main() -> msad::Result<()> {
/// let flex = msad::device::select("flex")?;
/// assert_eq!(flex.backend(), msad::device::Backend::Flex);
/// # Ok(())
/// # }
/// ```
pub fn select(name: &str) -> Result<SelectedDevice> {
    select_request(name.parse()?)
}

/// [`select`] for an already parsed request.
pub fn select_request(request: DeviceRequest) -> Result<SelectedDevice> {
    match request {
        DeviceRequest::Backend(backend) => select_backend(backend),
        DeviceRequest::Auto => {
            #[cfg(feature = "wgpu")]
            if let Some(adapter) = wgpu_probe::adapters().iter().find(|a| a.is_gpu()) {
                return Ok(adapter.select());
            }
            for backend in [Backend::Flex, Backend::NdArray, Backend::Wgpu] {
                if let Ok(selected) = select_backend(backend) {
                    return Ok(selected);
                }
            }
            Err(Error::DeviceUnavailable {
                name: "auto".into(),
                reason: "no backend feature (wgpu, flex, ndarray) is enabled".into(),
            })
        }
    }
}

/// A piece of msad's work, as [`route`] tells where it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Work {
    /// A ResNet forward pass whose result is not differentiated (features, scores).
    Inference,
    /// A fine-tuning step: forward, loss and backward of the encoder.
    TrainingStep,
    /// The Mean-Shifted Contrastive loss (value and, on autodiff devices, its gradient).
    Loss,
    /// The kNN search.
    Knn,
}

/// Which implementation computes a piece of work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// msad's CPU engines ([`crate::cpu`]), on the tensors' host memory.
    Cpu,
    /// The backend's tensor operations: the specification, on any device.
    TensorOps,
}

/// The one rule for where msad's work runs; every backend-generic module asks it.
///
/// The CPU engines serve a device whose tensors live in host memory (flex or ndarray, with
/// or without autodiff). The one exception is [`Work::Inference`] on an autodiff device: its
/// output must be recorded for autodiff, and the inference engine has no backward (the loss
/// registers its own backward with burn; a training step runs its own). Everywhere else, and
/// on every wgpu device, the tensor path runs.
///
/// Where the rule picks [`Route::Cpu`] but an engine cannot serve the request (a ResNet layout
/// it does not cover), the engine says so with [`Error::Unsupported`] when it is built and the
/// caller falls back to the tensor path, logging the error once (see
/// `encoder::cpu_bridge`).
pub(crate) fn route(device: &Device, work: Work) -> Route {
    if !computes_on_host(device) || (work == Work::Inference && device.is_autodiff()) {
        Route::TensorOps
    } else {
        Route::Cpu
    }
}

/// Whether `device` computes on the host CPU with host memory (flex or ndarray, autodiff or not),
/// so that msad's CPU engines can work on its data directly.
fn computes_on_host(device: &Device) -> bool {
    let plain = device.clone().without_autodiff();
    #[cfg(feature = "flex")]
    if plain == Device::flex() {
        return true;
    }
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)]
    if plain == Device::ndarray() {
        return true;
    }
    let _ = plain;
    false
}

#[allow(dead_code)] // unused when every backend is built in
fn not_built(backend: Backend) -> Error {
    Error::DeviceUnavailable {
        name: backend.name().into(),
        reason: format!("msad was built without the `{}` feature", backend.name()),
    }
}

fn select_backend(backend: Backend) -> Result<SelectedDevice> {
    match backend {
        Backend::Flex => {
            #[cfg(feature = "flex")]
            return Ok(SelectedDevice {
                device: Device::flex(),
                backend,
                adapter: format!("CPU ({} threads)", rayon::current_num_threads()),
            });
            #[allow(unreachable_code)]
            Err(not_built(backend))
        }
        Backend::NdArray => {
            #[cfg(feature = "ndarray")]
            #[allow(deprecated)]
            // burn 0.22 deprecates ndarray in favour of flex; we keep it as the fallback.
            return Ok(SelectedDevice {
                device: Device::ndarray(),
                backend,
                adapter: format!("CPU ({} threads)", rayon::current_num_threads()),
            });
            #[allow(unreachable_code)]
            Err(not_built(backend))
        }
        Backend::Wgpu => {
            #[cfg(feature = "wgpu")]
            return wgpu_probe::adapters()
                .first()
                .map(wgpu_probe::Adapter::select)
                .ok_or_else(|| Error::DeviceUnavailable {
                    name: "wgpu".into(),
                    reason: "no wgpu adapter found (on a machine without a GPU, install Mesa's \
                             Vulkan drivers, Debian package mesa-vulkan-drivers)"
                        .into(),
                });
            #[allow(unreachable_code)]
            Err(not_built(backend))
        }
    }
}

#[cfg(feature = "wgpu")]
mod wgpu_probe {
    //! Lists wgpu adapters once per process, without initialising burn's runtime, so that a
    //! machine with no adapter gives an error instead of a panic inside the runtime.

    use std::sync::OnceLock;

    use burn::tensor::wgpu::wgpu;
    use burn::tensor::{Device, DeviceKind};

    use super::{Backend, SelectedDevice};

    #[derive(Clone, Debug)]
    pub(super) struct Adapter {
        kind: DeviceKind,
        name: String,
        device_type: wgpu::DeviceType,
        api: wgpu::Backend,
    }

    impl Adapter {
        pub(super) fn is_gpu(&self) -> bool {
            matches!(
                self.device_type,
                wgpu::DeviceType::DiscreteGpu
                    | wgpu::DeviceType::IntegratedGpu
                    | wgpu::DeviceType::VirtualGpu
            )
        }

        pub(super) fn select(&self) -> SelectedDevice {
            SelectedDevice {
                device: Device::wgpu(self.kind.clone()),
                backend: Backend::Wgpu,
                adapter: format!("{} ({:?}, {:?})", self.name, self.device_type, self.api),
            }
        }
    }

    /// The adapters, GPUs first (discrete, integrated, virtual), then CPU drivers.
    pub(super) fn adapters() -> &'static [Adapter] {
        static ADAPTERS: OnceLock<Vec<Adapter>> = OnceLock::new();
        ADAPTERS.get_or_init(probe)
    }

    fn probe() -> Vec<Adapter> {
        let backends = wgpu::Backends::PRIMARY;
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let infos: Vec<wgpu::AdapterInfo> = block_on(instance.enumerate_adapters(backends))
            .iter()
            .map(wgpu::Adapter::get_info)
            .collect();
        let order = [
            wgpu::DeviceType::DiscreteGpu,
            wgpu::DeviceType::IntegratedGpu,
            wgpu::DeviceType::VirtualGpu,
            wgpu::DeviceType::Cpu,
        ];
        let mut out = Vec::new();
        for device_type in order {
            // The runtime numbers adapters per type; keep the first API that has one of this type.
            let Some(api) = infos
                .iter()
                .find(|i| i.device_type == device_type)
                .map(|i| i.backend)
            else {
                continue;
            };
            for (index, info) in infos
                .iter()
                .filter(|i| i.device_type == device_type && i.backend == api)
                .enumerate()
            {
                let kind = match device_type {
                    wgpu::DeviceType::DiscreteGpu => DeviceKind::DiscreteGpu(index),
                    wgpu::DeviceType::IntegratedGpu => DeviceKind::IntegratedGpu(index),
                    wgpu::DeviceType::VirtualGpu => DeviceKind::VirtualGpu(index),
                    _ => DeviceKind::Cpu,
                };
                if matches!(kind, DeviceKind::Cpu) && index > 0 {
                    continue;
                }
                out.push(Adapter {
                    kind,
                    name: info.name.clone(),
                    device_type,
                    api,
                });
            }
        }
        out
    }

    /// Drives a future that native wgpu resolves without waiting (adapter enumeration).
    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_case_insensitively() {
        assert_eq!(
            "AUTO".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Auto
        );
        assert_eq!(
            " ndarray ".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Backend(Backend::NdArray)
        );
        let err = "tpu".parse::<DeviceRequest>().unwrap_err();
        assert!(err.to_string().contains("tpu"), "{err}");
    }

    /// The rule: CPU engines on host-memory devices, except inference under autodiff.
    #[test]
    fn work_is_routed_by_one_rule() {
        for backend in Backend::enabled() {
            // wgpu without an adapter (no Vulkan driver): nothing to route.
            let Ok(selected) = select(backend.name()) else {
                assert_eq!(backend, Backend::Wgpu, "a CPU backend is always usable");
                continue;
            };
            let plain = selected.into_device();
            let host = backend != Backend::Wgpu;
            let cpu_if = |yes: bool| if yes { Route::Cpu } else { Route::TensorOps };
            for work in [Work::Inference, Work::TrainingStep, Work::Loss, Work::Knn] {
                assert_eq!(route(&plain, work), cpu_if(host), "{backend} {work:?}");
                let under_autodiff = host && work != Work::Inference;
                assert_eq!(
                    route(&plain.clone().autodiff(), work),
                    cpu_if(under_autodiff),
                    "{backend} {work:?} autodiff"
                );
            }
        }
    }

    #[test]
    fn auto_selects_an_enabled_backend() {
        let selected = select("auto").unwrap();
        assert!(Backend::enabled().contains(&selected.backend()));
        assert!(!selected.adapter().is_empty());
    }
}
