//! `.tar.gz` extraction that refuses entries leaving the target directory.
//!
//! The `tar` crate's own `unpack` already skips `..` paths, but it follows through links made
//! by earlier entries and extracts links, devices and permissions as the archive says. msad
//! needs only regular files and directories (the CIFAR archives hold nothing else), so anything
//! else is refused outright, and the whole archive is refused with it: entries are written into
//! a temporary directory that is renamed into place only when every entry passed.

use std::fs::{self, File};
use std::io;
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;
use tar::EntryType;

use crate::{Error, Result};

/// Extracts the gzip-compressed tar `archive` into `into`, and returns the paths of the
/// top-level entries it created there.
///
/// Errors: [`Error::Archive`] naming the first refused entry (an absolute path, a `..`
/// component, or an entry that is neither a regular file nor a directory) or an unreadable
/// archive; [`Error::Io`] when `into` cannot be written or a top-level entry already exists
/// there. On any error nothing of the archive is left in `into`.
pub(crate) fn extract_tar_gz(archive: &Path, into: &Path) -> Result<Vec<PathBuf>> {
    let refused = |entry: &str, reason: String| Error::Archive {
        path: archive.to_path_buf(),
        entry: entry.to_string(),
        reason,
    };
    fs::create_dir_all(into).map_err(|e| Error::io(into, e))?;
    let staging = tempfile::Builder::new()
        .prefix(".extract-")
        .tempdir_in(into)
        .map_err(|e| Error::io(into, e))?;
    let file = File::open(archive).map_err(|e| Error::io(archive, e))?;
    let mut reader = tar::Archive::new(GzDecoder::new(file));
    let entries = reader
        .entries()
        .map_err(|e| refused("", format!("not a readable .tar.gz: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| refused("", format!("not a readable .tar.gz: {e}")))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        if kind == EntryType::Directory && is_current_dir(&raw) {
            continue; // `./`, as `tar -C dir .` writes first
        }
        let relative = safe_relative_path(&raw).map_err(|reason| refused(&raw, reason))?;
        let destination = staging.path().join(&relative);
        match kind {
            EntryType::Directory => {
                fs::create_dir_all(&destination).map_err(|e| Error::io(&destination, e))?
            }
            EntryType::Regular | EntryType::Continuous => {
                if let Some(parent) = destination.parent() {
                    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
                }
                let mut out = File::create(&destination).map_err(|e| Error::io(&destination, e))?;
                io::copy(&mut entry, &mut out)
                    .map_err(|e| refused(&raw, format!("cannot be read: {e}")))?;
                out.sync_all().map_err(|e| Error::io(&destination, e))?;
            }
            other => {
                return Err(refused(
                    &raw,
                    format!("{other:?} entries are not extracted (only files and directories)"),
                ));
            }
        }
    }
    let mut created = Vec::new();
    for item in fs::read_dir(staging.path()).map_err(|e| Error::io(staging.path(), e))? {
        let item = item.map_err(|e| Error::io(staging.path(), e))?;
        let target = into.join(item.file_name());
        if target.exists() {
            return Err(Error::io(
                &target,
                io::Error::new(io::ErrorKind::AlreadyExists, "already exists; not replaced"),
            ));
        }
        fs::rename(item.path(), &target).map_err(|e| Error::io(&target, e))?;
        created.push(target);
    }
    Ok(created)
}

/// Whether `raw` names the target itself (`.`, `./`).
fn is_current_dir(raw: &str) -> bool {
    Path::new(raw)
        .components()
        .all(|c| matches!(c, Component::CurDir))
}

/// `raw` as a path relative to the target, or why it is refused.
fn safe_relative_path(raw: &str) -> std::result::Result<PathBuf, String> {
    let mut relative = PathBuf::new();
    for component in Path::new(raw).components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("a `..` component leaves the target".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("an absolute path leaves the target".into());
            }
        }
    }
    if relative.as_os_str().is_empty() {
        return Err("an empty path".into());
    }
    Ok(relative)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_leave_the_target_are_refused() {
        assert_eq!(
            safe_relative_path("./a/b.bin").unwrap(),
            PathBuf::from("a/b.bin")
        );
        assert!(safe_relative_path("a/../../etc/passwd").is_err());
        assert!(safe_relative_path("/etc/passwd").is_err());
        assert!(safe_relative_path("./").is_err());
        assert!(is_current_dir("./") && is_current_dir("."));
        assert!(!is_current_dir("./a"));
    }
}
