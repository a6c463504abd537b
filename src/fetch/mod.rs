//! Files on demand: look in the caches, else download, verify and rename into place.
//!
//! [`Fetcher`] is the one way msad gets a file it does not ship: torchvision's ImageNet weights
//! ([`crate::encoder::ResNet::pretrained`]) and the CIFAR archives
//! ([`crate::data::Cifar10::download`]). For each [`Remote`] file it
//!
//! 1. looks in the extra directories the caller names (for weights: PyTorch's own cache,
//!    `$TORCH_HOME/hub/checkpoints`, where a PyTorch user already has them), then in msad's
//!    cache; a file found there is used when its digest matches;
//! 2. otherwise, unless offline, downloads it with [ureq](https://docs.rs/ureq) over HTTPS
//!    (rustls, certificates checked against the operating system's trust store), streamed to a temporary file in the cache directory while hashing, checks the
//!    length and the [`Digest`], fsyncs, and renames it into place.
//!
//! A crash, a full disk, a truncated body or a wrong digest therefore never leaves a file a
//! later run trusts, and two processes fetching the same file at once each rename a complete,
//! verified copy over the same name. Every failure is an [`Error::Fetch`] naming the URL, the
//! expected digest and where the file can be put by hand.
//!
//! Settings come from the environment ([`Fetcher::from_env`]) and can be overridden:
//!
//! | variable | meaning |
//! |---|---|
//! | `MSAD_CACHE_DIR` | msad's cache; else `$XDG_CACHE_HOME/msad`, else `~/.cache/msad` |
//! | `TORCH_HOME` | PyTorch's home (weights are looked for in `$TORCH_HOME/hub/checkpoints`); else `$XDG_CACHE_HOME/torch`, else `~/.cache/torch`, as PyTorch does |
//! | `MSAD_WEIGHTS_URL` | base URL of the weight files (default `https://download.pytorch.org/models`) |
//! | `MSAD_DATA_URL` | base URL of the dataset archives (default `https://www.cs.toronto.edu/~kriz`) |
//! | `MSAD_OFFLINE` | `1` (or any value but `0` and empty) forbids the network |
//!
//! ```no_run
//! use msad::fetch::{Digest, Fetcher, Remote};
//!
//! # fn main() -> msad::Result<()> {
//! let fetcher = Fetcher::from_env().with_progress(|p| eprintln!("{} / {:?}", p.received, p.total));
//! let remote = Remote::new(
//!     format!("{}/resnet18-f37072fd.pth", fetcher.weights_url()),
//!     "resnet18-f37072fd.pth",
//!     Digest::sha256("f37072fd"),
//! );
//! let path = fetcher.fetch(&remote, &[])?;
//! # Ok(())
//! # }
//! ```

mod archive;
mod digest;
mod download;

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use digest::Digest;

pub(crate) use archive::extract_tar_gz;

use crate::{Error, FetchFailure, Result};

/// A file to fetch: where it is on the network, its name on disk, its digest.
///
/// ```
/// use msad::fetch::{Digest, Remote};
///
/// let remote = Remote::new("http://127.0.0.1:8000/a.bin", "a.bin", Digest::md5("900150983cd24fb0"));
/// assert_eq!(remote.file_name(), "a.bin");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    url: String,
    file_name: String,
    digest: Digest,
}

impl Remote {
    /// A file at `url`, stored as `file_name` (a bare name, no directories), with `digest`.
    pub fn new(url: impl Into<String>, file_name: impl Into<String>, digest: Digest) -> Self {
        Self {
            url: url.into(),
            file_name: file_name.into(),
            digest,
        }
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The file's name on disk.
    pub fn file_name(&self) -> &str {
        &self.file_name
    }

    /// The expected digest.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }
}

/// How far a download has come, passed to the [`Fetcher::with_progress`] callback after every
/// chunk (and once at the start, with `received` 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress<'a> {
    /// The URL being downloaded.
    pub url: &'a str,
    /// Bytes received so far.
    pub received: u64,
    /// The announced length, when the server sent one.
    pub total: Option<u64>,
}

/// A progress callback.
type ProgressFn = Arc<dyn Fn(&Progress<'_>) + Send + Sync>;

/// Where files are looked for and how they are downloaded. Cheap to clone.
///
/// ```
/// use msad::fetch::Fetcher;
///
/// let fetcher = Fetcher::from_vars(|name| match name {
///     "HOME" => Some("/home/ada".into()),
///     "MSAD_OFFLINE" => Some("1".into()),
///     _ => None,
/// });
/// assert_eq!(fetcher.cache_dir(), Some(std::path::Path::new("/home/ada/.cache/msad")));
/// assert_eq!(
///     fetcher.torch_checkpoints(),
///     Some(std::path::Path::new("/home/ada/.cache/torch/hub/checkpoints"))
/// );
/// assert!(fetcher.is_offline());
/// ```
#[derive(Clone)]
pub struct Fetcher {
    cache_dir: Option<PathBuf>,
    torch_checkpoints: Option<PathBuf>,
    weights_url: String,
    data_url: String,
    offline: bool,
    connect_timeout: Duration,
    progress: Option<ProgressFn>,
}

impl fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fetcher")
            .field("cache_dir", &self.cache_dir)
            .field("torch_checkpoints", &self.torch_checkpoints)
            .field("weights_url", &self.weights_url)
            .field("data_url", &self.data_url)
            .field("offline", &self.offline)
            .field("connect_timeout", &self.connect_timeout)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl Fetcher {
    /// torchvision's weights server, the default of `MSAD_WEIGHTS_URL`.
    pub const WEIGHTS_URL: &'static str = "https://download.pytorch.org/models";
    /// The CIFAR archives' server, the default of `MSAD_DATA_URL`.
    pub const DATA_URL: &'static str = "https://www.cs.toronto.edu/~kriz";

    /// Settings from the process environment (see the module docs for the variables).
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var_os(name))
    }

    /// Settings from `var`, which answers like [`std::env::var_os`]; for tests and for
    /// programs that keep their settings elsewhere.
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Self {
        let set = |name: &str| var(name).filter(|v| !v.is_empty());
        let home = set("HOME").map(PathBuf::from);
        let xdg_cache = set("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".cache")));
        let cache_dir = set("MSAD_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| xdg_cache.as_ref().map(|c| c.join("msad")));
        let torch_home = set("TORCH_HOME")
            .map(PathBuf::from)
            .or_else(|| xdg_cache.as_ref().map(|c| c.join("torch")));
        let url = |name: &str, default: &str| {
            set(name)
                .map(|v| v.to_string_lossy().trim_end_matches('/').to_string())
                .unwrap_or_else(|| default.to_string())
        };
        Self {
            cache_dir,
            torch_checkpoints: torch_home.map(|t| t.join("hub").join("checkpoints")),
            weights_url: url("MSAD_WEIGHTS_URL", Self::WEIGHTS_URL),
            data_url: url("MSAD_DATA_URL", Self::DATA_URL),
            offline: set("MSAD_OFFLINE").is_some_and(|v| v != "0"),
            connect_timeout: Duration::from_secs(30),
            progress: None,
        }
    }

    /// Uses `dir` as msad's cache (downloads land there).
    pub fn with_cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }

    /// Looks for weights in `dir` before msad's cache (`None`: not at all).
    pub fn with_torch_checkpoints(mut self, dir: Option<PathBuf>) -> Self {
        self.torch_checkpoints = dir;
        self
    }

    /// Replaces the weights' base URL.
    pub fn with_weights_url(mut self, url: impl Into<String>) -> Self {
        self.weights_url = url.into().trim_end_matches('/').to_string();
        self
    }

    /// Replaces the datasets' base URL.
    pub fn with_data_url(mut self, url: impl Into<String>) -> Self {
        self.data_url = url.into().trim_end_matches('/').to_string();
        self
    }

    /// Forbids (`true`) or allows the network.
    pub fn with_offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// How long to wait for a connection (default 30 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Calls `report` as a download proceeds (the examples draw it with indicatif).
    pub fn with_progress(mut self, report: impl Fn(&Progress<'_>) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(report));
        self
    }

    /// msad's cache directory, when one is known.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.cache_dir.as_deref()
    }

    /// PyTorch's checkpoint cache, when one is known.
    pub fn torch_checkpoints(&self) -> Option<&Path> {
        self.torch_checkpoints.as_deref()
    }

    /// The weights' base URL, without a trailing slash.
    pub fn weights_url(&self) -> &str {
        &self.weights_url
    }

    /// The datasets' base URL, without a trailing slash.
    pub fn data_url(&self) -> &str {
        &self.data_url
    }

    /// Whether the network is forbidden.
    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// The path of `remote`: the first of `look_in`, then msad's cache, that holds it with the
    /// right digest; else a fresh download into msad's cache.
    ///
    /// A file in `look_in` with the wrong digest is left alone (it is not msad's); one in
    /// msad's cache is deleted and fetched again.
    ///
    /// Errors: [`Error::Fetch`] with the [`FetchFailure`].
    pub fn fetch(&self, remote: &Remote, look_in: &[&Path]) -> Result<PathBuf> {
        for dir in look_in {
            let candidate = dir.join(remote.file_name());
            if self.holds_verified(remote, &candidate) {
                return Ok(candidate);
            }
        }
        let Some(cache) = self.cache_dir.as_deref() else {
            return Err(self.failure(
                remote,
                look_in.first().copied().unwrap_or(Path::new(".")),
                FetchFailure::CacheNotWritable {
                    dir: PathBuf::from("$MSAD_CACHE_DIR"),
                    reason: "no cache directory is known: MSAD_CACHE_DIR, XDG_CACHE_HOME and \
                             HOME are all unset"
                        .into(),
                },
            ));
        };
        self.fetch_into(remote, cache)
    }

    /// The path of `remote` in `dir`: there already with the right digest, else downloaded
    /// into `dir` (a file there with the wrong digest is replaced).
    ///
    /// Errors: [`Error::Fetch`] with the [`FetchFailure`].
    pub fn fetch_into(&self, remote: &Remote, dir: &Path) -> Result<PathBuf> {
        let target = dir.join(remote.file_name());
        if target.is_file() {
            if self.holds_verified(remote, &target) {
                return Ok(target);
            }
            log::warn!(
                "{}: digest is not {}; fetching it again",
                target.display(),
                remote.digest()
            );
            // A failed removal shows up as a failed rename below.
            let _ = std::fs::remove_file(&target);
        }
        if self.offline {
            return Err(self.failure(remote, dir, FetchFailure::Offline));
        }
        download::download(self, remote, dir).map_err(|failure| self.failure(remote, dir, failure))
    }

    /// Whether `path` is a file whose digest matches.
    fn holds_verified(&self, remote: &Remote, path: &Path) -> bool {
        path.is_file()
            && remote
                .digest()
                .of_file(path)
                .is_ok_and(|found| remote.digest().matches(&found))
    }

    /// An [`Error::Fetch`] for `remote`, suggesting `dir` for a file put by hand.
    fn failure(&self, remote: &Remote, dir: &Path, failure: FetchFailure) -> Error {
        Error::Fetch {
            url: remote.url().to_string(),
            expected: remote.digest().to_string(),
            manual: dir.join(remote.file_name()),
            failure,
        }
    }

    /// Reports progress, when a callback is set.
    fn report(&self, progress: Progress<'_>) {
        if let Some(report) = &self.progress {
            report(&progress);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn environment_precedence_follows_pytorch_and_xdg() {
        let f = Fetcher::from_vars(vars(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")]));
        assert_eq!(f.cache_dir(), Some(Path::new("/x/msad")));
        assert_eq!(
            f.torch_checkpoints(),
            Some(Path::new("/x/torch/hub/checkpoints"))
        );
        let f = Fetcher::from_vars(vars(&[
            ("HOME", "/h"),
            ("MSAD_CACHE_DIR", "/m"),
            ("TORCH_HOME", "/t"),
            ("MSAD_WEIGHTS_URL", "http://127.0.0.1:9/w/"),
            ("MSAD_DATA_URL", "http://127.0.0.1:9/d"),
        ]));
        assert_eq!(f.cache_dir(), Some(Path::new("/m")));
        assert_eq!(f.torch_checkpoints(), Some(Path::new("/t/hub/checkpoints")));
        assert_eq!(f.weights_url(), "http://127.0.0.1:9/w");
        assert_eq!(f.data_url(), "http://127.0.0.1:9/d");
        assert!(!f.is_offline());
        let f = Fetcher::from_vars(vars(&[]));
        assert_eq!(f.cache_dir(), None);
        assert_eq!(f.weights_url(), Fetcher::WEIGHTS_URL);
    }

    #[test]
    fn offline_is_any_value_but_zero_and_empty() {
        for (value, offline) in [("1", true), ("yes", true), ("0", false), ("", false)] {
            let f = Fetcher::from_vars(vars(&[("MSAD_OFFLINE", value)]));
            assert_eq!(f.is_offline(), offline, "MSAD_OFFLINE={value:?}");
        }
    }
}
