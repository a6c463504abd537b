//! Files on demand: downloads from a loopback HTTP server this test starts (127.0.0.1 only),
//! the caches, the failures, and archive extraction that refuses entries leaving the target.
#![cfg(feature = "pretrained")]

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use msad::data::{Cifar10, Cifar100};
use msad::fetch::{Digest, Fetcher, Remote};
use msad::{Error, FetchFailure};
use sha2::Digest as _;
use tempfile::TempDir;

// ------------------------------------------------------------------------------------------
// A loopback file server
// ------------------------------------------------------------------------------------------

/// What the server answers for a path.
#[derive(Clone)]
enum Reply {
    /// 200 with these bytes.
    Body(Vec<u8>),
    /// 200 announcing `claimed` bytes, sending only these, then closing.
    Truncated { body: Vec<u8>, claimed: usize },
    /// This status with an empty body.
    Status(u16),
}

/// A one-thread-per-connection HTTP/1.1 file server on 127.0.0.1.
///
/// Written here rather than taken from a crate because the tests need it to misbehave on
/// purpose (announce more bytes than it sends) and to count requests per path; the client
/// under test is ureq.
struct FileServer {
    base: String,
    requests: Arc<Mutex<HashMap<String, usize>>>,
}

impl FileServer {
    fn start(routes: Vec<(&str, Reply)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let routes: Arc<HashMap<String, Reply>> = Arc::new(
            routes
                .into_iter()
                .map(|(p, r)| (format!("/{p}"), r))
                .collect(),
        );
        let requests = Arc::new(Mutex::new(HashMap::new()));
        let counts = Arc::clone(&requests);
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (routes, counts) = (Arc::clone(&routes), Arc::clone(&counts));
                thread::spawn(move || serve(stream, &routes, &counts));
            }
        });
        Self { base, requests }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }

    fn requests(&self, path: &str) -> usize {
        let counts = self.requests.lock().unwrap();
        counts.get(&format!("/{path}")).copied().unwrap_or(0)
    }
}

fn serve(
    mut stream: TcpStream,
    routes: &HashMap<String, Reply>,
    counts: &Mutex<HashMap<String, usize>>,
) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    *counts.lock().unwrap().entry(path.clone()).or_default() += 1;
    let (status, body, claimed) = match routes.get(&path) {
        Some(Reply::Body(body)) => (200, body.as_slice(), body.len()),
        Some(Reply::Truncated { body, claimed }) => (200, body.as_slice(), *claimed),
        Some(Reply::Status(status)) => (*status, &[][..], 0),
        None => (404, &[][..], 0),
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Length: {claimed}\r\nConnection: close\r\n\r\n"
    );
    let _ = stream.write_all(body);
    let _ = stream.flush();
}

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn md5_hex(bytes: &[u8]) -> String {
    md5::Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A fetcher that knows only the directories given (no environment).
fn fetcher(cache: &Path, torch: Option<&Path>) -> Fetcher {
    Fetcher::from_vars(|_| None)
        .with_cache_dir(cache)
        .with_torch_checkpoints(torch.map(Path::to_path_buf))
}

/// Every file under `dir`, relative, sorted (empty when `dir` does not exist).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let Ok(entries) = fs::read_dir(&next) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.push(path.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    found.sort();
    found
}

fn fetch_failure(result: msad::Result<PathBuf>) -> (FetchFailure, String) {
    match result {
        Err(error @ Error::Fetch { .. }) => {
            let message = error.to_string();
            let Error::Fetch { failure, .. } = error else {
                unreachable!()
            };
            (failure, message)
        }
        other => panic!("expected Error::Fetch, got {other:?}"),
    }
}

/// Deterministic bytes standing in for a weight file.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 131 % 251) as u8).collect()
}

// ------------------------------------------------------------------------------------------
// Downloads and caches
// ------------------------------------------------------------------------------------------

#[test]
fn download_then_cache_hit_without_a_second_request() {
    let body = payload(300_000);
    let server = FileServer::start(vec![("w.pth", Reply::Body(body.clone()))]);
    let tmp = TempDir::new().unwrap();
    let cache = tmp.path().join("cache");
    let seen = Arc::new(AtomicU64::new(0));
    let totals = Arc::new(Mutex::new(Vec::new()));
    let (seen_in, totals_in) = (Arc::clone(&seen), Arc::clone(&totals));
    let fetcher = fetcher(&cache, None).with_progress(move |p| {
        seen_in.store(p.received, Ordering::SeqCst);
        totals_in.lock().unwrap().push(p.total);
    });
    let remote = Remote::new(
        server.url("w.pth"),
        "w.pth",
        Digest::sha256(sha256_hex(&body)),
    );

    let path = fetcher.fetch(&remote, &[]).unwrap();
    assert_eq!(path, cache.join("w.pth"));
    assert_eq!(fs::read(&path).unwrap(), body);
    assert_eq!(server.requests("w.pth"), 1);
    assert_eq!(seen.load(Ordering::SeqCst), body.len() as u64);
    assert!(
        totals
            .lock()
            .unwrap()
            .iter()
            .all(|t| *t == Some(body.len() as u64))
    );
    assert_eq!(files_under(&cache), vec![PathBuf::from("w.pth")]);

    let again = fetcher.fetch(&remote, &[]).unwrap();
    assert_eq!(again, path);
    assert_eq!(server.requests("w.pth"), 1, "a cache hit makes no request");
}

#[test]
fn digest_mismatch_is_refused_and_leaves_nothing_in_either_cache() {
    let body = payload(10_000);
    let server = FileServer::start(vec![("w.pth", Reply::Body(body.clone()))]);
    let tmp = TempDir::new().unwrap();
    let (cache, torch) = (tmp.path().join("cache"), tmp.path().join("torch"));
    fs::create_dir_all(&torch).unwrap();
    let remote = Remote::new(server.url("w.pth"), "w.pth", Digest::sha256("deadbeef"));
    let (failure, message) = fetch_failure(fetcher(&cache, Some(&torch)).fetch(&remote, &[&torch]));
    let FetchFailure::DigestMismatch { found } = failure else {
        panic!("expected a digest mismatch, got {failure:?}");
    };
    assert_eq!(found, sha256_hex(&body));
    assert!(message.contains(&server.url("w.pth")), "{message}");
    assert!(message.contains("sha256 deadbeef"), "{message}");
    assert!(
        message.contains(&cache.join("w.pth").display().to_string()),
        "{message}"
    );
    assert_eq!(files_under(&cache), Vec::<PathBuf>::new());
    assert_eq!(files_under(&torch), Vec::<PathBuf>::new());
}

#[test]
fn truncated_body_is_refused() {
    let body = payload(500);
    let server = FileServer::start(vec![(
        "w.pth",
        Reply::Truncated {
            body: body.clone(),
            claimed: 1000,
        },
    )]);
    let tmp = TempDir::new().unwrap();
    let remote = Remote::new(
        server.url("w.pth"),
        "w.pth",
        Digest::sha256(sha256_hex(&body)),
    );
    let (failure, _) = fetch_failure(fetcher(tmp.path(), None).fetch(&remote, &[]));
    assert_eq!(
        failure,
        FetchFailure::Truncated {
            received: 500,
            expected: Some(1000)
        }
    );
    assert_eq!(files_under(tmp.path()), Vec::<PathBuf>::new());
}

#[test]
fn http_404_and_500_are_typed_errors_naming_the_url() {
    let server = FileServer::start(vec![("gone.pth", Reply::Status(500))]);
    let tmp = TempDir::new().unwrap();
    for (path, status) in [("missing.pth", 404), ("gone.pth", 500)] {
        let remote = Remote::new(server.url(path), path, Digest::sha256("00ff00ff"));
        let (failure, message) = fetch_failure(fetcher(tmp.path(), None).fetch(&remote, &[]));
        assert_eq!(failure, FetchFailure::Status(status));
        assert!(message.contains(&server.url(path)), "{message}");
    }
    assert_eq!(files_under(tmp.path()), Vec::<PathBuf>::new());
}

#[test]
fn refused_connection_is_a_network_error() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let tmp = TempDir::new().unwrap();
    let url = format!("http://127.0.0.1:{port}/w.pth");
    let remote = Remote::new(url, "w.pth", Digest::sha256("00ff00ff"));
    let (failure, _) = fetch_failure(fetcher(tmp.path(), None).fetch(&remote, &[]));
    assert!(matches!(failure, FetchFailure::Network(_)), "{failure:?}");
    assert_eq!(files_under(tmp.path()), Vec::<PathBuf>::new());
}

#[test]
fn unwritable_cache_directory_is_a_typed_error_before_any_request() {
    let body = payload(100);
    let server = FileServer::start(vec![("w.pth", Reply::Body(body.clone()))]);
    let tmp = TempDir::new().unwrap();
    // A regular file where the cache directory should be: unwritable even for root, which
    // ignores permission bits.
    let cache = tmp.path().join("cache");
    fs::write(&cache, b"not a directory").unwrap();
    let remote = Remote::new(
        server.url("w.pth"),
        "w.pth",
        Digest::sha256(sha256_hex(&body)),
    );
    let (failure, message) = fetch_failure(fetcher(&cache, None).fetch(&remote, &[]));
    let FetchFailure::CacheNotWritable { dir, .. } = &failure else {
        panic!("expected CacheNotWritable, got {failure:?}");
    };
    assert_eq!(dir, &cache);
    assert!(message.contains("cannot be written"), "{message}");
    assert_eq!(server.requests("w.pth"), 0);
}

#[test]
fn two_threads_fetching_the_same_file_both_get_a_verified_copy() {
    let body = payload(2_000_000);
    let server = FileServer::start(vec![("w.pth", Reply::Body(body.clone()))]);
    let tmp = TempDir::new().unwrap();
    let cache = tmp.path().join("cache");
    let remote = Remote::new(
        server.url("w.pth"),
        "w.pth",
        Digest::sha256(sha256_hex(&body)),
    );
    let barrier = Arc::new(Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let (fetcher, remote, barrier) =
                (fetcher(&cache, None), remote.clone(), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                fetcher.fetch(&remote, &[])
            })
        })
        .collect();
    for handle in handles {
        let path = handle.join().unwrap().unwrap();
        assert_eq!(fs::read(&path).unwrap(), body);
    }
    assert_eq!(
        files_under(&cache),
        vec![PathBuf::from("w.pth")],
        "no partial files left"
    );
}

#[test]
fn torch_home_checkpoints_are_reused_without_a_request() {
    let body = payload(4_096);
    let server = FileServer::start(vec![("resnet-x.pth", Reply::Body(body.clone()))]);
    let tmp = TempDir::new().unwrap();
    let torch_home = tmp.path().join("torch");
    let vars: HashMap<&str, PathBuf> = [
        ("TORCH_HOME", torch_home.clone()),
        ("MSAD_CACHE_DIR", tmp.path().join("msad")),
        ("MSAD_WEIGHTS_URL", PathBuf::from(&server.base)),
    ]
    .into();
    let fetcher = Fetcher::from_vars(|name| vars.get(name).map(|p| p.clone().into_os_string()));
    let checkpoints = fetcher.torch_checkpoints().unwrap().to_path_buf();
    assert_eq!(checkpoints, torch_home.join("hub/checkpoints"));
    let remote = Remote::new(
        format!("{}/resnet-x.pth", fetcher.weights_url()),
        "resnet-x.pth",
        Digest::sha256(&sha256_hex(&body)[..8]),
    );

    // A PyTorch file with the wrong bytes is not trusted, and not deleted either.
    fs::create_dir_all(&checkpoints).unwrap();
    fs::write(checkpoints.join("resnet-x.pth"), b"corrupt").unwrap();
    let path = fetcher.fetch(&remote, &[&checkpoints]).unwrap();
    assert_eq!(path, tmp.path().join("msad/resnet-x.pth"));
    assert_eq!(server.requests("resnet-x.pth"), 1);
    assert_eq!(
        fs::read(checkpoints.join("resnet-x.pth")).unwrap(),
        b"corrupt"
    );

    // A good one is used as it is, before msad's own cache.
    fs::write(checkpoints.join("resnet-x.pth"), &body).unwrap();
    let path = fetcher.fetch(&remote, &[&checkpoints]).unwrap();
    assert_eq!(path, checkpoints.join("resnet-x.pth"));
    assert_eq!(server.requests("resnet-x.pth"), 1);
}

#[test]
fn offline_forbids_the_network_but_serves_the_cache() {
    let body = payload(1_000);
    let server = FileServer::start(vec![("w.pth", Reply::Body(body.clone()))]);
    let tmp = TempDir::new().unwrap();
    let vars: HashMap<&str, PathBuf> = [
        ("MSAD_OFFLINE", PathBuf::from("1")),
        ("MSAD_CACHE_DIR", tmp.path().to_path_buf()),
    ]
    .into();
    let fetcher = Fetcher::from_vars(|name| vars.get(name).map(|p| p.clone().into_os_string()));
    let remote = Remote::new(
        server.url("w.pth"),
        "w.pth",
        Digest::sha256(sha256_hex(&body)),
    );
    let (failure, message) = fetch_failure(fetcher.fetch(&remote, &[]));
    assert_eq!(failure, FetchFailure::Offline);
    assert!(
        message.contains(&tmp.path().join("w.pth").display().to_string()),
        "{message}"
    );
    assert_eq!(server.requests("w.pth"), 0);

    fs::write(tmp.path().join("w.pth"), &body).unwrap();
    assert_eq!(
        fetcher.fetch(&remote, &[]).unwrap(),
        tmp.path().join("w.pth")
    );
    assert_eq!(server.requests("w.pth"), 0);
}

#[test]
fn a_corrupt_file_in_msads_cache_is_fetched_again() {
    let body = payload(1_000);
    let server = FileServer::start(vec![("w.pth", Reply::Body(body.clone()))]);
    let tmp = TempDir::new().unwrap();
    fs::write(tmp.path().join("w.pth"), b"half a file").unwrap();
    let remote = Remote::new(
        server.url("w.pth"),
        "w.pth",
        Digest::sha256(sha256_hex(&body)),
    );
    let path = fetcher(tmp.path(), None).fetch(&remote, &[]).unwrap();
    assert_eq!(fs::read(path).unwrap(), body);
    assert_eq!(server.requests("w.pth"), 1);
}

// ------------------------------------------------------------------------------------------
// Archives
// ------------------------------------------------------------------------------------------

/// A tar header for `path` (written raw, so that paths the `tar` crate's builder refuses can
/// be written too).
fn raw_header(path: &str, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    let name = &mut header.as_old_mut().name;
    name[..path.len()].copy_from_slice(path.as_bytes());
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_cksum();
    header
}

/// A .tar.gz of `(path, kind, contents)` entries, plus a symlink target for links.
fn tar_gz(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(encoder);
    for (path, kind, contents) in entries {
        let mut header = raw_header(path, *kind, contents.len() as u64);
        if *kind == tar::EntryType::Symlink {
            header.set_link_name("/etc").unwrap();
            header.set_size(0);
            header.set_cksum();
            builder.append(&header, &[][..]).unwrap();
        } else {
            builder.append(&header, *contents).unwrap();
        }
    }
    builder.into_inner().unwrap().finish().unwrap()
}

/// Downloads `archive` as CIFAR-10 into a fresh `root/data` and returns the result.
fn download_cifar10(archive: Vec<u8>, root: &Path) -> msad::Result<Cifar10> {
    let md5 = md5_hex(&archive);
    let server = FileServer::start(vec![("c10.tar.gz", Reply::Body(archive))]);
    let fetcher = Fetcher::from_vars(|_| None).with_data_url(&server.base);
    let remote = Remote::new(
        format!("{}/c10.tar.gz", fetcher.data_url()),
        "c10.tar.gz",
        Digest::md5(md5),
    );
    Cifar10::download_from(root.join("data"), &remote, &fetcher)
}

fn assert_refused(result: msad::Result<Cifar10>, entry: &str, root: &Path) {
    match result {
        Err(Error::Archive {
            entry: found,
            reason,
            ..
        }) => {
            assert_eq!(found, entry, "{reason}");
        }
        other => panic!("expected Error::Archive for {entry}, got {other:?}"),
    }
    // Only the verified archive itself stays; nothing was extracted, inside or outside.
    assert_eq!(files_under(root), vec![PathBuf::from("data/c10.tar.gz")]);
}

#[test]
fn tarball_with_a_parent_dir_entry_is_refused() {
    let tmp = TempDir::new().unwrap();
    let archive = tar_gz(&[
        (
            "cifar-10-batches-py/readme.html",
            tar::EntryType::Regular,
            b"ok",
        ),
        (
            "cifar-10-batches-py/../../evil.txt",
            tar::EntryType::Regular,
            b"x",
        ),
    ]);
    assert_refused(
        download_cifar10(archive, tmp.path()),
        "cifar-10-batches-py/../../evil.txt",
        tmp.path(),
    );
}

#[test]
fn tarball_with_an_absolute_path_is_refused() {
    let tmp = TempDir::new().unwrap();
    let outside = tmp.path().join("outside.txt");
    let outside = outside.to_str().unwrap().to_string();
    let archive = tar_gz(&[(&outside, tar::EntryType::Regular, b"x")]);
    assert_refused(download_cifar10(archive, tmp.path()), &outside, tmp.path());
}

#[test]
fn tarball_with_a_symlink_is_refused() {
    let tmp = TempDir::new().unwrap();
    let archive = tar_gz(&[
        ("cifar-10-batches-py", tar::EntryType::Directory, b""),
        (
            "cifar-10-batches-py/data_batch_1",
            tar::EntryType::Symlink,
            b"",
        ),
    ]);
    assert_refused(
        download_cifar10(archive, tmp.path()),
        "cifar-10-batches-py/data_batch_1",
        tmp.path(),
    );
}

/// The python-version fixture (scripts/make_cifar_pickle.py) packed as torchvision's archive.
fn python_archive(folder: &str) -> Vec<u8> {
    let dir = common::fixture("cifar", folder);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let contents: Vec<(String, Vec<u8>)> = names
        .iter()
        .map(|n| (format!("{folder}/{n}"), fs::read(dir.join(n)).unwrap()))
        .collect();
    let entries: Vec<(&str, tar::EntryType, &[u8])> = contents
        .iter()
        .map(|(n, c)| (n.as_str(), tar::EntryType::Regular, c.as_slice()))
        .collect();
    tar_gz(&entries)
}

#[test]
fn cifar10_downloads_extracts_and_matches_the_binary_version() {
    let tmp = TempDir::new().unwrap();
    let downloaded = download_cifar10(python_archive("cifar-10-batches-py"), tmp.path()).unwrap();
    let binary = Cifar10::open(common::fixture("cifar", "cifar-10-batches-bin")).unwrap();
    assert_eq!(downloaded.train_labels(), binary.train_labels());
    assert_eq!(downloaded.test_labels(), binary.test_labels());
    assert_eq!(downloaded.train_images(), binary.train_images());
    assert_eq!(downloaded.test_images(), binary.test_images());
    assert!(downloaded.dir().ends_with("data/cifar-10-batches-py"));
    // A second call finds the extracted folder and fetches nothing.
    let fetcher = Fetcher::from_vars(|_| None)
        .with_data_url("http://127.0.0.1:9")
        .with_offline(true);
    let again = Cifar10::download(tmp.path().join("data"), &fetcher).unwrap();
    assert_eq!(again.train_labels(), binary.train_labels());
}

#[test]
fn cifar100_downloads_through_the_same_path() {
    let tmp = TempDir::new().unwrap();
    let archive = python_archive("cifar-100-python");
    let md5 = md5_hex(&archive);
    let server = FileServer::start(vec![("c100.tar.gz", Reply::Body(archive))]);
    let fetcher = Fetcher::from_vars(|_| None);
    let remote = Remote::new(server.url("c100.tar.gz"), "c100.tar.gz", Digest::md5(md5));
    let downloaded = Cifar100::download_from(tmp.path(), &remote, &fetcher).unwrap();
    let binary = Cifar100::open(common::fixture("cifar", "cifar-100-binary")).unwrap();
    assert_eq!(downloaded.train_fine_labels(), binary.train_fine_labels());
    assert_eq!(downloaded.test_coarse_labels(), binary.test_coarse_labels());
    assert_eq!(downloaded.train_images(), binary.train_images());
    assert_eq!(server.requests("c100.tar.gz"), 1);
}

// ------------------------------------------------------------------------------------------
// The examples
// ------------------------------------------------------------------------------------------

#[test]
fn embed_with_arch_alone_fetches_imagenet_weights_and_reports_where_to_put_them() {
    let tmp = TempDir::new().unwrap();
    let torch = tmp.path().join("torch/hub/checkpoints");
    fs::create_dir_all(&torch).unwrap();
    // A file of the right name but the wrong bytes in PyTorch's cache is not trusted.
    fs::write(torch.join("resnet18-f37072fd.pth"), b"not the weights").unwrap();
    let output = std::process::Command::new(common::example("embed"))
        .args(["--arch", "resnet18", "--device", "flex", "--input"])
        .arg(common::fixture("encoder", "input.npy"))
        .arg("--output")
        .arg(tmp.path().join("x.npy"))
        .env("MSAD_OFFLINE", "1")
        .env("MSAD_CACHE_DIR", tmp.path().join("msad"))
        .env("TORCH_HOME", tmp.path().join("torch"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "sha256 f37072fd",
        "offline",
    ] {
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
    }
    let manual = tmp.path().join("msad/resnet18-f37072fd.pth");
    assert!(stderr.contains(&manual.display().to_string()), "{stderr}");
    assert!(!tmp.path().join("x.npy").exists());
}
