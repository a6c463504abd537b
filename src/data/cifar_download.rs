//! CIFAR-10 and CIFAR-100 on demand (feature `pretrained`): torchvision's python-version
//! archives, fetched into the data directory, verified by MD5 and extracted safely.
//!
//! As `torchvision.datasets.CIFAR10(root, download=True)` does, the archive is kept next to
//! the extracted folder, and nothing is fetched when either version is already there.

use std::path::Path;

use super::cifar::{CIFAR10_FILES, CIFAR100_FILES, Files, locate};
use super::{Cifar10, Cifar100};
use crate::fetch::{Digest, Fetcher, Remote, extract_tar_gz};
use crate::{Error, Result};

/// One of the published dataset archives.
///
/// ```
/// use msad::data::CIFAR10_PYTHON_ARCHIVE;
/// assert_eq!(CIFAR10_PYTHON_ARCHIVE.file_name, "cifar-10-python.tar.gz");
/// assert_eq!(CIFAR10_PYTHON_ARCHIVE.md5.len(), 32);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetArchive {
    /// The archive's name under the data URL.
    pub file_name: &'static str,
    /// Its published MD5, in hex.
    pub md5: &'static str,
    /// The folder it extracts to.
    pub folder: &'static str,
}

impl DatasetArchive {
    /// The archive as a [`Remote`] under `fetcher`'s data URL.
    pub fn remote(&self, fetcher: &Fetcher) -> Remote {
        Remote::new(
            format!("{}/{}", fetcher.data_url(), self.file_name),
            self.file_name,
            Digest::md5(self.md5),
        )
    }
}

/// torchvision's CIFAR-10 archive (python version).
pub const CIFAR10_PYTHON_ARCHIVE: DatasetArchive = DatasetArchive {
    file_name: "cifar-10-python.tar.gz",
    md5: "c58f30108f718f92721af3b95e74349a",
    folder: "cifar-10-batches-py",
};

/// torchvision's CIFAR-100 archive (python version).
pub const CIFAR100_PYTHON_ARCHIVE: DatasetArchive = DatasetArchive {
    file_name: "cifar-100-python.tar.gz",
    md5: "eb9058c3a382ffc7106e4002c42a8d85",
    folder: "cifar-100-python",
};

impl Cifar10 {
    /// Opens CIFAR-10 in `dir`, first fetching and extracting torchvision's archive into it
    /// when neither version is there.
    ///
    /// ```no_run
    /// use msad::data::Cifar10;
    /// use msad::fetch::Fetcher;
    ///
    /// # fn main() -> msad::Result<()> {
    /// let cifar = Cifar10::download("data", &Fetcher::from_env())?;
    /// assert_eq!(cifar.test_images().len(), 10_000);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Errors: [`Error::Fetch`], [`Error::Archive`], and those of [`Cifar10::open`].
    pub fn download(dir: impl AsRef<Path>, fetcher: &Fetcher) -> Result<Self> {
        Self::download_from(dir, &CIFAR10_PYTHON_ARCHIVE.remote(fetcher), fetcher)
    }

    /// [`Cifar10::download`] from another archive (a mirror with its own digest, a fixture).
    /// The archive must hold one of the two layouts.
    pub fn download_from(
        dir: impl AsRef<Path>,
        archive: &Remote,
        fetcher: &Fetcher,
    ) -> Result<Self> {
        ensure_present(dir.as_ref(), &CIFAR10_FILES, archive, fetcher)?;
        Self::open(dir)
    }
}

impl Cifar100 {
    /// Opens CIFAR-100 in `dir`, first fetching and extracting torchvision's archive into it
    /// when neither version is there.
    ///
    /// Errors: [`Error::Fetch`], [`Error::Archive`], and those of [`Cifar100::open`].
    pub fn download(dir: impl AsRef<Path>, fetcher: &Fetcher) -> Result<Self> {
        Self::download_from(dir, &CIFAR100_PYTHON_ARCHIVE.remote(fetcher), fetcher)
    }

    /// [`Cifar100::download`] from another archive (a mirror with its own digest, a fixture).
    pub fn download_from(
        dir: impl AsRef<Path>,
        archive: &Remote,
        fetcher: &Fetcher,
    ) -> Result<Self> {
        ensure_present(dir.as_ref(), &CIFAR100_FILES, archive, fetcher)?;
        Self::open(dir)
    }
}

/// Fetches and extracts `archive` into `dir` unless one of `versions` is there already.
fn ensure_present(
    dir: &Path,
    versions: &[Files],
    archive: &Remote,
    fetcher: &Fetcher,
) -> Result<()> {
    if locate(dir, versions, "").is_ok() {
        return Ok(());
    }
    let path = fetcher.fetch_into(archive, dir)?;
    let created = extract_tar_gz(&path, dir)?;
    if locate(dir, versions, "").is_err() {
        return Err(Error::Archive {
            path,
            entry: String::new(),
            reason: format!(
                "extracted {} but it holds no CIFAR files",
                created
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    Ok(())
}
