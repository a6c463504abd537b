//! Shared helpers for the integration tests: the backends to run on and fixture paths.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use msad::device::{Backend, SelectedDevice};
use msad::encoder::ResNet;

/// Every backend compiled into this build that has a device here.
///
/// wgpu needs an adapter (on a machine without a GPU, Mesa's lavapipe, which .ci/run installs).
/// Where it has none, it is left out with one line on stderr, unless `MSAD_REQUIRE_WGPU=1`
/// (set by .ci/run), which makes that a failure so that CI always proves the wgpu path.
/// `MSAD_TEST_SKIP_WGPU=1` leaves it out on purpose.
pub fn backends() -> Vec<SelectedDevice> {
    let flag = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0");
    let (skip_wgpu, require_wgpu) = (flag("MSAD_TEST_SKIP_WGPU"), flag("MSAD_REQUIRE_WGPU"));
    Backend::enabled()
        .into_iter()
        .filter(|b| !(skip_wgpu && *b == Backend::Wgpu))
        .filter_map(|b| match msad::device::select(b.name()) {
            Ok(selected) => Some(selected),
            Err(e) if b == Backend::Wgpu && !require_wgpu => {
                static SAID: std::sync::Once = std::sync::Once::new();
                // Straight to the process's stderr: the harness captures `eprintln!`.
                SAID.call_once(|| {
                    let _ = writeln!(
                        std::io::stderr(),
                        "skipping wgpu: {e} (set MSAD_REQUIRE_WGPU=1 to make this fail)"
                    );
                });
                None
            }
            Err(e) => panic!("backend {b} is enabled but unusable: {e}"),
        })
        .collect()
}

/// `target/<profile>/examples/<name>`: cargo builds the examples next to the test binaries.
pub fn example(name: &str) -> PathBuf {
    let deps = std::env::current_exe().expect("the test binary's path");
    let profile_dir = deps
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let exe = profile_dir.join("examples").join(name);
    assert!(exe.exists(), "{} not built", exe.display());
    exe
}

/// `tests/fixtures/<section>/<name>`.
pub fn fixture(section: &str, name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(section)
        .join(name)
}

/// Largest absolute difference; panics on a length mismatch.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `count` floats uniform in [-1, 1) from SplitMix64; bit-identical to
/// `splitmix_uniform` in scripts/make_fixtures.py.
pub fn splitmix_uniform(seed: u64, count: usize) -> Vec<f64> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 * 2f64.powi(-53) * 2.0 - 1.0
        })
        .collect()
}

/// Row / its norm, summed sequentially in f64, rounded to f32 (as the fixture script does).
pub fn unit_f32(row: &[f64]) -> Vec<f32> {
    let norm = row.iter().fold(0.0f64, |acc, v| acc + v * v).sqrt();
    row.iter().map(|v| (v / norm) as f32).collect()
}

/// The loss fixtures' inputs: (phi1, phi2) as B × D row-major and the center (D).
pub fn loss_case_inputs(
    b: usize,
    d: usize,
    seed: u64,
    angular: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let values = splitmix_uniform(seed, d * (2 * b + 1));
    let base = &values[..d];
    let phi: Vec<Vec<f32>> = (0..2 * b)
        .map(|i| {
            let row: Vec<f64> = base
                .iter()
                .zip(&values[d * (1 + i)..d * (2 + i)])
                .map(|(x, y)| 2.0 * x + y)
                .collect();
            unit_f32(&row)
        })
        .collect();
    let mut center = vec![0.0f64; d];
    for row in &phi {
        for (c, v) in center.iter_mut().zip(row) {
            *c += *v as f64;
        }
    }
    let center: Vec<f64> = center.iter().map(|v| v / (2 * b) as f64).collect();
    let center = if angular {
        unit_f32(&center)
    } else {
        center.iter().map(|v| *v as f32).collect()
    };
    let flat = |rows: &[Vec<f32>]| rows.iter().flatten().copied().collect::<Vec<f32>>();
    (flat(&phi[..b]), flat(&phi[b..]), center)
}

/// max |a − b| / max |b|: the error relative to the reference's scale.
pub fn rel_max_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    let err = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    if scale == 0.0 { err } else { err / scale }
}

/// Every float parameter with its module path, id, rank and values.
#[derive(Default)]
pub struct Params {
    path: Vec<String>,
    found: Vec<(String, ParamId, usize, Vec<f32>)>,
}

impl ModuleVisitor for Params {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let values = msad::host::vec_from_tensor(param.val()).unwrap();
        self.found.push((self.path.join("."), param.id, D, values));
    }
}

pub fn params(model: &ResNet) -> Vec<(String, ParamId, usize, Vec<f32>)> {
    let mut v = Params::default();
    model.visit(&mut v);
    v.found
}

/// What a child test run printed, and whether it passed.
pub struct ChildRun {
    /// The child exited normally and its harness reported the test passed.
    pub passed: bool,
    /// Its standard output (the harness's report and `--nocapture` prints).
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Runs the test `name` of this test binary again in a child process whose address space is
/// capped at `limit_mib` MiB (`ulimit -v`, Linux; elsewhere uncapped), with `MSAD_IN_CHILD=1`,
/// one malloc arena and one rayon thread (the cap is on address space, which every arena and
/// thread stack reserves), killed after 60 s. An abort, an allocation failure or a loop without
/// end in the child is then a failed run, so a test of "refused in bounded memory" fails where
/// the code would abort. The child test checks [`in_child`] to run its body.
pub fn run_test_in_child(name: &str, limit_mib: u64) -> ChildRun {
    let exe = std::env::current_exe().expect("the test binary's path");
    let limit = if cfg!(target_os = "linux") {
        format!("ulimit -v {} && ", limit_mib * 1024)
    } else {
        String::new()
    };
    let started = std::time::Instant::now();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{limit}exec \"$0\" \"$@\""))
        .arg(exe)
        .args([
            name,
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("MSAD_IN_CHILD", "1")
        .env("MALLOC_ARENA_MAX", "1")
        .env("RAYON_NUM_THREADS", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sh runs");
    while child.try_wait().expect("the child's status").is_none() {
        if started.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("the child's output");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ChildRun {
        passed: output.status.success() && stdout.contains("1 passed"),
        stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Whether this process is a child started by [`run_test_in_child`].
pub fn in_child() -> bool {
    std::env::var_os("MSAD_IN_CHILD").is_some()
}

/// Writes `from` (a `.safetensors` file) to `to` with value `index` (row-major) of tensor
/// `key` replaced by `value`, as a corrupted or tampered file would hold it.
pub fn patch_safetensors(
    from: &std::path::Path,
    to: &std::path::Path,
    key: &str,
    index: usize,
    value: f32,
) {
    let mut bytes = std::fs::read(from).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let entry = &header[key];
    let keys: Vec<&String> = header.as_object().unwrap().keys().collect();
    assert_eq!(entry["dtype"], "F32", "{key} among {keys:?}");
    let start = entry["data_offsets"][0].as_u64().unwrap() as usize;
    let at = 8 + header_len + start + 4 * index;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(to, bytes).unwrap();
}
