//! The crate's error type.
//!
//! Every fallible public function returns [`Result`]. Library code never panics on user input:
//! a bad file, a wrong shape or an unknown name comes back as an [`Error`] that names what was
//! wrong (the file, the checkpoint key, the shapes, the index).

use std::path::PathBuf;

/// Shorthand for `std::result::Result<T, msad::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `msad`.
///
/// The enum is `#[non_exhaustive]`: match the variants you handle and keep a catch-all arm.
///
/// ```
/// use msad::Error;
///
/// let err = Error::ShapeMismatch {
///     path: "resnet18.pth".into(),
///     key: "layer1.0.conv1.weight".into(),
///     expected: vec![64, 64, 3, 3],
///     found: vec![64, 64, 1, 1],
/// };
/// assert!(err.to_string().contains("layer1.0.conv1.weight"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A file that is not a readable checkpoint (truncated, corrupt, or another format).
    #[error("{}: not a readable checkpoint: {reason}", path.display())]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What the reader reported.
        reason: String,
    },

    /// A tensor the model needs is absent from the checkpoint.
    #[error("{}: missing key `{key}` (expected shape {expected:?})", path.display())]
    MissingKey {
        /// The checkpoint file.
        path: PathBuf,
        /// The torchvision key, e.g. `layer2.0.downsample.1.running_var`.
        key: String,
        /// The shape the model expects for it.
        expected: Vec<usize>,
    },

    /// The checkpoint holds a tensor the model has no place for (`fc.*` and
    /// `*.num_batches_tracked` are always ignored and never reported).
    #[error("{}: unexpected key `{key}` with shape {found:?}", path.display())]
    UnexpectedKey {
        /// The checkpoint file.
        path: PathBuf,
        /// The torchvision key.
        key: String,
        /// Its shape in the checkpoint.
        found: Vec<usize>,
    },

    /// A checkpoint tensor whose shape differs from the model's.
    #[error("{}: key `{key}` has shape {found:?}, the model expects {expected:?}", path.display())]
    ShapeMismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// The torchvision key.
        key: String,
        /// The shape the model expects.
        expected: Vec<usize>,
        /// The shape found in the checkpoint.
        found: Vec<usize>,
    },

    /// The ResNet layout could not be inferred from a checkpoint's keys.
    #[error("{}: cannot infer the ResNet architecture: {reason}", path.display())]
    UnknownArchitecture {
        /// The checkpoint file.
        path: PathBuf,
        /// Why not.
        reason: String,
    },

    /// A tensor argument with the wrong shape.
    #[error("{what}: expected shape {expected}, found {found:?}")]
    InvalidShape {
        /// Which argument.
        what: String,
        /// The expected shape, in words (`[N, 3, H, W]`).
        expected: String,
        /// The shape received.
        found: Vec<usize>,
    },

    /// An invalid configuration value or argument.
    #[error("invalid {what}: {reason}")]
    InvalidArgument {
        /// Which value.
        what: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A model layout that one of msad's engines does not cover (for example a conv with
    /// padding other than k / 2 on the CPU engine). Where a documented fallback exists (the
    /// ResNet engines fall back to the backend's tensor operations) this error is what the
    /// fallback logs; where none exists it is returned.
    #[error("the {engine} engine does not cover {what}: {reason}")]
    Unsupported {
        /// The engine (`cpu`).
        engine: &'static str,
        /// The layer or argument, e.g. `layer1.0.conv2`.
        what: String,
        /// What about it is not covered.
        reason: String,
    },

    /// A requested device or backend is not available.
    #[error("device `{name}` is not available: {reason}")]
    DeviceUnavailable {
        /// The device name asked for (`wgpu`, `flex`, ...).
        name: String,
        /// Why not.
        reason: String,
    },

    /// A `.npy` file that could not be read or written.
    #[error("{}: {reason}", path.display())]
    Npy {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// A dataset file that is missing pieces, has a size that is not a whole number of records,
    /// or holds an out-of-range value.
    #[error("{}{}: {reason}", path.display(), record.map(|r| format!(" (record {r})")).unwrap_or_default())]
    Dataset {
        /// The file or directory.
        path: PathBuf,
        /// The record index, when one record is at fault.
        record: Option<usize>,
        /// What is wrong.
        reason: String,
    },

    /// An image file that could not be decoded (truncated, corrupt, unsupported).
    #[error("{}: cannot decode image: {reason}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// What the decoder reported.
        reason: String,
    },

    /// A value that must be finite is not (NaN or ±inf): a weight, the center, the bank, a
    /// threshold, or a score computed from such values or from a non-finite image.
    #[error("{what} is not finite: {detail}")]
    NonFinite {
        /// What holds the value (`center.npy`, `threshold`, `the score of image 3`).
        what: String,
        /// Which value, and what it is.
        detail: String,
    },

    /// A file that could not be fetched: not in any cache, and the download failed or was
    /// forbidden. The message names the URL, the expected digest and where the file can be put
    /// by hand.
    #[error(
        "cannot fetch {url} ({expected}): {failure}; to provide the file by hand, put it at {}",
        manual.display()
    )]
    Fetch {
        /// The URL asked for.
        url: String,
        /// The expected digest, in words (`sha256 f37072fd…`, `md5 c58f3010…`).
        expected: String,
        /// Where a file put by hand is found without any network access.
        manual: PathBuf,
        /// What went wrong.
        failure: FetchFailure,
    },

    /// An archive entry that extraction refused (a path leaving the target directory, an
    /// absolute path, a link or a device). Nothing of the archive is left extracted.
    #[error("{}: refused archive entry `{entry}`: {reason}", path.display())]
    Archive {
        /// The archive file.
        path: PathBuf,
        /// The entry's path as stored in the archive.
        entry: String,
        /// Why it was refused.
        reason: String,
    },

    /// A failure inside the compute backend (device lost, execution error).
    #[error("backend error: {0}")]
    Backend(String),
}

/// Why a fetch failed: the `failure` of [`Error::Fetch`].
///
/// ```
/// use msad::FetchFailure;
///
/// let failure = FetchFailure::Status(404);
/// assert_eq!(failure.to_string(), "the server answered HTTP 404");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FetchFailure {
    /// `MSAD_OFFLINE` is set (or [`Fetcher::with_offline`](crate::fetch::Fetcher::with_offline)):
    /// the network is forbidden and no cache holds the file.
    #[error("offline (MSAD_OFFLINE is set) and the file is in no cache")]
    Offline,
    /// No connection, a DNS or TLS failure, a timeout.
    #[error("network error: {0}")]
    Network(String),
    /// The server answered with an HTTP status other than success.
    #[error("the server answered HTTP {0}")]
    Status(u16),
    /// The connection closed before the whole body arrived.
    #[error("truncated download: {received} bytes received{}", expected.map(|e| format!(" of {e}")).unwrap_or_default())]
    Truncated {
        /// Bytes received.
        received: u64,
        /// The announced length, when the server sent one.
        expected: Option<u64>,
    },
    /// The downloaded bytes do not have the expected digest; they were deleted.
    #[error("digest mismatch: the download's digest is {found}; the download was deleted")]
    DigestMismatch {
        /// The digest of what arrived (full hex).
        found: String,
    },
    /// The cache directory cannot be created or written.
    #[error("cache directory {} cannot be written: {reason}", dir.display())]
    CacheNotWritable {
        /// The directory.
        dir: PathBuf,
        /// What the operating system said.
        reason: String,
    },
    /// Any other local I/O failure while writing the download (a full disk, ...).
    #[error("writing the download failed: {0}")]
    Io(String),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::InvalidArgument`].
    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
