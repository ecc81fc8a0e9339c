//! What several targets share: a scratch directory per process, and the valid saved
//! models the model targets damage (built once per process).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// This process's scratch directory (in /dev/shm where it exists: loaders read files).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("shoal-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("a scratch directory");
        d
    })
}

/// Writes `bytes` to the scratch file `name` and returns its path.
pub fn file(name: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch().join(name);
    std::fs::write(&p, bytes).expect("writing a scratch file");
    p
}

/// Copies every file of `from` into the fresh directory `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).expect("a model directory");
    for e in std::fs::read_dir(from).expect("the base model").flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copying the base model");
        }
    }
}

/// A small trained DeepFM saved in the scratch directory (its files are the seeds of
/// the `ctr_model` target).
pub fn ctr_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        use shoal_ctr::model::CtrKind;
        use shoal_ctr::trainer::{CtrTrainConfig, CtrTrainer};
        use shoal_data::ctr::{write_synth, SynthConfig};
        let d = scratch().join("ctr-base");
        std::fs::create_dir_all(&d).unwrap();
        let data = d.join("s.csv");
        let syn = SynthConfig {
            rows: 500,
            fields: 4,
            ids_per_field: 20,
            seed: 3,
            ..Default::default()
        };
        write_synth(&syn, &data, &d.join("s.csv.p")).unwrap();
        let mut t = CtrTrainer::new(CtrTrainConfig {
            kind: CtrKind::Deepfm,
            dim: 4,
            hidden: vec![8],
            data,
            max_steps: 2,
            ..Default::default()
        })
        .unwrap();
        t.run(|_| {}).unwrap();
        let out = d.join("model");
        t.save(&out).unwrap();
        out
    })
}

/// PyTorch's exported CNN (the ONNX fixture), imported and saved in the scratch
/// directory (the seeds of the `cnn_model` target).
pub fn cnn_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let onnx = file("base.onnx", ONNX_FIXTURE);
        let m = shoal_cnn::onnx::import(&onnx).unwrap();
        let out = scratch().join("cnn-base");
        m.save(&out).unwrap();
        out
    })
}

/// PyTorch's export of a small CNN (`crates/shoal-cnn/tests/fixtures/onnx`).
pub const ONNX_FIXTURE: &[u8] =
    include_bytes!("../../crates/shoal-cnn/tests/fixtures/onnx/torch_cnn.onnx");
