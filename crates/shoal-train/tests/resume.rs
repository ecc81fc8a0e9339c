//! A run stopped and resumed from its checkpoint follows exactly the loss curve of an
//! uninterrupted run (same data order, dropout masks, learning rates, optimizer state).

use shoal_train::config::NmtTrainConfig;
use shoal_train::NmtTrainer;
use std::path::Path;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/multi30k");

/// Writes the first `n` pairs of Multi30k train/val into `dir`.
fn slice(dir: &Path, n: usize) {
    for (from, to) in [
        ("train.en", "train.en"),
        ("train.de", "train.de"),
        ("val.en", "val.en"),
        ("val.de", "val.de"),
    ] {
        let text = std::fs::read_to_string(Path::new(DATA).join(from)).unwrap();
        let lines: Vec<&str> = text.lines().take(n).collect();
        std::fs::write(dir.join(to), lines.join("\n") + "\n").unwrap();
    }
}

fn config(dir: &Path, extra: &[(&str, &str)]) -> NmtTrainConfig {
    let mut o: Vec<(String, String)> = vec![
        ("data.train_src", dir.join("train.en").display().to_string()),
        ("data.train_tgt", dir.join("train.de").display().to_string()),
        ("data.valid_src", dir.join("val.en").display().to_string()),
        ("data.valid_tgt", dir.join("val.de").display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), format!("{v:?}")))
    .collect();
    for (k, v) in [
        ("data.src_vocab", "300"),
        ("data.tgt_vocab", "300"),
        ("data.max_len", "16"),
        ("model.embed", "16"),
        ("model.hidden", "16"),
        ("model.layers", "2"),
        ("model.dropout", "0.2"),
        ("train.batch_size", "16"),
        ("train.epochs", "2"),
        ("train.warmup_steps", "5"),
        ("train.checkpoint_every", "0"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    {
        o.push((k.to_string(), v.to_string()));
    }
    NmtTrainConfig::load(None, &o).unwrap()
}

#[test]
fn stopped_and_resumed_run_follows_the_same_loss_curve() {
    let data = tempfile::tempdir().unwrap();
    slice(data.path(), 160);
    // 160 pairs / 16 = 10 batches per epoch, 2 epochs: 20 updates.
    let run_a = tempfile::tempdir().unwrap();
    let mut a = NmtTrainer::new(config(data.path(), &[]), run_a.path()).unwrap();
    a.run(|_| {}).unwrap();
    assert_eq!(a.losses().len(), 20);

    // Interrupted after 7 updates (mid-epoch), resumed, and carried on to the end.
    let run_b = tempfile::tempdir().unwrap();
    let mut b = NmtTrainer::new(
        config(data.path(), &[("train.max_steps", "7")]),
        run_b.path(),
    )
    .unwrap();
    b.run(|_| {}).unwrap();
    assert_eq!(b.losses().len(), 7);
    drop(b);
    let mut c = NmtTrainer::resume(run_b.path(), |saved| {
        saved.with_overrides(&[("train.max_steps".into(), "0".into())])
    })
    .unwrap();
    assert_eq!(c.position().step, 7);
    c.run(|_| {}).unwrap();

    let la = a.losses();
    let lc = c.losses();
    assert_eq!(la.len(), lc.len());
    for (i, (x, y)) in la.iter().zip(lc).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "step {i}: uninterrupted {x}, resumed {y}"
        );
    }
    // The model trained: loss fell.
    assert!(la[19] < la[0]);
    // And the final parameters agree: same validation loss.
    let (va, vc) = (a.valid_loss().unwrap(), c.valid_loss().unwrap());
    assert!((va - vc).abs() < 1e-5, "{va} vs {vc}");
}

#[test]
fn resume_refuses_a_different_model() {
    let data = tempfile::tempdir().unwrap();
    slice(data.path(), 40);
    let run = tempfile::tempdir().unwrap();
    let mut t =
        NmtTrainer::new(config(data.path(), &[("train.max_steps", "1")]), run.path()).unwrap();
    t.run(|_| {}).unwrap();
    let e = NmtTrainer::resume(run.path(), |s| {
        s.with_overrides(&[("model.hidden".into(), "32".into())])
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("resume"), "{e}");
}
