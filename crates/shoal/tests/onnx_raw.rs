//! The ONNX export read as another tool reads it: onnxruntime on raw Fashion-MNIST pixels
//! (values / 255, no standardisation: the graph does its own), recorded by
//! `fixtures/onnx/record.sh` with `ort_raw.py`, against what `shoal compress` makes of the
//! same files and writes again.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx")
}

fn fashion() -> bool {
    common::require(
        Path::new("/usr/share/datasets/fashion-mnist").exists(),
        "Fashion-MNIST (/usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)",
    )
}

fn ort() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("fashion_ort.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Runs `shoal compress --json ARGS` from `dir` and returns its JSON report.
fn compress(dir: &Path, args: &[&str]) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .current_dir(dir)
        .arg("compress")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "shoal compress {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// Two top-1 figures on the same 10,000 images, one from onnxruntime and one from
/// shoal's engines, agree within 10 images (measured: 0 for the float model, 1 for int8;
/// a wrong normalisation costs 40+ points, a wrong layer many more).
fn assert_same_top1(shoal: f64, ort: f64, what: &str) {
    assert!(
        (shoal - ort).abs() <= 0.001,
        "{what}: shoal reads top-1 {shoal}, onnxruntime on raw pixels {ort}"
    );
}

/// The float export: onnxruntime on pixels in [0, 1] gives the accuracy shoal measured
/// when it trained the model (86.82%), and shoal reading the file back and exporting it
/// again writes the same bytes.
#[test]
fn float_export_takes_raw_pixels() {
    if !fashion() {
        return;
    }
    let ort = ort();
    let recorded = &ort["fashion_cnn"];
    assert_eq!(ort["images"], 10_000);
    assert!(
        recorded["top1"].as_f64().unwrap() > 0.85,
        "{}",
        recorded["top1"]
    );
    assert_eq!(recorded["metadata"]["input_range"], "[0, 1]");
    assert_eq!(recorded["metadata"]["input_layout"], "NCHW");

    let d = tempfile::tempdir().unwrap();
    let model = fixtures().join("fashion_cnn.onnx");
    let v = compress(
        d.path(),
        &["--model", model.to_str().unwrap(), "--onnx", "out.onnx"],
    );
    assert_eq!(v["test_images"], 10_000);
    assert_same_top1(
        v["dense"]["top1"].as_f64().unwrap(),
        recorded["top1"].as_f64().unwrap(),
        "float model",
    );
    let written = std::fs::read(d.path().join("out.onnx")).unwrap();
    assert!(
        written == std::fs::read(&model).unwrap(),
        "exporting the imported model again changed its bytes"
    );
}

/// The int8 export (`--quant int8 --onnx`): onnxruntime on raw pixels gives what shoal's
/// int8 engine measured, and the file is the one recorded.
#[test]
fn int8_export_takes_raw_pixels() {
    if !fashion() {
        return;
    }
    let ort = ort();
    let recorded = &ort["fashion_cnn_int8"];
    assert_eq!(recorded["metadata"]["input_range"], "[0, 1]");

    let d = tempfile::tempdir().unwrap();
    let model = fixtures().join("fashion_cnn.onnx");
    let v = compress(
        d.path(),
        &[
            "--model",
            model.to_str().unwrap(),
            "--quant",
            "int8",
            "--onnx",
            "q.onnx",
        ],
    );
    let result = &v["results"][0];
    assert_eq!(result["label"], "int8");
    assert_same_top1(
        result["top1"].as_f64().unwrap(),
        recorded["top1"].as_f64().unwrap(),
        "int8 model",
    );
    let written = std::fs::read(d.path().join("q.onnx")).unwrap();
    assert!(
        written == std::fs::read(fixtures().join("fashion_cnn_int8.onnx")).unwrap(),
        "the int8 export differs from the recorded fashion_cnn_int8.onnx"
    );
}
