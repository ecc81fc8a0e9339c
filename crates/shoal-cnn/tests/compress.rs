//! Compression of a small CNN trained on a synthetic image set (written as IDX files
//! here): what the compressed file stores is what the compressed model computes (read
//! back bit for bit, and the compressed kernels agree with the network), each technique
//! does what it says (sparsity per layer, at most 2^bits shared values, factor ranks),
//! fine-tuning recovers accuracy after pruning, and bad settings or files are refused
//! with no file left behind.

use shoal_cnn::compress::{self, CompressSpec, Engine, Quant};
use shoal_cnn::trainer::{evaluate, CnnModel, CnnTrainConfig, CnnTrainer};
use std::path::Path;

/// 10 classes of 28x28 images: class c lights a bar (row band for even c, column band
/// for odd c) at a position set by c, plus noise.
fn write_set(dir: &Path, prefix: &str, n: usize, seed: u64) {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut rnd = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let mut px = Vec::with_capacity(n * 784);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let c = (rnd() % 10) as usize;
        labels.push(c as u8);
        let band = 3 + (c / 2) * 5;
        for y in 0..28 {
            for x in 0..28 {
                let on = if c.is_multiple_of(2) {
                    (band..band + 3).contains(&y)
                } else {
                    (band..band + 3).contains(&x)
                };
                let noise = (rnd() % 90) as u8;
                px.push(if on {
                    160u8.saturating_add(noise)
                } else {
                    noise
                });
            }
        }
    }
    let mut img = vec![0, 0, 8, 3];
    for d in [n as u32, 28, 28] {
        img.extend(d.to_be_bytes());
    }
    img.extend(px);
    let mut lab = vec![0, 0, 8, 1];
    lab.extend((n as u32).to_be_bytes());
    lab.extend(labels);
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
}

fn trained(dir: &Path) -> CnnTrainer {
    write_set(dir, "train", 1200, 1);
    write_set(dir, "t10k", 400, 2);
    let cfg = CnnTrainConfig {
        model: shoal_cnn::model::CnnConfig {
            blocks: vec![vec![4], vec![8]],
            fc: vec![64, 32],
            ..Default::default()
        },
        data_dir: dir.to_path_buf(),
        epochs: 2,
        batch_size: 32,
        lr: 2e-3,
        ..Default::default()
    };
    let mut t = CnnTrainer::new(cfg).unwrap();
    let e = t.run(|_| {}).unwrap();
    assert!(e.top1 > 0.9, "the synthetic task is learnt: {e:?}");
    t
}

#[test]
fn each_technique_stores_what_it_computes_and_does_what_it_says() {
    let d = tempfile::tempdir().unwrap();
    let t = trained(d.path());
    let dense = &t.model;
    let base = evaluate(&dense.net, &dense.params, &dense.stats, &t.test).unwrap();
    let specs = [
        CompressSpec {
            prune_fc: 0.9,
            prune_conv: 0.5,
            fine_tune_steps: 200,
            lr: 1e-3,
            ..Default::default()
        },
        CompressSpec {
            quant: Some(Quant::Int8),
            ..Default::default()
        },
        CompressSpec {
            // Convolutions exactly half pruned: stored dense, zeros keep their code.
            prune_fc: 0.8,
            prune_conv: 0.5,
            quant: Some(Quant::Codebook { bits: 3, rate: 0.0 }),
            fine_tune_steps: 30,
            lr: 1e-3,
            ..Default::default()
        },
        CompressSpec {
            svd_ratio: Some(4.0),
            fine_tune_steps: 150,
            lr: 1e-3,
            ..Default::default()
        },
        CompressSpec {
            svd_energy: Some(0.9),
            prune_fc: 0.5,
            quant: Some(Quant::Int8),
            ..Default::default()
        },
    ];
    for spec in &specs {
        let (m, books) =
            compress::compress(dense, spec, &t.train, &t.test, |_, _, _, _| {}).unwrap();
        let bytes = compress::encode(&m, spec, &books, compress::Part::All).unwrap();
        let (back, spec2) = compress::decode(&bytes, Path::new("x")).unwrap();
        assert_eq!(&spec2, spec);
        // What is stored is what was computed: identical values (int8 up to the
        // rounding of one rescale).
        for (a, b) in back.params.iter().zip(&m.params) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                "{}: {a} vs {b}",
                spec.label()
            );
        }
        assert_eq!(back.stats, m.stats);
        // The compressed kernels agree with the network on the stored values.
        let eng = compress::engine_eval(&back, spec, &t.test).unwrap();
        let net = evaluate(&back.net, &back.params, &back.stats, &t.test).unwrap();
        // The same predictions (float noise cannot flip a top-1 here); int8 activations
        // may flip a near tie.
        let flips = if spec.quant == Some(Quant::Int8) {
            0.01
        } else {
            0.0
        };
        assert!(
            (eng.top1 - net.top1).abs() <= flips,
            "{}: engine {} vs network {}",
            spec.label(),
            eng.top1,
            net.top1
        );
        let mut e = Engine::new(&back, spec).unwrap();
        let mut x = Vec::new();
        t.test.normalized(
            &[0, 1, 2],
            shoal_cnn::trainer::PIXEL_MEAN,
            shoal_cnn::trainer::PIXEL_STD,
            &mut x,
        );
        let mine = e.logits(&x, 3, false).unwrap().to_vec();
        let mut ws = shoal_cnn::model::CnnWork::default();
        let theirs = back
            .net
            .predict(&back.params, &back.stats, &x, 3, &mut ws)
            .unwrap()
            .to_vec();
        let scale = theirs.iter().fold(1.0f32, |a, x| a.max(x.abs()));
        // int8 activations add their own rounding: within 5% of the logits' range. The
        // sparse, codebook and factorized kernels run the stored f32 values in another
        // order than the dense network: measured up to EXACT of the range.
        let tol = if spec.quant == Some(Quant::Int8) {
            0.05 * scale
        } else {
            1e-3 * scale
        };
        let worst = mine
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!(
            "MEASURE {} worst {:e} of {scale}",
            spec.label(),
            worst / scale
        );
        assert_eq!(mine.len(), theirs.len());
        for (a, b) in mine.iter().zip(&theirs) {
            assert!((a - b).abs() <= tol, "{}: logit {a} vs {b}", spec.label());
        }
        // One image at a time (batch 1 runs on the calling thread, in other code): the
        // same logits as the network's within the same bounds.
        let n = x.len() / 3;
        let k = theirs.len() / 3;
        for i in 0..3 {
            let one = e.logits(&x[i * n..(i + 1) * n], 1, false).unwrap().to_vec();
            assert_eq!(one.len(), k);
            for (a, b) in one.iter().zip(&theirs[i * k..(i + 1) * k]) {
                assert!(
                    (a - b).abs() <= tol,
                    "{} batch 1, image {i}: logit {a} vs {b}",
                    spec.label()
                );
            }
        }
        // And each technique did what it says.
        for w in back.net.weights() {
            let v = &back.params[w.range()];
            let zeros = v.iter().filter(|x| **x == 0.0).count() as f64 / v.len() as f64;
            let fc = w.name.starts_with("fc");
            let want = if fc { spec.prune_fc } else { spec.prune_conv };
            assert!(
                zeros + 1e-9 >= want * 0.99,
                "{}: {} is {:.3} sparse, wanted {want}",
                spec.label(),
                w.name,
                zeros
            );
            if let Some(Quant::Codebook { bits, .. }) = spec.quant {
                let mut distinct: Vec<u32> = v
                    .iter()
                    .filter(|x| **x != 0.0)
                    .map(|x| x.to_bits())
                    .collect();
                distinct.sort();
                distinct.dedup();
                assert!(
                    distinct.len() < 1 << bits,
                    "{}: {} values in {}",
                    spec.label(),
                    distinct.len(),
                    w.name
                );
            }
            if spec.quant == Some(Quant::Int8) {
                let rows = w.shape[0];
                for row in v.chunks(v.len() / rows) {
                    let m = row.iter().fold(0.0f32, |a, x| a.max(x.abs()));
                    if m > 0.0 {
                        for x in row {
                            let q = x / (m / 127.0);
                            assert!(
                                (q - q.round()).abs() < 1e-3,
                                "{}: {x} is not on the int8 grid",
                                spec.label()
                            );
                        }
                    }
                }
            }
        }
        if let Some(r) = spec.svd_ratio {
            for l in back
                .net
                .fc_layers()
                .iter()
                .take(back.net.fc_layers().len() - 1)
            {
                let (rank, _) = l.low_rank.expect("hidden layers factorized");
                assert!((rank * (l.out + l.inp)) as f64 <= (l.out * l.inp) as f64 / r);
            }
        }
        let acc = evaluate(&back.net, &back.params, &back.stats, &t.test).unwrap();
        // Fine-tuned (or gentle) configurations stay close to the dense model.
        assert!(
            acc.top1 >= base.top1 - 0.08,
            "{}: {} vs dense {}",
            spec.label(),
            acc.top1,
            base.top1
        );
    }
    // Pruning without fine-tuning loses more than with it (the fine-tuning works).
    let harsh = CompressSpec {
        prune_fc: 0.97,
        prune_conv: 0.7,
        ..Default::default()
    };
    let tuned = CompressSpec {
        fine_tune_steps: 120,
        lr: 1e-3,
        ..harsh.clone()
    };
    let score = |s: &CompressSpec| {
        let (m, _) = compress::compress(dense, s, &t.train, &t.test, |_, _, _, _| {}).unwrap();
        evaluate(&m.net, &m.params, &m.stats, &t.test).unwrap().top1
    };
    let (raw, ft) = (score(&harsh), score(&tuned));
    assert!(ft > raw, "fine-tuned {ft} vs one-shot {raw}");
}

#[test]
fn bad_settings_and_damaged_files_are_refused_and_nothing_is_left_half_written() {
    let d = tempfile::tempdir().unwrap();
    let t = trained(d.path());
    let bad = [
        (
            CompressSpec {
                prune_fc: 1.2,
                ..Default::default()
            },
            "sparsity",
        ),
        (
            CompressSpec {
                prune_conv: -0.1,
                ..Default::default()
            },
            "sparsity",
        ),
        (
            CompressSpec {
                quant: Some(Quant::Codebook { bits: 0, rate: 0.0 }),
                ..Default::default()
            },
            "bits",
        ),
        (
            CompressSpec {
                quant: Some(Quant::Codebook { bits: 9, rate: 0.0 }),
                ..Default::default()
            },
            "bits",
        ),
        (
            CompressSpec {
                svd_ratio: Some(0.5),
                ..Default::default()
            },
            "ratio",
        ),
        (
            CompressSpec {
                svd_energy: Some(1.5),
                ..Default::default()
            },
            "energy",
        ),
        (
            CompressSpec {
                lr: 0.0,
                ..Default::default()
            },
            "lr",
        ),
    ];
    let out = d.path().join("m.shoalz");
    for (s, want) in bad {
        let e = compress::run(&t.model, &s, &t.train, &t.test, Some(&out), |_, _, _, _| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "'{want}' not in: {e}");
        assert!(!out.exists(), "no output for a refused setting");
    }
    let ok = CompressSpec {
        quant: Some(Quant::Int8),
        ..Default::default()
    };
    let (r, _) = compress::run(
        &t.model,
        &ok,
        &t.train,
        &t.test,
        Some(&out),
        |_, _, _, _| {},
    )
    .unwrap();
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes.len(), r.bytes);
    assert!(r.ratio > 3.0, "{}", r.ratio);
    for damaged in [&bytes[..bytes.len() - 7], &bytes[..20]] {
        let e = compress::decode(damaged, &out).unwrap_err().to_string();
        assert!(e.contains("m.shoalz"), "{e}");
    }
    let mut flipped = bytes.clone();
    flipped[100] ^= 0x40;
    assert!(compress::decode(&flipped, &out)
        .unwrap_err()
        .to_string()
        .contains("checksum"));
    // A damaged saved model: named, no panic.
    let saved = d.path().join("model");
    t.model.save(&saved).unwrap();
    let st = saved.join("model.safetensors");
    let full = std::fs::read(&st).unwrap();
    std::fs::write(&st, &full[..full.len() / 2]).unwrap();
    let e = CnnModel::load(&saved).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}
