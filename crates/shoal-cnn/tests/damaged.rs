//! CNN files, damaged (`shoal_testkit::damaged`): ONNX models (a PyTorch export and
//! shoal's own), compressed `.shoalz` files, saved models and their metadata, and
//! compression schedules: every read returns the model or an error naming the file;
//! none panics.

use shoal_cnn::compress::{self, CompressSpec, Quant};
use shoal_cnn::onnx::import;
use shoal_cnn::trainer::CnnModel;
use shoal_testkit::{damaged, never_panics};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx")
}

#[test]
fn damaged_onnx_files_are_refused_without_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m.onnx");
    for (name, seed) in [
        ("torch_cnn.onnx", 21),
        ("shoal_int8.onnx", 22),
        ("shoal_low_rank.onnx", 23),
    ] {
        let valid = std::fs::read(fixtures().join(name)).unwrap();
        never_panics(name, &damaged(&valid, seed, 150), |bytes| {
            std::fs::write(&p, bytes).unwrap();
            import(&p).map(|m| m.params.len())
        });
    }
}

#[test]
fn damaged_models_and_compressed_files_are_refused_without_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let m = import(&fixtures().join("torch_cnn.onnx")).unwrap();
    // The saved model: its metadata and its tensors.
    let dir = d.path().join("m");
    m.save(&dir).unwrap();
    for (file, seed) in [("meta.json", 24), ("model.safetensors", 25)] {
        let path = dir.join(file);
        let valid = std::fs::read(&path).unwrap();
        never_panics(file, &damaged(&valid, seed, 150), |bytes| {
            std::fs::write(&path, bytes).unwrap();
            CnnModel::load(&dir).map(|m| m.params.len())
        });
        std::fs::write(&path, &valid).unwrap();
    }
    // The configuration edited so that it still parses: caught by the checksum; a model
    // saved before the checksums existed (no crc32.json) loads unchecked.
    let meta = dir.join("meta.json");
    let valid = std::fs::read_to_string(&meta).unwrap();
    let edited = valid.replacen("\"epochs\": ", "\"epochs\": 1", 1);
    assert_ne!(edited, valid);
    std::fs::write(&meta, &edited).unwrap();
    let Err(e) = CnnModel::load(&dir) else {
        panic!("an edited meta.json loaded")
    };
    assert!(e.to_string().contains("meta.json is corrupt"), "{e}");
    std::fs::write(&meta, &valid).unwrap();
    std::fs::remove_file(dir.join("crc32.json")).unwrap();
    CnnModel::load(&dir).unwrap();
    // A compressed file of each kind of tensor: int8, and pruned + codebook.
    for (spec, seed) in [
        (
            CompressSpec {
                quant: Some(Quant::Int8),
                ..Default::default()
            },
            26,
        ),
        (
            CompressSpec {
                prune_fc: 0.5,
                quant: Some(Quant::Codebook { bits: 3, rate: 0.0 }),
                ..Default::default()
            },
            27,
        ),
    ] {
        let empty = shoal_data::images::ImageSet {
            rows: 8,
            cols: 8,
            pixels: vec![0; 64],
            labels: vec![0],
        };
        let (q, books) = compress::compress(&m, &spec, &empty, &empty, |_, _, _, _| {}).unwrap();
        let bytes = compress::encode(&q, &spec, &books, compress::Part::All).unwrap();
        never_panics(".shoalz", &damaged(&bytes, seed, 200), |b| {
            compress::decode(b, Path::new("x.shoalz")).map(|r| r.0.params.len())
        });
    }
}
