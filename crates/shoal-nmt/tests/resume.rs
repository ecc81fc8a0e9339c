//! A run stopped and resumed from its checkpoint follows exactly the loss curve of an
//! uninterrupted run (same data order, dropout masks, learning rates, optimizer state).

mod common;

use common::{config, slice, INIT};
use shoal_nmt::NmtTrainConfig;
use shoal_nmt::NmtTrainer;
use std::path::Path;

/// A fresh trainer, initialised under the generator's lock.
fn fresh(cfg: NmtTrainConfig, run: &Path) -> NmtTrainer {
    let _g = INIT.lock().unwrap_or_else(|e| e.into_inner());
    NmtTrainer::new(cfg, run).unwrap()
}

#[test]
fn stopped_and_resumed_run_follows_the_same_loss_curve() {
    let data = tempfile::tempdir().unwrap();
    slice(data.path(), 160);
    // 160 pairs / 16 = 10 batches per epoch, 2 epochs: 20 updates.
    let run_a = tempfile::tempdir().unwrap();
    let mut a = fresh(config(data.path(), &[]), run_a.path());
    a.run(|_| {}).unwrap();
    assert_eq!(a.losses().len(), 20);

    // Interrupted after 7 updates (mid-epoch), resumed, and carried on to the end.
    let run_b = tempfile::tempdir().unwrap();
    let mut b = fresh(
        config(data.path(), &[("train.max_steps", "7")]),
        run_b.path(),
    );
    b.run(|_| {}).unwrap();
    assert_eq!(b.losses().len(), 7);
    drop(b);
    // Restoring initialises a model too (then overwritten): under the lock as well.
    let mut c = {
        let _g = INIT.lock().unwrap_or_else(|e| e.into_inner());
        NmtTrainer::resume(run_b.path(), |saved| {
            saved.with_overrides(&[("train.max_steps".into(), "0".into())])
        })
        .unwrap()
    };
    assert_eq!(c.position().step, 7);
    c.run(|_| {}).unwrap();

    // The same computation in the same order: the same bits, update by update.
    let la = a.losses();
    let lc = c.losses();
    assert_eq!(la.len(), lc.len());
    for (i, (x, y)) in la.iter().zip(lc).enumerate() {
        assert_eq!(
            x.to_bits(),
            y.to_bits(),
            "step {i}: uninterrupted {x}, resumed {y}"
        );
    }
    assert_eq!(a.params(), c.params(), "the final parameters");
    let (va, vc) = (a.valid_loss().unwrap(), c.valid_loss().unwrap());
    assert_eq!(va.to_bits(), vc.to_bits(), "validation loss {va} vs {vc}");
}

#[test]
fn resume_refuses_a_different_model() {
    let data = tempfile::tempdir().unwrap();
    slice(data.path(), 40);
    let run = tempfile::tempdir().unwrap();
    let mut t = fresh(config(data.path(), &[("train.max_steps", "1")]), run.path());
    t.run(|_| {}).unwrap();
    let _g = INIT.lock().unwrap_or_else(|e| e.into_inner());
    let e = NmtTrainer::resume(run.path(), |s| {
        s.with_overrides(&[("model.hidden".into(), "32".into())])
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("resume"), "{e}");
}
