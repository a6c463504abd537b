//! ROC-AUC and average precision against scikit-learn, ties included.

mod common;

use common::fixture;

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    roc_auc: f64,
    average_precision: f64,
}

fn load(name: &str) -> (Vec<f32>, Vec<bool>) {
    let scores = msad::npy::read_f32(fixture("metrics", &format!("{name}_scores.npy"))).unwrap();
    let labels = msad::npy::read_f32(fixture("metrics", &format!("{name}_labels.npy"))).unwrap();
    (
        scores.iter().copied().collect(),
        labels.iter().map(|v| *v != 0.0).collect(),
    )
}

#[test]
fn equal_to_scikit_learn() {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(fixture("metrics", "cases.json")).unwrap())
            .unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let (scores, labels) = load(&case.name);
        let auc = msad::metrics::roc_auc(&scores, &labels).unwrap();
        let ap = msad::metrics::average_precision(&scores, &labels).unwrap();
        assert!(
            (auc - case.roc_auc).abs() <= 1e-12,
            "{}: {auc} vs {}",
            case.name,
            case.roc_auc
        );
        assert!(
            (ap - case.average_precision).abs() <= 1e-12,
            "{}: {ap} vs {}",
            case.name,
            case.average_precision
        );
    }
}

#[test]
fn the_auc_is_invariant_to_monotone_transforms_and_input_order() {
    let (scores, labels) = load("ties_500");
    let base = msad::metrics::roc_auc(&scores, &labels).unwrap();
    let exp: Vec<f32> = scores.iter().map(|s| (s * 0.5).exp()).collect();
    assert!((msad::metrics::roc_auc(&exp, &labels).unwrap() - base).abs() < 1e-12);
    let (mut s2, mut l2) = (scores.clone(), labels.clone());
    s2.reverse();
    l2.reverse();
    assert!((msad::metrics::roc_auc(&s2, &l2).unwrap() - base).abs() < 1e-12);
}

// ------------------------------------------------------------------------------------------
// Pixel metrics: scikit-learn's pixel ROC-AUC and the MVTec AD per-region overlap, written
// by scripts/make_pixel_metric_fixtures.py.
// ------------------------------------------------------------------------------------------

#[derive(serde::Deserialize)]
struct PixelCase {
    name: String,
    shape: Vec<usize>,
    regions: usize,
    pixel_roc_auc: f64,
    pro_auc_0_3: f64,
    pro_auc_1_0: f64,
}

/// The maps and masks of a pixel case, one `[H, W]` array per image.
fn load_pixel(case: &PixelCase) -> (Vec<ndarray::Array2<f32>>, Vec<ndarray::Array2<bool>>) {
    let read = |what: &str| {
        let path = fixture("metrics", &format!("pixel/{}_{what}.npy", case.name));
        msad::npy::read_f32_shaped(path, &case.shape).unwrap()
    };
    let (maps, masks) = (read("maps"), read("masks"));
    let (h, w) = (case.shape[1], case.shape[2]);
    let image = |array: &ndarray::ArrayD<f32>, i: usize| {
        array
            .index_axis(ndarray::Axis(0), i)
            .to_shape((h, w))
            .unwrap()
            .to_owned()
    };
    (0..case.shape[0])
        .map(|i| (image(&maps, i), image(&masks, i).mapv(|v| v != 0.0)))
        .unzip()
}

fn pixel_cases() -> Vec<PixelCase> {
    let path = fixture("metrics", "pixel/cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn pixel_metrics_equal_the_python_references() {
    let cases = pixel_cases();
    assert_eq!(cases.len(), 4);
    for case in &cases {
        let (maps, masks) = load_pixel(case);
        let maps: Vec<_> = maps.iter().map(|m| m.view()).collect();
        let masks: Vec<_> = masks.iter().map(|m| m.view()).collect();
        let auc = msad::metrics::pixel_roc_auc(&maps, &masks).unwrap();
        assert!(
            (auc - case.pixel_roc_auc).abs() <= 1e-9,
            "{}: pixel ROC-AUC {auc} vs scikit-learn {}",
            case.name,
            case.pixel_roc_auc
        );
        for (max_fpr, expected) in [(0.3, case.pro_auc_0_3), (1.0, case.pro_auc_1_0)] {
            let pro = msad::metrics::pro_auc(&maps, &masks, max_fpr).unwrap();
            assert!(
                (pro - expected).abs() <= 1e-9,
                "{} ({} regions): PRO-AUC up to {max_fpr} is {pro}, the reference {expected}",
                case.name,
                case.regions
            );
        }
    }
}

fn views(maps: &[ndarray::Array2<f32>]) -> Vec<ndarray::ArrayView2<'_, f32>> {
    maps.iter().map(|m| m.view()).collect()
}

#[test]
fn pixel_metrics_are_invariant_to_image_order_and_monotone_transforms() {
    let case = pixel_cases()
        .into_iter()
        .find(|c| c.name == "ties_3x24x32")
        .unwrap();
    let (maps, masks) = load_pixel(&case);
    let mask_views: Vec<_> = masks.iter().map(|m| m.view()).collect();
    let base_auc = msad::metrics::pixel_roc_auc(&views(&maps), &mask_views).unwrap();
    let base_pro = msad::metrics::pro_auc(&views(&maps), &mask_views, 0.3).unwrap();

    let exp: Vec<_> = maps.iter().map(|m| m.mapv(|v| (v * 0.5).exp())).collect();
    let auc = msad::metrics::pixel_roc_auc(&views(&exp), &mask_views).unwrap();
    let pro = msad::metrics::pro_auc(&views(&exp), &mask_views, 0.3).unwrap();
    assert!((auc - base_auc).abs() < 1e-12 && (pro - base_pro).abs() < 1e-12);

    let (mut m2, mut k2) = (views(&maps), mask_views.clone());
    m2.reverse();
    k2.reverse();
    let auc = msad::metrics::pixel_roc_auc(&m2, &k2).unwrap();
    let pro = msad::metrics::pro_auc(&m2, &k2, 0.3).unwrap();
    assert!((auc - base_auc).abs() < 1e-12 && (pro - base_pro).abs() < 1e-12);
}

#[test]
fn pixel_metrics_accept_images_of_different_sizes() {
    use ndarray::array;
    let small = array![[0.9f32, 0.1]];
    let small_mask = array![[true, false]];
    let large = array![[0.2f32, 0.3, 0.0], [0.8, 0.95, 0.4]];
    let large_mask = array![[false, false, false], [true, true, false]];
    let maps = [small.view(), large.view()];
    let masks = [small_mask.view(), large_mask.view()];
    assert_eq!(msad::metrics::pixel_roc_auc(&maps, &masks).unwrap(), 1.0);
    let pro = msad::metrics::pro_auc(&maps, &masks, 0.3).unwrap();
    assert!((pro - 1.0).abs() < 1e-12, "{pro}");
}
