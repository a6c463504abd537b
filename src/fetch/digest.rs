//! Expected digests and the streaming hashers that check them.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use md5::Md5;
use sha2::{Digest as _, Sha256};

/// The digest a fetched file must have.
///
/// torchvision names its weight files after the first hex digits of their SHA-256
/// (`resnet18-f37072fd.pth`) and checks only that prefix; the CIFAR archives are published
/// with their MD5. Hex is compared case-insensitively.
///
/// ```
/// use msad::fetch::Digest;
///
/// let digest = Digest::sha256("f37072fd");
/// assert!(digest.matches("F37072FD47e89c"));
/// assert!(!digest.matches("00000000"));
/// assert_eq!(digest.to_string(), "sha256 f37072fd…");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Digest {
    /// A SHA-256, whole (64 hex digits) or a prefix of it.
    Sha256(String),
    /// An MD5, whole (32 hex digits) or a prefix of it.
    Md5(String),
}

impl Digest {
    /// A SHA-256 digest or prefix, in hex.
    pub fn sha256(hex: impl Into<String>) -> Self {
        Self::Sha256(hex.into().to_ascii_lowercase())
    }

    /// An MD5 digest or prefix, in hex.
    pub fn md5(hex: impl Into<String>) -> Self {
        Self::Md5(hex.into().to_ascii_lowercase())
    }

    /// The expected hex (whole or prefix), lower case.
    pub fn hex(&self) -> &str {
        match self {
            Self::Sha256(hex) | Self::Md5(hex) => hex,
        }
    }

    /// Whether `found` (a whole digest in hex) matches: the expected hex is a non-empty prefix
    /// of it.
    pub fn matches(&self, found: &str) -> bool {
        let expected = self.hex();
        !expected.is_empty()
            && found.len() >= expected.len()
            && found[..expected.len()].eq_ignore_ascii_case(expected)
    }

    /// A hasher of the same algorithm.
    pub(crate) fn hasher(&self) -> Hasher {
        match self {
            Self::Sha256(_) => Hasher::Sha256(Sha256::new()),
            Self::Md5(_) => Hasher::Md5(Md5::new()),
        }
    }

    /// The whole digest of a file on disk, in lower-case hex.
    pub(crate) fn of_file(&self, path: &Path) -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let mut hasher = self.hasher();
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let read = file.read(&mut buffer)?;
            if read == 0 {
                return Ok(hasher.finish());
            }
            hasher.update(&buffer[..read]);
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Sha256(_) => "sha256",
            Self::Md5(_) => "md5",
        };
        let whole = match self {
            Self::Sha256(_) => 64,
            Self::Md5(_) => 32,
        };
        let ellipsis = if self.hex().len() < whole { "…" } else { "" };
        write!(f, "{name} {}{ellipsis}", self.hex())
    }
}

/// A running hash of a download.
pub(crate) enum Hasher {
    Sha256(Sha256),
    Md5(Md5),
}

impl Hasher {
    /// Feeds bytes.
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(bytes),
            Self::Md5(h) => h.update(bytes),
        }
    }

    /// The whole digest in lower-case hex.
    pub(crate) fn finish(self) -> String {
        let bytes = match self {
            Self::Sha256(h) => h.finalize().to_vec(),
            Self::Md5(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests_of_abc() {
        let mut sha = Digest::sha256("").hasher();
        sha.update(b"abc");
        assert_eq!(
            sha.finish(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut md5 = Digest::md5("").hasher();
        md5.update(b"abc");
        assert_eq!(md5.finish(), "900150983cd24fb0d6963f7d28e17f72");
    }

    #[test]
    fn an_empty_expectation_matches_nothing() {
        assert!(!Digest::sha256("").matches("ba7816bf"));
        assert!(!Digest::md5("900150983cd24fb0").matches("9001"));
        assert_eq!(
            Digest::md5("900150983cd24fb0d6963f7d28e17f72").to_string(),
            "md5 900150983cd24fb0d6963f7d28e17f72"
        );
    }
}
