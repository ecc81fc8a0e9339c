//! Batch plans: coverage, determinism, sharding, length bucketing, and batch layout.

use std::path::Path;

use shoal_data::batch::POOL_BATCHES;
use shoal_data::{read_lines, Batch, Batcher, Error, Example, BOS, EOS, PAD};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/multi30k");

/// Synthetic examples with varied lengths; ids encode (example, position).
fn synthetic(n: usize) -> Vec<Example> {
    (0..n)
        .map(|i| Example {
            src: (0..1 + (i * 7) % 23).map(|j| 4 + j as u32).collect(),
            tgt: (0..1 + (i * 5) % 19).map(|j| 100 + j as u32).collect(),
        })
        .collect()
}

/// Real sentence pairs from Multi30k, one id per whitespace-separated word.
fn multi30k(n: usize) -> Vec<Example> {
    let read = |name: &str| read_lines(&Path::new(DATA).join(name)).unwrap();
    let (en, de) = (read("train.en"), read("train.de"));
    let ids = |s: &str| {
        (0..s.split_whitespace().count())
            .map(|j| 4 + j as u32)
            .collect()
    };
    en.iter()
        .zip(&de)
        .take(n)
        .map(|(s, t)| Example {
            src: ids(s),
            tgt: ids(t),
        })
        .collect()
}

fn assert_covers_once(plan: &[Vec<usize>], n: usize) {
    let mut seen = vec![0usize; n];
    for &i in plan.iter().flatten() {
        seen[i] += 1;
    }
    assert!(seen.iter().all(|&c| c == 1), "every example exactly once");
}

#[test]
fn every_example_appears_exactly_once_per_epoch() {
    let n = 3 * POOL_BATCHES * 16 + 123; // several pools and a partial last batch
    let batcher = Batcher::new(synthetic(n), 16, 64, 7);
    assert_eq!(batcher.len(), n);
    for epoch in 0..3 {
        let plan = batcher.epoch_plan(epoch);
        assert_covers_once(&plan, n);
        assert_eq!(plan.len(), batcher.num_batches());
        assert_eq!(plan.len(), n.div_ceil(16));
    }
}

#[test]
fn batches_hold_at_most_batch_size_examples() {
    let n = 2 * POOL_BATCHES * 10 + 37;
    let batcher = Batcher::new(synthetic(n), 10, 64, 1);
    let plan = batcher.epoch_plan(0);
    assert!(plan.iter().all(|b| !b.is_empty() && b.len() <= 10));
    assert_eq!(plan.iter().filter(|b| b.len() < 10).count(), 1);
}

#[test]
fn plans_are_a_function_of_seed_and_epoch() {
    let a = Batcher::new(synthetic(900), 8, 64, 42);
    let b = Batcher::new(synthetic(900), 8, 64, 42);
    assert_eq!(a.epoch_plan(3), b.epoch_plan(3));
    assert_ne!(a.epoch_plan(3), a.epoch_plan(4));
    assert_ne!(a.epoch_plan(0), a.epoch_plan(1));
    let c = Batcher::new(synthetic(900), 8, 64, 43);
    assert_ne!(a.epoch_plan(3), c.epoch_plan(3));
}

#[test]
fn plan_is_pinned_across_machines() {
    // The ChaCha8 stream and the shuffles are fixed by specification; this plan must
    // never change, or runs stop being reproducible from their seed.
    // Equal lengths, so the sort keeps the shuffled order and the plan shows both
    // shuffles (examples, then batches).
    let same_length = vec![
        Example {
            src: vec![4],
            tgt: vec![5]
        };
        12
    ];
    let batcher = Batcher::new(same_length, 3, 64, 2024);
    let expected: Vec<Vec<usize>> = PINNED_PLAN.iter().map(|b| b.to_vec()).collect();
    assert_eq!(batcher.epoch_plan(5), expected);
    // Lengths differ: the single pool is sorted by length, then the batches shuffled.
    let batcher = Batcher::new(synthetic(10), 3, 64, 2024);
    let sorted = [[0, 7, 4].as_slice(), &[1, 8, 5], &[2, 9, 6], &[3]];
    let mut plan = batcher.epoch_plan(5);
    plan.sort();
    assert_eq!(plan, sorted);
}

const PINNED_PLAN: &[&[usize]] = &[&[9, 4, 0], &[8, 6, 5], &[3, 10, 7], &[2, 1, 11]];

#[test]
fn shard_plans_of_two_ranks_partition_the_plan() {
    let batcher = Batcher::new(synthetic(1001), 12, 64, 9);
    let plan = batcher.epoch_plan(2);
    let r0 = batcher.shard_plan(2, 0, 2);
    let r1 = batcher.shard_plan(2, 1, 2);
    assert_eq!(r0.len() + r1.len(), plan.len());
    assert!(r0.len().abs_diff(r1.len()) <= 1);
    for (i, batch) in plan.iter().enumerate() {
        let shard = if i % 2 == 0 { &r0 } else { &r1 };
        assert_eq!(&shard[i / 2], batch);
    }
    let both: Vec<Vec<usize>> = r0.into_iter().chain(r1).collect();
    assert_covers_once(&both, batcher.len());
    assert_eq!(batcher.shard_plan(2, 0, 1), plan);
    assert!(batcher.shard_plan(2, 2, 2).is_empty());
    assert!(batcher.shard_plan(2, 0, 0).is_empty());
}

/// Fraction of padded slots over all slots, source and target together.
fn padding_waste(batcher: &Batcher, plan: &[Vec<usize>]) -> f64 {
    let (mut real, mut slots) = (0usize, 0usize);
    for indices in plan {
        let b = batcher.make_batch(indices);
        real += b.src_lens.iter().sum::<usize>() + b.tgt_tokens;
        slots += b.batch_size * (b.src_len + b.tgt_len);
    }
    1.0 - real as f64 / slots as f64
}

#[test]
fn length_bucketing_cuts_padding() {
    let batcher = Batcher::new(multi30k(10_000), 32, 100, 3);
    assert_eq!(batcher.len(), 10_000);
    let bucketed = batcher.epoch_plan(0);
    // Random batching of the same examples: consecutive chunks of a fixed permutation
    // (a multiplicative step coprime with n), no sorting.
    let n = batcher.len();
    let order: Vec<usize> = (0..n).map(|i| (i * 7919) % n).collect();
    let random: Vec<Vec<usize>> = order.chunks(32).map(<[usize]>::to_vec).collect();
    assert_covers_once(&random, n);
    let (b, r) = (
        padding_waste(&batcher, &bucketed),
        padding_waste(&batcher, &random),
    );
    assert!(r > 0.2, "random batching wastes {r:.3}");
    assert!(b < r / 3.0, "bucketed waste {b:.3} vs random {r:.3}");
}

#[test]
fn make_batch_layout() {
    let examples = vec![
        Example {
            src: vec![10, 11, 12],
            tgt: vec![20, 21],
        },
        Example {
            src: vec![13],
            tgt: vec![22, 23, 24, 25],
        },
    ];
    let batcher = Batcher::new(examples, 2, 16, 0);
    let b = batcher.make_batch(&[1, 0]);
    let expected = Batch {
        batch_size: 2,
        src_len: 3,
        tgt_len: 5,
        src: vec![13, PAD, PAD, 10, 11, 12],
        src_lens: vec![1, 3],
        tgt_in: vec![BOS, 22, 23, 24, 25, BOS, 20, 21, PAD, PAD],
        tgt_out: vec![22, 23, 24, 25, EOS, 20, 21, EOS, PAD, PAD],
        tgt_tokens: 8,
    };
    assert_eq!(b, expected);
    assert_eq!(
        b.tgt_out.iter().filter(|&&t| t != PAD).count(),
        b.tgt_tokens
    );

    let empty = batcher.make_batch(&[]);
    assert_eq!((empty.batch_size, empty.src_len, empty.tgt_len), (0, 0, 0));
    assert!(empty.src.is_empty() && empty.tgt_in.is_empty());
}

#[test]
fn fill_batch_reuses_buffers_and_rejects_bad_indices() {
    let batcher = Batcher::new(synthetic(100), 8, 64, 0);
    let mut out = batcher.make_batch(&(0..8).collect::<Vec<_>>());
    let before = out.clone();
    let err = batcher.fill_batch(&[3, 100], &mut out).unwrap_err();
    assert!(
        matches!(
            err,
            Error::IndexOutOfRange {
                index: 100,
                len: 100
            }
        ),
        "{err:?}"
    );
    assert_eq!(out, before, "a failed fill leaves the batch unchanged");
    let err = batcher.try_make_batch(&[usize::MAX]).unwrap_err();
    assert!(matches!(err, Error::IndexOutOfRange { .. }), "{err:?}");

    let cap = out.src.capacity();
    let ptr = out.src.as_ptr();
    batcher.fill_batch(&[5, 6], &mut out).unwrap();
    assert_eq!(out, batcher.make_batch(&[5, 6]));
    assert_eq!((out.src.capacity(), out.src.as_ptr()), (cap, ptr));
}

#[test]
fn examples_are_truncated_and_empty_ones_dropped() {
    let examples = vec![
        Example {
            src: (4..20).collect(),
            tgt: (4..20).collect(),
        },
        Example {
            src: vec![],
            tgt: vec![5],
        },
        Example {
            src: vec![5],
            tgt: vec![],
        },
        Example {
            src: vec![6],
            tgt: vec![7],
        },
    ];
    let batcher = Batcher::new(examples, 4, 5, 0);
    assert_eq!(batcher.len(), 2);
    assert_eq!(batcher.dropped(), 2);
    assert_eq!(batcher.examples()[0].src, vec![4, 5, 6, 7, 8]);
    assert_eq!(batcher.examples()[0].tgt, vec![4, 5, 6, 7]);
    let b = batcher.make_batch(&[0, 1]);
    assert_eq!((b.src_len, b.tgt_len), (5, 5), "y + EOS fits in max_len");
}

#[test]
fn try_new_rejects_bad_sizes() {
    let err = Batcher::try_new(synthetic(4), 0, 10, 0).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                name: "batch_size",
                ..
            }
        ),
        "{err:?}"
    );
    let err = Batcher::try_new(synthetic(4), 2, 1, 0).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                name: "max_len",
                ..
            }
        ),
        "{err:?}"
    );
    let clamped = Batcher::new(synthetic(4), 0, 1, 0);
    assert_eq!((clamped.batch_size(), clamped.max_len()), (1, 2));
}
