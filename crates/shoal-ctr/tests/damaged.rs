//! Saved CTR models and configuration files, damaged (`shoal_testkit::damaged`): every
//! load returns the model or an error naming the file; none panics.

use shoal_ctr::model::CtrKind;
use shoal_ctr::trainer::{CtrPredictor, CtrTrainConfig, CtrTrainer};
use shoal_data::ctr::{write_synth, SynthConfig};
use shoal_testkit::{damaged, never_panics};

#[test]
fn damaged_models_are_refused_without_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("s.csv");
    let syn = SynthConfig {
        rows: 2_000,
        fields: 4,
        ids_per_field: 30,
        seed: 3,
        ..Default::default()
    };
    write_synth(&syn, &data, &d.path().join("s.csv.p")).unwrap();
    let mut t = CtrTrainer::new(CtrTrainConfig {
        kind: CtrKind::Deepfm,
        dim: 4,
        hidden: vec![8],
        data,
        max_steps: 3,
        ..Default::default()
    })
    .unwrap();
    t.run(|_| {}).unwrap();
    let out = d.path().join("m");
    t.save(&out).unwrap();
    let file = out.join("model.safetensors");
    let valid = std::fs::read(&file).unwrap();
    never_panics("CTR model", &damaged(&valid, 11, 200), |bytes| {
        std::fs::write(&file, bytes).unwrap();
        let a = CtrPredictor::load(&out).map(|_| ());
        let b = CtrTrainConfig::saved_in(&out).map(|_| ());
        a.and(b)
    });
    // Checksums that hold over weights that are not finite (a NaN written into the
    // dense parameters, the file's CRC32 recomputed by its rule: tensors by name, each
    // name, length and bytes): refused, naming the tensor.
    let (_, meta) = safetensors::SafeTensors::read_metadata(&valid).unwrap();
    let mut md = meta.metadata().clone().unwrap();
    // (Without the metadata's own checksum, as files written before it had none.)
    md.remove("meta_crc32");
    let nan = shoal_testkit::rewrite_safetensors(
        &valid,
        |tensors| {
            let dense = tensors.iter_mut().find(|t| t.0 == "dense").unwrap();
            dense.3[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
            let mut h = crc32fast::Hasher::new();
            for (name, _, _, data) in tensors.iter() {
                h.update(name.as_bytes());
                h.update(&(data.len() as u64).to_le_bytes());
                h.update(data);
            }
            md.insert("crc32".into(), format!("{:08x}", h.finalize()));
        },
        None,
    );
    // The checksum is known only after the edit: the same tensors with it.
    let nan = shoal_testkit::rewrite_safetensors(&nan, |_| {}, Some(md));
    std::fs::write(&file, nan).unwrap();
    let Err(e) = CtrPredictor::load(&out) else {
        panic!("a NaN weight loaded")
    };
    let e = e.to_string();
    assert!(
        e.contains("not finite") && e.contains("'dense'") && e.contains("index 2"),
        "{e}"
    );
    // A metadata value changed that still parses (the learning rate in the training
    // configuration) is caught by the metadata's checksum.
    let mut md = meta.metadata().clone().unwrap();
    let cfg = md["train_config"].clone();
    assert!(md.contains_key("meta_crc32"));
    md.insert(
        "train_config".into(),
        cfg.replacen("\"lr\":", "\"lr\":1", 1),
    );
    std::fs::write(
        &file,
        shoal_testkit::rewrite_safetensors(&valid, |_| {}, Some(md)),
    )
    .unwrap();
    let Err(e) = CtrPredictor::load(&out) else {
        panic!("an edited configuration loaded")
    };
    assert!(e.to_string().contains("metadata is corrupt"), "{e}");
}

#[test]
fn damaged_configuration_files_are_refused_without_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("c.toml");
    let valid = toml::to_string(&CtrTrainConfig::default()).unwrap();
    never_panics("CTR config", &damaged(valid.as_bytes(), 12, 300), |bytes| {
        std::fs::write(&path, bytes).unwrap();
        shoal_runtime::config::layered::<CtrTrainConfig>(Some(&path), &[], &[])
            .map_err(shoal_ctr::Error::from)
            .and_then(|c| c.validate().map(|_| c.batch_size))
    });
}
