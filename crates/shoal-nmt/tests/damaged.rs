//! NMT checkpoints and configuration files, damaged (`shoal_testkit::damaged`): every
//! load returns the checkpoint or an error naming it; none panics. A real checkpoint of a
//! tiny model is damaged file by file (its metadata, its parameters, its optimizer
//! state); a configuration file likewise.

mod common;

use common::{config, slice, INIT};
use shoal_nmt::checkpoint::Checkpoint;
use shoal_nmt::{NmtTrainConfig, NmtTrainer, Translator};
use shoal_testkit::{damaged, never_panics};

#[test]
fn damaged_checkpoints_are_refused_without_a_panic() {
    let data = tempfile::tempdir().unwrap();
    slice(data.path(), 40);
    let run = tempfile::tempdir().unwrap();
    let mut t = {
        let _g = INIT.lock().unwrap_or_else(|e| e.into_inner());
        NmtTrainer::new(config(data.path(), &[("train.max_steps", "2")]), run.path()).unwrap()
    };
    t.run(|_| {}).unwrap();
    let ck = shoal_runtime::store::resolve(run.path()).unwrap();
    for (file, seed, n) in [
        ("meta.json", 1, 150),
        ("model.safetensors", 2, 100),
        ("optimizer.safetensors", 3, 60),
    ] {
        let path = ck.join(file);
        let valid = std::fs::read(&path).unwrap();
        let inputs = damaged(&valid, seed, n);
        never_panics(file, &inputs, |bytes| {
            std::fs::write(&path, bytes).unwrap();
            // Both readers: the checkpoint itself, and a translator built from it.
            let a = Checkpoint::load(&ck).map(|c| c.params.len());
            let b = Translator::load(&ck).map(|t| t.tok.src.vocab_size());
            a.and(b)
        });
        std::fs::write(&path, &valid).unwrap();
    }
    // A checkpoint whose checksums hold but whose weights are not finite (a NaN written
    // with its CRC32 recomputed) is refused, naming the tensor.
    let path = ck.join("model.safetensors");
    let valid = std::fs::read(&path).unwrap();
    let mut first = String::new();
    let bytes = shoal_testkit::rewrite_safetensors(
        &valid,
        |t| {
            first = t[0].0.clone();
            t[0].3[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        },
        None,
    );
    std::fs::write(&path, &bytes).unwrap();
    let meta_path = ck.join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["crc32"]["model.safetensors"] = crc32fast::hash(&bytes).into();
    // (Without its own checksum, as metadata written before it had none.)
    meta.as_object_mut().unwrap().remove("meta_crc32");
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    let Err(e) = Checkpoint::load(&ck) else {
        panic!("a NaN weight loaded")
    };
    let e = e.to_string();
    assert!(
        e.contains("not finite") && e.contains(&first) && e.contains("index 1"),
        "{e}"
    );
}

#[test]
fn damaged_configuration_files_are_refused_without_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("c.toml");
    let valid = NmtTrainConfig::default().to_toml();
    let inputs = damaged(valid.as_bytes(), 4, 300);
    never_panics("config TOML", &inputs, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        NmtTrainConfig::load(Some(&path), &[]).map(|c| c.train.batch_size)
    });
}
