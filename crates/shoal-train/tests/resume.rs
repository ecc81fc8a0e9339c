//! A run stopped and resumed from its checkpoint follows exactly the loss curve of an
//! uninterrupted run (same data order, dropout masks, learning rates, optimizer state).

mod common;

use common::{config, slice};
use shoal_train::NmtTrainer;

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
