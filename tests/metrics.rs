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
