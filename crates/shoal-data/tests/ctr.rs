//! Click logs: the Criteo and Avazu samples read into keyed rows, stable hashing,
//! malformed rows named with file and line (fatal or skipped and counted), AUC against
//! a brute-force pairwise count (ties included), and the synthetic generator.

use shoal_data::ctr::{self, BadRows, FieldKind, SynthConfig};
use shoal_data::metrics::{auc, logloss};
use std::path::Path;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/ctr");

#[test]
fn criteo_and_avazu_samples_are_read() {
    let (d, schema, rep) =
        ctr::read_csv(&Path::new(DATA).join("criteo_sample.txt"), BadRows::Fail).unwrap();
    assert_eq!((d.len(), d.fields, rep.skipped), (200, 39, 0));
    assert_eq!(schema.fields[0], (1, "I1".to_string(), FieldKind::Integer));
    assert_eq!(schema.fields[13].2, FieldKind::Categorical);
    assert!(d.labels.iter().all(|&l| l == 0.0 || l == 1.0));
    // Row 1's C1 is 05db9164 (field 13); its I2 is 3 (field 1, bucket 2 -> ln(3)^2 = 1).
    assert_eq!(d.row(0)[13], ctr::feature_key(13, b"05db9164"));
    assert_eq!(d.row(0)[1], ctr::feature_key(1, &1i64.to_le_bytes()));
    let (a, schema, _) =
        ctr::read_csv(&Path::new(DATA).join("avazu_sample.txt"), BadRows::Fail).unwrap();
    // id and click are not features.
    assert_eq!((a.len(), a.fields, schema.label_col), (100, 22, Some(1)));
}

#[test]
fn keys_are_stable_and_field_salted() {
    // A key must not change between runs, machines or versions. The values come from
    // an independent Python transcription of the hash (FNV-1a 64 from a field-salted
    // basis, then the SplitMix64 finaliser):
    //   M = 2**64 - 1
    //   def mix(z):
    //       z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    //       z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    //       return z ^ (z >> 31)
    //   def key(field, value):
    //       h = 0xcbf29ce484222325 ^ ((field * 0x9E3779B97F4A7C15) & M)
    //       for b in value: h = ((h ^ b) * 0x100000001B3) & M
    //       return mix(h)
    assert_eq!(ctr::feature_key(0, b"a"), 0x02c0_bdbf_4814_20f8);
    assert_eq!(ctr::feature_key(13, b"05db9164"), 0xc046_7603_cf6e_e0ac);
    assert_ne!(ctr::feature_key(0, b"x"), ctr::feature_key(1, b"x"));
}

#[test]
fn malformed_rows_are_named_or_skipped() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.csv");
    std::fs::write(&p, "label,I1,C1\n1,3,ab\n0,x,cd\n1,4\n0,,\n2,1,a\n").unwrap();
    let e = ctr::read_csv(&p, BadRows::Fail).unwrap_err().to_string();
    assert!(e.contains("bad.csv:3") && e.contains("I1 is 'x'"), "{e}");
    let (data, _, rep) = ctr::read_csv(&p, BadRows::Skip).unwrap();
    assert_eq!((data.len(), rep.skipped), (2, 3));
    assert_eq!(data.keys.len(), 4, "a skipped row left keys behind");
    assert!(rep.first_problem.unwrap().contains("bad.csv:3"));
    // No label column: rows to score, label 0.
    std::fs::write(&p, "a,b\nx,2\n").unwrap();
    let (d, schema, _) = ctr::read_csv(&p, BadRows::Fail).unwrap();
    assert_eq!((schema.label_col, d.fields, d.labels), (None, 2, vec![0.0]));
    std::fs::write(&p, "label\n1\n").unwrap();
    let e = ctr::read_csv(&p, BadRows::Fail).unwrap_err().to_string();
    assert!(
        e.contains("bad.csv:1") && e.contains("no feature columns"),
        "{e}"
    );
}

/// AUC by definition: over all (positive, negative) pairs, 1 if the positive scores
/// higher, 1/2 if tied.
fn auc_pairs(s: &[f32], y: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for i in 0..s.len() {
        for j in 0..s.len() {
            if y[i] > 0.5 && y[j] < 0.5 {
                den += 1.0;
                num += if s[i] > s[j] {
                    1.0
                } else if s[i] == s[j] {
                    0.5
                } else {
                    0.0
                };
            }
        }
    }
    num / den
}

#[test]
fn auc_matches_the_pairwise_definition_with_ties() {
    let y = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0];
    let s = [0.9, 0.1, 0.4, 0.4, 0.4, 0.8, 0.3, 0.3, 0.05, 0.6];
    let a = auc(&s, &y).unwrap();
    assert!((a - auc_pairs(&s, &y)).abs() < 1e-12, "{a}");
    // Every score tied: 0.5.
    assert_eq!(auc(&[0.3; 4], &[1.0, 0.0, 1.0, 0.0]), Some(0.5));
    assert_eq!(auc(&[0.3, 0.4], &[1.0, 1.0]), None);
    let l = logloss(&[0.8, 0.3], &[1.0, 0.0]);
    assert!((l - (-(0.8f64.ln()) - 0.7f64.ln()) / 2.0).abs() < 1e-7);
}

#[test]
fn generator_is_seeded_zipfian_and_learnable() {
    let cfg = SynthConfig {
        rows: 20_000,
        fields: 8,
        ids_per_field: 10_000_000_000,
        ..Default::default()
    };
    let (a, pa) = ctr::generate(&cfg);
    let (b, _) = ctr::generate(&cfg);
    assert_eq!(a, b);
    // The planted probabilities separate the classes (the best achievable AUC).
    let best = auc(&pa, &a.labels).unwrap();
    assert!(best > 0.65, "planted AUC {best}");
    // Zipf: the most frequent id of field 0 is far above the mean frequency.
    let mut counts = std::collections::HashMap::new();
    for i in 0..a.len() {
        *counts.entry(a.row(i)[0]).or_insert(0usize) += 1;
    }
    let top = *counts.values().max().unwrap();
    assert!(
        top > 50 * a.len() / counts.len(),
        "top {top} of {} ids",
        counts.len()
    );
    // The CSV it writes reads back into the same keys.
    let d = tempfile::tempdir().unwrap();
    let small = SynthConfig { rows: 300, ..cfg };
    let (n, auc_w) =
        ctr::write_synth(&small, &d.path().join("s.csv"), &d.path().join("s.p")).unwrap();
    let (back, _, _) = ctr::read_csv(&d.path().join("s.csv"), BadRows::Fail).unwrap();
    let (mem, probs) = ctr::generate(&small);
    assert_eq!((n, &back), (300, &mem));
    assert!((auc_w - auc(&probs, &mem.labels).unwrap()).abs() < 1e-12);
}

#[test]
fn libffm_rows_become_keyed_fields() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.ffm");
    std::fs::write(&p, "1 0:5:1 2:7:1\n0 1:9:1 0:5:0.5\n\n-1 2:1:1\n").unwrap();
    let (data, schema, rep) = ctr::read_click_log(&p, BadRows::Fail).unwrap();
    assert_eq!((data.len(), data.fields, rep.rows), (3, 3, 3));
    assert_eq!(schema.label_col, Some(0));
    assert_eq!(data.labels, vec![1.0, 0.0, 0.0]);
    assert_eq!(data.row(0)[0], ctr::feature_key(0, b"5"));
    assert_eq!(data.row(0)[1], ctr::feature_key(1, b"\x00missing"));
    assert_eq!(data.row(0)[2], ctr::feature_key(2, b"7"));
    assert_eq!(data.row(1)[1], ctr::feature_key(1, b"9"));
    std::fs::write(&p, "1 0:5:1\n0 zz\n1 x:1:1\n").unwrap();
    let e = ctr::read_click_log(&p, BadRows::Fail)
        .unwrap_err()
        .to_string();
    assert!(e.contains("a.ffm:2") && e.contains("'zz'"), "{e}");
    let (data, _, rep) = ctr::read_click_log(&p, BadRows::Skip).unwrap();
    assert_eq!((data.len(), rep.skipped), (1, 2));
    // A CSV is still read as CSV.
    let (c, _, _) =
        ctr::read_click_log(&Path::new(DATA).join("criteo_sample.txt"), BadRows::Fail).unwrap();
    assert_eq!(c.fields, 39);
}

/// libsvm rows: the feature at position f is field f's; a row with another feature
/// count is a bad row named by file and line; the same rows as libffm (fields spelt out)
/// give the same keys.
#[test]
fn libsvm_rows_have_one_feature_per_field() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.svm");
    std::fs::write(&p, "1 5:1 17:1 99:0.5\n-1 6:1 17:1 3:1\n\n+1 5:1 8:1 2:1\n").unwrap();
    let (data, schema, rep) = ctr::read_click_log(&p, BadRows::Fail).unwrap();
    assert_eq!((data.len(), data.fields, rep.rows), (3, 3, 3));
    assert_eq!(schema.fields.len(), 3);
    assert_eq!(data.labels, vec![1.0, 0.0, 1.0]);
    let ffm = d.path().join("a.ffm");
    std::fs::write(
        &ffm,
        "1 0:5:1 1:17:1 2:99:0.5\n-1 0:6:1 1:17:1 2:3:1\n+1 0:5:1 1:8:1 2:2:1\n",
    )
    .unwrap();
    let (same, _, _) = ctr::read_click_log(&ffm, BadRows::Fail).unwrap();
    assert_eq!(data, same);
    assert_eq!(data.row(1)[2], ctr::feature_key(2, b"3"));
    std::fs::write(&p, "1 5:1 17:1\n0 6:1\n1 7:1 8:1\n0 7:1 8\n").unwrap();
    let e = ctr::read_click_log(&p, BadRows::Fail)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("a.svm:2") && e.contains("1 features, the first row has 2"),
        "{e}"
    );
    let (data, _, rep) = ctr::read_click_log(&p, BadRows::Skip).unwrap();
    assert_eq!((data.len(), rep.skipped), (2, 2));
    std::fs::write(&p, "1\n0\n").unwrap();
    assert!(ctr::read_libsvm(&p, BadRows::Fail).is_err());
}
