//! The file name of one part's report when a run writes several (per category, per class).

use std::path::{Path, PathBuf};

/// `path` with `-<part>` inserted before its extension (`report.html`, `bottle` →
/// `report-bottle.html`); `.html` when it has none.
pub fn per_part(path: &Path, part: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map_or("html".into(), |e| e.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}-{part}.{ext}"))
}
