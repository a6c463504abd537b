//! The HTML report (`msad::report`) from synthetic data: self-contained, written atomically,
//! and rendered in a real headless Chromium: a screenshot that is not blank, every chart and
//! image laid out with a non-zero size, every image decoded, no console or load errors, no
//! horizontal overflow.
//!
//! Without `chromium` on PATH the browser test prints one line and passes, unless
//! `MSAD_REQUIRE_CHROMIUM=1` (CI sets it). `MSAD_CHROMIUM=/path/to/chrome` picks the browser;
//! `MSAD_REPORT_ARTIFACTS=dir` keeps `report.html` and `screenshot.png` there to look at.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};
use msad::report::{AnomalyHeatmap, FeaturedImage, Report, ReportEntry};

/// A browser run taking longer than this is killed and fails the test.
const TIMEOUT: Duration = Duration::from_secs(60);
/// The browser window: the screenshot's size, and the layout width checked for overflow.
const WINDOW: (u32, u32) = (1200, 3000);

// ---- synthetic data --------------------------------------------------------------------------

/// A small deterministic generator (xorshift64*), so that the report is the same every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// A "part": a lit disc with a ring on a textured background; `defect` draws a dark scratch
/// centred at that pixel.
fn part(size: u32, tint: u8, defect: Option<(u32, u32)>) -> RgbImage {
    let c = size as f32 / 2.0;
    RgbImage::from_fn(size, size, |x, y| {
        let (dx, dy) = (x as f32 - c, y as f32 - c);
        let r = (dx * dx + dy * dy).sqrt() / c;
        let texture = ((x * 7 + y * 13) % 11) as f32;
        let mut v = if r < 0.8 {
            170.0 + 50.0 * (1.0 - r) + texture
        } else {
            60.0 + texture * 2.0
        };
        if (0.55..0.62).contains(&r) {
            v -= 60.0;
        }
        let mut pixel = [v, v * 0.95 + f32::from(tint) * 0.1, v * 0.85];
        if let Some((sx, sy)) = defect {
            let along = (x as f32 - sx as f32) + (y as f32 - sy as f32);
            let across = (x as f32 - sx as f32) - (y as f32 - sy as f32);
            if along.abs() < size as f32 * 0.2 && across.abs() < 2.5 {
                pixel = [70.0, 40.0, 30.0];
            }
        }
        Rgb(pixel.map(|v| v.clamp(0.0, 255.0) as u8))
    })
}

/// A map of `size` × `size`: low everywhere, a hot spot of `peak` at `spot`.
fn hot_spot(size: u32, spot: (u32, u32), peak: f32) -> AnomalyHeatmap {
    let sigma = size as f32 * 0.12;
    let values = (0..size * size)
        .map(|i| {
            let (x, y) = ((i % size) as f32, (i / size) as f32);
            let d2 = (x - spot.0 as f32).powi(2) + (y - spot.1 as f32).powi(2);
            0.12 + 0.1 * ((x + y) / (2.0 * size as f32))
                + peak * (-d2 / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    AnomalyHeatmap::new(size, size, values).unwrap()
}

/// 60 normal, 20 anomalous, 8 unlabeled scores and one NaN; three featured images with maps and
/// three neighbours each.
fn synthetic_report() -> Report {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let raw = |n: f32| 2.0 + 8.0 * n;
    let mut entries = Vec::new();
    for i in 0..60 {
        let n = 0.08 + 0.45 * rng.next() * rng.next().sqrt();
        entries.push(ReportEntry::new(format!("good/{i:03}.png"), n, raw(n)).with_label(false));
    }
    for i in 0..20 {
        let n = 0.3 + 0.65 * rng.next();
        entries.push(ReportEntry::new(format!("scratch/{i:03}.png"), n, raw(n)).with_label(true));
    }
    for i in 0..8 {
        let n = 0.1 + 0.8 * rng.next();
        entries.push(ReportEntry::new(format!("unsorted/{i:03}.png"), n, raw(n)));
    }
    entries.push(ReportEntry::new("corrupt/000.png", f32::NAN, f32::NAN).with_label(true));

    let labelled: Vec<&ReportEntry> = entries
        .iter()
        .filter(|e| e.normalized.is_finite())
        .collect();
    let (scores, labels): (Vec<f32>, Vec<bool>) = labelled
        .iter()
        .filter_map(|e| e.label.map(|l| (e.raw, l)))
        .unzip();
    let auc = msad::metrics::roc_auc(&scores, &labels).unwrap();

    let size = 96;
    let neighbors = |seed: u8| {
        (0..3u8).map(move |k| {
            (
                format!("train/good/{:03}.png", seed * 10 + k),
                part(size, seed * 40 + k * 20, None),
            )
        })
    };
    // Featured: the highest-scoring anomaly, the lowest-scoring one (missed), a normal image.
    let finite = || entries.iter().filter(|e| e.normalized.is_finite());
    let by_score = |a: &&ReportEntry, b: &&ReportEntry| a.normalized.total_cmp(&b.normalized);
    let top = finite()
        .filter(|e| e.label == Some(true))
        .max_by(by_score)
        .unwrap();
    let low = finite()
        .filter(|e| e.label == Some(true))
        .min_by(by_score)
        .unwrap();
    let normal = finite().find(|e| e.label == Some(false)).unwrap();
    let feature = |e: &ReportEntry, tint: u8, spot: Option<(u32, u32)>, peak: f32| {
        let spot_or_centre = spot.unwrap_or((size / 2, size / 2));
        let mut f = FeaturedImage::new(
            e.name.clone(),
            part(size, tint, spot),
            e.normalized,
            e.raw,
            e.normalized > 0.5,
        )
        .with_heatmap(hot_spot(size, spot_or_centre, peak));
        f.label = e.label;
        f.neighbors.extend(neighbors(tint / 30 + 1));
        f
    };
    let featured = [
        feature(top, 0, Some((60, 34)), 1.1),
        feature(low, 30, Some((30, 64)), 0.45),
        feature(normal, 60, None, 0.05),
    ];
    assert!(
        !featured[1].anomalous,
        "the synthetic data should hold a missed anomaly"
    );

    let report = Report::new("bottle — test set <synthetic>")
        .with_description(
            "Synthetic images and scores for msad's report test: ResNet-18, 10 epochs of MSC \
             fine-tuning, k = 2.\n\nAnomaly maps peak where the scratch is.",
        )
        .with_raw_threshold(raw(0.5))
        .with_figure("image ROC-AUC", format!("{auc:.3}"))
        .with_figure("training images", "209")
        .with_entries(entries);
    featured.into_iter().fold(report, Report::with_featured)
}

/// `<img>`s the synthetic report holds: per featured image, the image, the overlay and three
/// neighbours.
const EXPECTED_IMGS: usize = 3 * (2 + 3);

// ---- the page itself, no browser ---------------------------------------------------------------

#[test]
fn the_report_is_self_contained_and_written_atomically() {
    let report = synthetic_report();
    let html = report.to_html().unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    for forbidden in ["<script", "<link", "@import", "url(", "<iframe", "<object"] {
        assert!(!html.contains(forbidden), "the report holds `{forbidden}`");
    }
    // The only URL is the SVG namespace; every image source is an embedded PNG.
    let urls = html.matches("http").count();
    let namespaces = html.matches("http://www.w3.org/2000/svg").count();
    assert_eq!(urls, namespaces, "a URL other than the SVG namespace");
    assert_eq!(namespaces, 2, "two charts");
    let sources: Vec<&str> = html.split(" src=\"").skip(1).collect();
    assert_eq!(sources.len(), EXPECTED_IMGS);
    assert!(
        sources
            .iter()
            .all(|s| s.starts_with("data:image/png;base64,"))
    );
    assert!(html.contains("bottle — test set &lt;synthetic&gt;"));
    assert!(html.contains("1 image with a NaN or infinite score is left out of the charts"));

    // write: the file appears whole, replaces an older one, leaves no temporary file behind.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.html");
    std::fs::write(&path, "old").unwrap();
    report.write(&path).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), html);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["report.html"]);

    // A directory that does not exist: Error::Io naming the path.
    let missing = dir.path().join("no/such/dir/report.html");
    let err = report.write(&missing).unwrap_err();
    assert!(matches!(err, msad::Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("no/such/dir/report.html"), "{err}");
}

// ---- the browser -------------------------------------------------------------------------------

/// The browser: `MSAD_CHROMIUM`, else the first of the usual names on PATH.
fn find_chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("MSAD_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
    .find(|candidate| candidate.is_file())
}

/// What a browser run left.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Lines where the page logged to the console (`--enable-logging=stderr` writes every
    /// console message, whatever its level, as `…:CONSOLE…`). The report has no scripts, and
    /// the check script logs nothing: any such line is a problem.
    fn console_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.contains(":CONSOLE"))
            .collect()
    }
}

/// Runs headless Chromium with `args` after the common flags, in its own process group, with
/// its own profile under `work`; kills the whole group and panics after [`TIMEOUT`].
fn chromium(browser: &Path, work: &Path, tag: &str, args: &[String]) -> Run {
    use std::os::unix::process::CommandExt as _;
    let out_path = work.join(format!("{tag}.stdout"));
    let err_path = work.join(format!("{tag}.stderr"));
    let mut command = Command::new(browser);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!(
            "--user-data-dir={}",
            work.join(format!("{tag}-profile")).display()
        ))
        .arg(format!("--window-size={},{}", WINDOW.0, WINDOW.1))
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .process_group(0);
    let start = Instant::now();
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", browser.display()));
    let group = child.id();
    let kill_group = || {
        // Renderer and helper processes share the group; `kill` on `-PGID` ends them all. Only
        // called before the child is reaped, so the group id is still this child's.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{group}")])
            .stderr(Stdio::null())
            .status();
    };
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            kill_group();
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium ({tag}) did not finish within {TIMEOUT:?}; killed. stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("chromium {tag}: {:.1} s", start.elapsed().as_secs_f64());
    Run {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

/// Inserted first in `<head>`: records script errors, failed resource loads (capture phase),
/// unhandled rejections and `console.error` calls.
const HOOK: &str = r#"<script>
window.__msadErrors = [];
window.addEventListener('error', function (e) {
  var t = e.target;
  if (t && t !== window && t.tagName) {
    window.__msadErrors.push('failed to load <' + t.tagName.toLowerCase() + '> ' + String(t.src || t.href || '').slice(0, 60));
  } else {
    window.__msadErrors.push('error: ' + String(e.message));
  }
}, true);
window.addEventListener('unhandledrejection', function (e) { window.__msadErrors.push('unhandled rejection: ' + String(e.reason)); });
(function () {
  var original = console.error;
  console.error = function () {
    window.__msadErrors.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
    return original.apply(console, arguments);
  };
})();
</script>
"#;

/// Appended to `<body>`: after `load`, writes the layout facts as JSON into
/// `<pre id="msad-check">` for `--dump-dom` to carry out.
const CHECK: &str = r#"<script>
window.addEventListener('load', function () {
  function box(el) { var r = el.getBoundingClientRect(); return [r.width, r.height]; }
  var map = Array.prototype.map, filter = Array.prototype.filter;
  var out = {
    svgs: map.call(document.querySelectorAll('svg'), function (s) {
      var b = box(s);
      var texts = filter.call(s.querySelectorAll('text'), function (t) {
        var r = t.getBBox(); return r.width > 0 && r.height > 0;
      }).length;
      return { cls: s.getAttribute('class') || '', w: b[0], h: b[1], texts: texts };
    }),
    imgs: map.call(document.querySelectorAll('img'), function (i) {
      var b = box(i);
      return { alt: i.alt, w: b[0], h: b[1], nw: i.naturalWidth, nh: i.naturalHeight, complete: i.complete };
    }),
    cards: map.call(document.querySelectorAll('.card'), function (c) { var b = box(c); return [b[0], b[1]]; }),
    scrollWidth: document.documentElement.scrollWidth,
    innerWidth: window.innerWidth,
    fontFamily: getComputedStyle(document.body).fontFamily,
    errors: window.__msadErrors
  };
  var pre = document.createElement('pre');
  pre.id = 'msad-check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"#;

/// The JSON the check script left in the dumped DOM.
fn check_results(dom: &str) -> serde_json::Value {
    let start = dom.find("<pre id=\"msad-check\">").unwrap_or_else(|| {
        panic!(
            "no msad-check in the dumped DOM (did `load` fire?):\n{}",
            tail(dom)
        )
    }) + "<pre id=\"msad-check\">".len();
    let end = start
        + dom[start..]
            .find("</pre>")
            .expect("unterminated msad-check");
    let json = dom[start..end]
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&");
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("bad msad-check JSON ({e}): {json}"))
}

/// The browser exited successfully and logged no console message (the report has no scripts,
/// so any message is an error).
fn assert_ran_clean(run: &Run) {
    assert!(
        run.status.success(),
        "chromium failed: {}\n{}",
        run.status,
        tail(&run.stderr)
    );
    assert!(
        run.console_lines().is_empty(),
        "console output: {:#?}",
        run.console_lines()
    );
}

fn tail(text: &str) -> &str {
    let cut = text.len().saturating_sub(2000);
    let cut = (cut..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    &text[cut..]
}

fn number(v: &serde_json::Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` missing in {v}"))
}

#[test]
fn the_report_renders_in_headless_chromium() {
    let Some(browser) = find_chromium() else {
        if std::env::var("MSAD_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
            panic!("MSAD_REQUIRE_CHROMIUM=1 but no chromium on PATH (or MSAD_CHROMIUM)");
        }
        println!("skipped: no chromium on PATH (set MSAD_REQUIRE_CHROMIUM=1 to make this fail)");
        return;
    };
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let report_path = work.path().join("report.html");
    let report = synthetic_report();
    report.write(&report_path).unwrap();
    let html = std::fs::read_to_string(&report_path).unwrap();

    // 1. The report as a user opens it: a screenshot, not blank, and a silent console.
    let screenshot = work.path().join("screenshot.png");
    let run = chromium(
        &browser,
        work.path(),
        "screenshot",
        &[
            format!("--screenshot={}", screenshot.display()),
            format!("file://{}", report_path.display()),
        ],
    );
    assert_ran_clean(&run);
    let shot = image::open(&screenshot)
        .unwrap_or_else(|e| panic!("no readable screenshot ({e}); stdout {}", run.stdout))
        .to_rgb8();
    assert_eq!(shot.dimensions(), WINDOW);
    let colors: HashSet<[u8; 3]> = shot.pixels().map(|p| p.0).collect();
    let luma: Vec<f64> = shot
        .pixels()
        .map(|p| 0.299 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2]))
        .collect();
    let mean = luma.iter().sum::<f64>() / luma.len() as f64;
    let std = (luma.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / luma.len() as f64).sqrt();
    // The page background (#f4f6f9) and white cards are most of the page; the header, charts,
    // images and text are the rest.
    let plain = shot
        .pixels()
        .filter(|p| p.0 == [0xf4, 0xf6, 0xf9] || p.0 == [255, 255, 255])
        .count();
    let drawn = 1.0 - plain as f64 / luma.len() as f64;
    println!(
        "screenshot: {} colours, luma std {std:.1}, {:.1} % drawn",
        colors.len(),
        100.0 * drawn
    );
    assert!(
        colors.len() > 1000,
        "a nearly blank page: {} colours",
        colors.len()
    );
    assert!(std > 20.0, "a nearly blank page: luma std {std:.1}");
    assert!(
        drawn > 0.1,
        "a nearly blank page: {:.1} % drawn",
        100.0 * drawn
    );
    // The dark header band is at the top.
    let header = shot.get_pixel(20, 20);
    assert!(
        header.0.iter().all(|&c| c < 120),
        "no dark header at the top: {header:?}"
    );

    // 2. The same page with the hook and the check script: sizes, decoding, errors.
    let wrapper = html
        .replacen("<head>", &format!("<head>\n{HOOK}"), 1)
        .replacen("</body>", &format!("{CHECK}</body>"), 1);
    assert!(wrapper.contains("__msadErrors") && wrapper.contains("msad-check"));
    let wrapper_path = work.path().join("check.html");
    std::fs::write(&wrapper_path, wrapper).unwrap();
    let run = chromium(
        &browser,
        work.path(),
        "check",
        &[
            "--virtual-time-budget=5000".to_string(),
            "--dump-dom".to_string(),
            format!("file://{}", wrapper_path.display()),
        ],
    );
    assert_ran_clean(&run);
    let check = check_results(&run.stdout);
    println!("layout: {check}");

    let errors = check["errors"].as_array().expect("errors");
    assert!(errors.is_empty(), "errors in the page: {errors:?}");

    let svgs = check["svgs"].as_array().expect("svgs");
    assert_eq!(svgs.len(), 2, "the ROC curve and the histogram: {svgs:?}");
    for svg in svgs {
        assert_eq!(svg["cls"], "chart-svg", "{svg}");
        assert!(
            number(svg, "w") > 300.0 && number(svg, "h") > 200.0,
            "a collapsed chart: {svg}"
        );
        // Axis labels, captions and legends render as text without any font file.
        assert!(
            number(svg, "texts") >= 10.0,
            "a chart without its labels: {svg}"
        );
    }

    let imgs = check["imgs"].as_array().expect("imgs");
    assert_eq!(imgs.len(), EXPECTED_IMGS, "{imgs:?}");
    for img in imgs {
        assert!(img["complete"].as_bool() == Some(true), "not loaded: {img}");
        assert!(
            number(img, "nw") > 0.0 && number(img, "nh") > 0.0,
            "not decoded: {img}"
        );
        assert!(
            number(img, "w") > 0.0 && number(img, "h") > 0.0,
            "zero size: {img}"
        );
    }
    // Featured images are shown large (their 96 px are scaled up), thumbnails at 96 px.
    let large = imgs.iter().filter(|i| number(i, "w") >= 200.0).count();
    assert_eq!(large, 6, "{imgs:?}");

    for card in check["cards"].as_array().expect("cards") {
        assert!(
            card[0].as_f64() > Some(0.0) && card[1].as_f64() > Some(0.0),
            "{card}"
        );
    }
    let (scroll, inner) = (number(&check, "scrollWidth"), number(&check, "innerWidth"));
    assert!(
        scroll <= inner,
        "the page overflows sideways: {scroll} > {inner}"
    );
    assert!(
        check["fontFamily"]
            .as_str()
            .is_some_and(|f| f.contains("sans-serif")),
        "{}",
        check["fontFamily"]
    );

    if let Some(dir) = std::env::var_os("MSAD_REPORT_ARTIFACTS") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&report_path, dir.join("report.html")).unwrap();
        std::fs::copy(&screenshot, dir.join("screenshot.png")).unwrap();
        println!("kept report.html and screenshot.png in {}", dir.display());
    }
    println!("browser check: {:.1} s", started.elapsed().as_secs_f64());
}
