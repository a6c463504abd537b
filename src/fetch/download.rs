//! One download: streamed to a temporary file while hashing, checked, renamed into place.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Fetcher, Progress, Remote};
use crate::FetchFailure;

/// How long to wait for the response head once connected.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);

/// Downloads `remote` into `dir/remote.file_name()`.
///
/// The bytes go to a uniquely named temporary file in `dir` (so that the final rename never
/// crosses file systems); it is deleted on every failure path by its drop. Only a complete,
/// verified, fsynced file is renamed into place.
pub(super) fn download(
    fetcher: &Fetcher,
    remote: &Remote,
    dir: &Path,
) -> Result<PathBuf, FetchFailure> {
    let not_writable = |e: std::io::Error| FetchFailure::CacheNotWritable {
        dir: dir.to_path_buf(),
        reason: e.to_string(),
    };
    fs::create_dir_all(dir).map_err(not_writable)?;
    let temporary = tempfile::Builder::new()
        .prefix(&format!(".{}.", remote.file_name()))
        .suffix(".part")
        .tempfile_in(dir)
        .map_err(not_writable)?;

    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(fetcher.connect_timeout))
        .timeout_recv_response(Some(RESPONSE_TIMEOUT))
        .user_agent(format!("msad/{}", env!("CARGO_PKG_VERSION")))
        // The operating system's trust store, as curl and pip use: it holds the certificates
        // of corporate TLS proxies and private mirrors, which Mozilla's bundled list lacks.
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::PlatformVerifier)
                .build(),
        )
        .build()
        .into();
    let response = agent
        .get(remote.url())
        .call()
        .map_err(|e| FetchFailure::Network(e.to_string()))?;
    let status = response.status();
    if !status.is_success() {
        return Err(FetchFailure::Status(status.as_u16()));
    }
    let total = response.body().content_length();
    let mut body = response.into_body().into_reader();

    let mut hasher = remote.digest().hasher();
    let mut received = 0u64;
    let mut buffer = vec![0u8; 1 << 16];
    let mut out = BufWriter::new(temporary.as_file());
    let progress = |received| Progress {
        url: remote.url(),
        received,
        total,
    };
    fetcher.report(progress(0));
    loop {
        let read = match body.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // ureq reports a body cut short of its Content-Length as an I/O error.
            Err(e) if total.is_some_and(|t| received < t) => {
                log::debug!("{}: body read failed: {e}", remote.url());
                return Err(FetchFailure::Truncated {
                    received,
                    expected: total,
                });
            }
            Err(e) => return Err(FetchFailure::Network(e.to_string())),
        };
        let chunk = &buffer[..read];
        hasher.update(chunk);
        out.write_all(chunk)
            .map_err(|e| FetchFailure::Io(e.to_string()))?;
        received += read as u64;
        fetcher.report(progress(received));
    }
    if total.is_some_and(|t| received != t) {
        return Err(FetchFailure::Truncated {
            received,
            expected: total,
        });
    }
    out.flush().map_err(|e| FetchFailure::Io(e.to_string()))?;
    drop(out);
    let found = hasher.finish();
    if !remote.digest().matches(&found) {
        return Err(FetchFailure::DigestMismatch { found });
    }
    temporary
        .as_file()
        .sync_all()
        .map_err(|e| FetchFailure::Io(e.to_string()))?;
    let target = dir.join(remote.file_name());
    temporary
        .persist(&target)
        .map_err(|e| FetchFailure::Io(e.error.to_string()))?;
    // The rename is durable once the directory is synced; where a directory cannot be opened
    // for that (some platforms), the file itself is complete and verified either way.
    if let Ok(directory) = File::open(dir) {
        let _ = directory.sync_all();
    }
    Ok(target)
}
