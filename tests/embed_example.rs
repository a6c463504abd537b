//! The `embed` example end to end: a checkpoint and a `.npy` of images in, torchvision's
//! normalised features out. `cargo test` builds the examples next to the test binaries.

mod common;

use std::process::Command;

use common::{example, fixture, max_abs_diff};

#[test]
fn embed_writes_torchvision_features() {
    let dir = tempfile::tempdir().unwrap();
    for net in ["narrow18", "narrow50"] {
        let out = dir.path().join(format!("{net}.npy"));
        let mut cmd = Command::new(example("embed"));
        cmd.args(["--weights"])
            .arg(fixture("encoder", &format!("{net}.pth")))
            .arg("--input")
            .arg(fixture("encoder", "input.npy"))
            .arg("--output")
            .arg(&out)
            .args(["--device", "flex", "--batch", "2"]);
        let status = cmd.status().unwrap();
        assert!(status.success(), "{net}: {status}");
        let got = msad::npy::read_f32(&out).unwrap();
        let want = msad::npy::read_f32(fixture("encoder", &format!("{net}_embed.npy"))).unwrap();
        assert_eq!(got.shape(), want.shape());
        let diff = max_abs_diff(got.as_slice().unwrap(), want.as_slice().unwrap());
        assert!(diff <= 1e-4, "{net}: {diff}");
    }
}

#[test]
fn embed_reports_a_wrong_architecture_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(example("embed"))
        .arg("--weights")
        .arg(fixture("encoder", "narrow50.pth"))
        .args(["--arch", "resnet50", "--device", "flex"])
        .arg("--input")
        .arg(fixture("encoder", "input.npy"))
        .arg("--output")
        .arg(dir.path().join("x.npy"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bn1.bias") && stderr.contains("[64]"),
        "{stderr}"
    );
    assert!(!dir.path().join("x.npy").exists());
}
