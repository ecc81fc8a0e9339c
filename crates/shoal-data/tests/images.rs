//! IDX image sets: Fashion-MNIST as Debian installs it (required under CI, else checked
//! where present), small files written here plain and gzip'd, and malformed files named
//! with what is wrong.

use shoal_data::images::{load_mnist_dir, read_idx_pair, FASHION_MNIST_DIR};
use std::io::Write;
use std::path::Path;

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    b.extend(data);
    b
}

fn gz(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

#[test]
fn small_files_plain_and_gzipped() {
    let d = tempfile::tempdir().unwrap();
    let (im, lb) = (d.path().join("i"), d.path().join("l.gz"));
    let pixels: Vec<u8> = (0..2 * 3 * 2).collect();
    std::fs::write(&im, idx(&[2, 3, 2], &pixels)).unwrap();
    std::fs::write(&lb, gz(&idx(&[2], &[7, 1]))).unwrap();
    let s = read_idx_pair(&im, &lb, 10).unwrap();
    assert_eq!((s.len(), s.rows, s.cols), (2, 3, 2));
    assert_eq!(s.labels, vec![7, 1]);
    let mut x = Vec::new();
    s.normalized(&[1], 0.0, 1.0, &mut x);
    assert_eq!(x[0], 6.0 / 255.0);
    // Truncated, wrong magic, label out of range, count mismatch, bad gzip.
    let cases: Vec<(Vec<u8>, Vec<u8>, &str)> = vec![
        (
            idx(&[2, 3, 2], &pixels[..10]),
            idx(&[2], &[7, 1]),
            "truncated or corrupt",
        ),
        (
            vec![0, 0, 9, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            idx(&[2], &[7, 1]),
            "magic",
        ),
        (
            idx(&[2, 3, 2], &pixels),
            idx(&[2], &[7, 10]),
            "label 10 of 10",
        ),
        (
            idx(&[2, 3, 2], &pixels),
            idx(&[3], &[7, 1, 1]),
            "3 labels for the 2 images",
        ),
        (idx(&[2, 3, 2], &pixels), vec![0x1f, 0x8b, 1, 2, 3], "gzip"),
    ];
    for (i, l, want) in cases {
        std::fs::write(&im, &i).unwrap();
        std::fs::write(&lb, &l).unwrap();
        let e = read_idx_pair(&im, &lb, 10).unwrap_err().to_string();
        assert!(e.contains(want), "'{want}' not in: {e}");
    }
    let e = load_mnist_dir(d.path()).unwrap_err().to_string();
    assert!(
        e.contains("train-images-idx3-ubyte") && e.contains("dataset-fashion-mnist"),
        "{e}"
    );
}

/// `available`, for the checks that need `what`: where it is missing, a CI run (`CI`
/// set to anything but empty, `false` or `0`) fails naming it, and any other run prints
/// a notice that those checks did not run.
fn require(available: bool, what: &str) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    if !available {
        assert!(!ci, "{what} is not available, and CI requires it");
        eprintln!("NOTICE: {what} is not available here; the checks that need it did not run");
    }
    available
}

/// The real data, where the Debian package is installed (`.ci/run` installs it; under
/// CI its absence is a failure).
#[test]
fn fashion_mnist_as_debian_installs_it() {
    if !require(
        Path::new(FASHION_MNIST_DIR).exists(),
        &format!("Fashion-MNIST ({FASHION_MNIST_DIR}, Debian's dataset-fashion-mnist)"),
    ) {
        return;
    }
    let (train, test) = load_mnist_dir(Path::new(FASHION_MNIST_DIR)).unwrap();
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!((train.rows, train.cols), (28, 28));
    // Balanced classes: 6,000 and 1,000 of each.
    for c in 0..10u8 {
        assert_eq!(train.labels.iter().filter(|&&l| l == c).count(), 6000);
        assert_eq!(test.labels.iter().filter(|&&l| l == c).count(), 1000);
    }
    // The published mean pixel of the training set: 0.2860.
    let mean =
        train.pixels.iter().map(|&p| p as f64).sum::<f64>() / train.pixels.len() as f64 / 255.0;
    assert!((mean - 0.2860).abs() < 5e-4, "{mean}");
}
