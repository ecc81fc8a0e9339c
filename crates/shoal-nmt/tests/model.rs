//! Behaviour of the recurrent layers, the NMT model, decoding and the flat adapter,
//! checked against independent references: finite differences, burn's own Adam, and
//! hand-computed masking semantics. Every random weight and input is drawn from the
//! engine's generator seeded per test, under one lock (the generator is one per
//! process and tests run on parallel threads).

use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer as _};
use burn::tensor::{Distribution, Tensor, TensorData};
use shoal_nmt::decode::{beam_search, beam_search_batch, greedy, Specials};
use shoal_nmt::model::DropoutRng;
use shoal_nmt::rnn::RnnState;
use shoal_nmt::{
    AttentionKind, CellKind, Cpu, CpuTrain, FlatLayout, NmtConfig, RecurrentLayer, Seq2Seq,
};
use shoal_optim::{Optimizer, OptimizerConfig};
use std::sync::Mutex;

type B = CpuTrain;

static GENERATOR: Mutex<()> = Mutex::new(());

/// Runs `f` (which draws weights or inputs) on the engine's generator seeded `seed`,
/// with no other test drawing in between.
fn seeded<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    let _g = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    <B as burn::tensor::backend::Backend>::seed(&dev(), seed);
    f()
}

fn dev() -> burn::tensor::Device<B> {
    Default::default()
}

fn tiny(cell: CellKind, attention: AttentionKind, layer_norm: bool) -> NmtConfig {
    NmtConfig {
        src_vocab: 13,
        tgt_vocab: 11,
        embed: 6,
        hidden: 5,
        layers: 2,
        cell,
        attention,
        layer_norm,
        dropout: 0.0,
        fused: true,
        tie_embeddings: false,
    }
}

const SRC: [u32; 8] = [4, 5, 6, 7, 8, 9, 0, 0]; // [2, 4], second row padded
const TGT_IN: [u32; 6] = [2, 4, 5, 2, 6, 0];
const TGT_OUT: [u32; 6] = [4, 5, 3, 6, 3, 0];

fn loss_of(model: &Seq2Seq<B>) -> Tensor<B, 1> {
    model.loss(&SRC, &TGT_IN, &TGT_OUT, 2, 4, 3, 0, 0.0, &mut None, &dev())
}

fn scalar(t: Tensor<B, 1>) -> f64 {
    t.into_scalar() as f64
}

/// Analytic gradients (through the flat adapter) equal central finite differences for
/// every model variant, on a sample of coordinates of every parameter.
#[test]
fn gradients_match_finite_differences() {
    for (cell, att, ln, tie) in [
        (CellKind::Gru, AttentionKind::None, false, false),
        (CellKind::Gru, AttentionKind::Luong, false, false),
        (CellKind::Gru, AttentionKind::Bahdanau, false, false),
        (CellKind::Lstm, AttentionKind::Luong, false, false),
        (CellKind::Gru, AttentionKind::Luong, true, false),
        (CellKind::Lstm, AttentionKind::None, true, false),
        // Tied embeddings: the target embedding's gradient sums both of its uses.
        (CellKind::Gru, AttentionKind::Luong, false, true),
        (CellKind::Lstm, AttentionKind::Bahdanau, false, true),
    ] {
        let cfg = NmtConfig {
            embed: if tie { 5 } else { 6 },
            tie_embeddings: tie,
            ..tiny(cell, att, ln)
        };
        let model = seeded(11, || cfg.init::<B>(&dev()).unwrap());
        let layout = FlatLayout::of(&model);
        let mut params = vec![0.0; layout.total];
        layout.read_params(&model, &mut params).unwrap();
        let grads = loss_of(&model).backward();
        let mut g = vec![0.0; layout.total];
        layout.read_grads(&model, &grads, &mut g).unwrap();
        // Small enough that LayerNorm's curvature does not dominate, large enough for f32.
        let mut checked = 0;
        for spec in &layout.params {
            // A few coordinates of each parameter, spread over it.
            for k in 0..3 {
                let i = spec.offset + (k * 7919) % spec.len;
                // Central differences at steps h and h/2, combined by Richardson
                // extrapolation to cancel the O(h^2) term (LayerNorm has enough curvature
                // for it to matter at f32-friendly step sizes).
                let central = |h: f32| {
                    let mut p = params.clone();
                    p[i] += h;
                    let up = scalar(loss_of(&layout.write_params(model.clone(), &p).unwrap()));
                    p[i] -= 2.0 * h;
                    let down = scalar(loss_of(&layout.write_params(model.clone(), &p).unwrap()));
                    (up - down) / (2.0 * h as f64)
                };
                let fd = (4.0 * central(2e-3) - central(4e-3)) / 3.0;
                let an = g[i] as f64;
                let err = (fd - an).abs();
                assert!(
                    err < 2e-3 + 3e-2 * fd.abs().max(an.abs()),
                    "{cell:?}/{att:?}/ln={ln}/tie={tie}: {} [{}]: analytic {an}, finite difference {fd}",
                    spec.name,
                    i - spec.offset
                );
                checked += 1;
            }
        }
        assert!(checked > 30);
    }
}

/// Parameter names are unique, PyTorch-like, and the layout covers everything.
#[test]
fn layout_names_and_round_trip() {
    let model = seeded(12, || {
        tiny(CellKind::Gru, AttentionKind::Luong, true)
            .init::<B>(&dev())
            .unwrap()
    });
    let layout = FlatLayout::of(&model);
    let names: Vec<&str> = layout.params.iter().map(|p| p.name.as_str()).collect();
    for want in [
        "src_embed",
        "encoder.0.weight_ih",
        "encoder.1.bias_hh",
        "decoder.0.norm_ih.gamma",
        "attn.w_score",
        "out_weight",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let mut uniq = names.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), names.len());
    assert_eq!(
        layout.params.iter().map(|p| p.len).sum::<usize>(),
        layout.total
    );
    let spec = layout.find("encoder.0.weight_ih").unwrap();
    assert_eq!(spec.shape, vec![15, 6]);

    let mut a = vec![0.0; layout.total];
    layout.read_params(&model, &mut a).unwrap();
    let changed: Vec<f32> = a.iter().map(|x| x * 2.0 + 1.0).collect();
    let model2 = layout.write_params(model, &changed).unwrap();
    let mut b = vec![0.0; layout.total];
    layout.read_params(&model2, &mut b).unwrap();
    assert_eq!(b, changed);
    // Written parameters still train: every tensor gets a gradient.
    let grads = loss_of(&model2).backward();
    let mut g = vec![0.0; layout.total];
    layout.read_grads(&model2, &grads, &mut g).unwrap();
    for spec in &layout.params {
        let gs = &g[spec.offset..spec.offset + spec.len];
        assert!(
            gs.iter().any(|&x| x != 0.0),
            "{} has no gradient",
            spec.name
        );
    }
    // A wrong-sized buffer is an error, not a panic.
    assert!(layout.write_params(model2, &b[1..]).is_err());
}

/// Three Adam updates done through flat buffers (shoal-optim) give the same parameters
/// as burn's own Adam applied to the module.
#[test]
fn flat_update_equals_engine_optimizer() {
    let cfg = tiny(CellKind::Gru, AttentionKind::Luong, false);
    let model = seeded(13, || cfg.init::<B>(&dev()).unwrap());
    let layout = FlatLayout::of(&model);

    let mut engine_model = model.clone();
    let mut engine_opt = AdamConfig::new().with_epsilon(1e-8).init::<B, Seq2Seq<B>>();
    let mut flat_model = model;
    let mut flat_opt = Optimizer::new(OptimizerConfig::default(), layout.total).unwrap();
    let mut params = vec![0.0; layout.total];
    let mut g = vec![0.0; layout.total];
    layout.read_params(&flat_model, &mut params).unwrap();
    let start = params.clone();
    let lr = 0.01;
    for _ in 0..3 {
        let grads = loss_of(&engine_model).backward();
        let gp = GradientsParams::from_grads(grads, &engine_model);
        engine_model = engine_opt.step(lr, engine_model, gp);

        let mut grads = loss_of(&flat_model).backward();
        layout.take_grads(&flat_model, &mut grads, &mut g).unwrap();
        flat_opt.step(lr as f32, &mut params, &g).unwrap();
        flat_model = layout.write_params(flat_model, &params).unwrap();
    }
    let mut a = vec![0.0; layout.total];
    let mut b = vec![0.0; layout.total];
    layout.read_params(&engine_model, &mut a).unwrap();
    layout.read_params(&flat_model, &mut b).unwrap();
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(max < 1e-5, "max difference {max}");
    // Adam moves each parameter by about lr per update: three updates moved them.
    let moved = a
        .iter()
        .zip(&start)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(moved > 0.02, "the parameters moved only {moved}");
}

/// With a padding mask, a layer's final state is the state after each sequence's last
/// real token: equal to running the unpadded sequence alone.
#[test]
fn masked_final_state_equals_unpadded_run() {
    for cell in [CellKind::Gru, CellKind::Lstm] {
        let (layer, x) = seeded(14, || {
            (
                RecurrentLayer::<Cpu>::new(cell, 4, 3, false, &Default::default()),
                Tensor::<Cpu, 3>::random(
                    [2, 5, 4],
                    Distribution::Normal(0.0, 1.0),
                    &Default::default(),
                ),
            )
        });
        let mask = Tensor::<Cpu, 2>::from_data(
            TensorData::new(vec![1.0f32, 1., 1., 1., 1., 1., 1., 0., 0., 0.], [2, 5]),
            &Default::default(),
        );
        let (_, st) = layer.forward(
            x.clone(),
            Some(&mask),
            layer.zero_state(2, &Default::default()),
        );
        let short = x.narrow(0, 1, 1).narrow(1, 0, 2);
        let (_, st2) = layer.forward(short, None, layer.zero_state(1, &Default::default()));
        let a: Vec<f32> = st.h.narrow(0, 1, 1).into_data().to_vec().unwrap();
        let b: Vec<f32> = st2.h.into_data().to_vec().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "{cell:?}: {a:?} vs {b:?}");
        }
    }
}

/// `step` and `forward` compute the same recurrence.
#[test]
fn step_equals_sequence_forward() {
    let (layer, x) = seeded(15, || {
        (
            RecurrentLayer::<Cpu>::new(CellKind::Gru, 4, 3, true, &Default::default()),
            Tensor::<Cpu, 3>::random(
                [2, 4, 4],
                Distribution::Normal(0.0, 1.0),
                &Default::default(),
            ),
        )
    });
    let (out, _) = layer.forward(x.clone(), None, layer.zero_state(2, &Default::default()));
    let mut st: RnnState<Cpu> = layer.zero_state(2, &Default::default());
    for t in 0..4 {
        st = layer.step(x.clone().narrow(1, t, 1).reshape([2, 4]), &st);
    }
    let a: Vec<f32> = out.narrow(1, 3, 1).into_data().to_vec().unwrap();
    let b: Vec<f32> = st.h.into_data().to_vec().unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5);
    }
}

/// Training on a tiny copy task drives the loss down, and greedy decoding and beam
/// search then reproduce the sources; beam width 1 equals greedy.
#[test]
fn learns_to_copy_and_decodes() {
    for att in [AttentionKind::Luong, AttentionKind::Bahdanau] {
        let cfg = NmtConfig {
            src_vocab: 10,
            tgt_vocab: 10,
            embed: 16,
            hidden: 32,
            layers: 1,
            attention: att,
            ..Default::default()
        };
        let mut model = seeded(16, || cfg.init::<B>(&dev()).unwrap());
        let layout = FlatLayout::of(&model);
        let mut opt = Optimizer::new(OptimizerConfig::default(), layout.total).unwrap();
        let mut p = vec![0.0; layout.total];
        let mut g = vec![0.0; layout.total];
        layout.read_params(&model, &mut p).unwrap();
        let data: Vec<Vec<u32>> = vec![vec![4, 5, 6], vec![7, 8, 9], vec![5, 7, 4], vec![9, 6, 8]];
        let mut src = Vec::new();
        let mut tin = Vec::new();
        let mut tout = Vec::new();
        for s in &data {
            src.extend(s);
            tin.push(2);
            tin.extend(s);
            tout.extend(s);
            tout.push(3);
        }
        let mut first = 0.0;
        let mut last = 0.0;
        for step in 0..150 {
            let mut rng = Some(DropoutRng::new(1, step, 0.0));
            let loss = model.loss(&src, &tin, &tout, 4, 3, 4, 0, 0.0, &mut rng, &dev());
            let l = loss.clone().into_scalar();
            if step == 0 {
                first = l;
            }
            last = l;
            let grads = loss.backward();
            layout.read_grads(&model, &grads, &mut g).unwrap();
            opt.step(0.02, &mut p, &g).unwrap();
            model = layout.write_params(model, &p).unwrap();
        }
        assert!(last < 0.05 * first, "{att:?}: loss {first} -> {last}");
        let inf = model.valid();
        let sp = Specials {
            pad: 0,
            bos: 2,
            eos: 3,
        };
        let out = greedy(&inf, &data, sp, &Default::default()).unwrap();
        assert_eq!(out, data, "{att:?}");
        for s in &data {
            let b1 = beam_search(&inf, s, 1, 0.6, sp, &Default::default()).unwrap();
            let b4 = beam_search(&inf, s, 4, 0.6, sp, &Default::default()).unwrap();
            assert_eq!(&b1, s);
            assert_eq!(&b4, s);
        }
        let batched = beam_search_batch(&inf, &data, 4, 0.6, sp, &Default::default()).unwrap();
        assert_eq!(batched, data, "{att:?}");
    }
}

/// The fused GRU and LSTM operations (and the fused cross-entropy) give the outputs
/// and every gradient of the step-by-step engine path, for random shapes, lengths and
/// masks, and for the whole model.
#[test]
fn fused_recurrence_equals_unfused_reference() {
    let mut seed = 7u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    for case in 0..12 {
        let cell = if case % 2 == 0 {
            CellKind::Gru
        } else {
            CellKind::Lstm
        };
        let (b, t, d, h) = (
            1 + next() % 4,
            1 + next() % 6,
            1 + next() % 7,
            1 + next() % 9,
        );
        // Every other GRU case has LayerNorm inside the cell.
        let ln = case % 4 == 2;
        let (layer, x, h0, coef) = seeded(100 + case, || {
            (
                RecurrentLayer::<B>::new(cell, d, h, ln, &dev()),
                Tensor::<B, 3>::random([b, t, d], Distribution::Normal(0.0, 1.0), &dev())
                    .require_grad(),
                Tensor::<B, 2>::random([b, h], Distribution::Normal(0.0, 1.0), &dev())
                    .require_grad(),
                Tensor::<B, 3>::random([b, t, h], Distribution::Normal(0.0, 1.0), &dev()),
            )
        });
        let lens: Vec<usize> = (0..b).map(|_| 1 + next() % t).collect();
        let mask_v: Vec<f32> = (0..b * t)
            .map(|i| if i % t < lens[i / t] { 1.0 } else { 0.0 })
            .collect();
        let mask = Tensor::<B, 2>::from_data(TensorData::new(mask_v, [b, t]), &dev());
        let run = |fused: bool| {
            let l = layer.clone().with_fused(fused);
            let c0 = (cell == CellKind::Lstm).then(|| h0.clone() * 0.5);
            let init = RnnState {
                h: h0.clone(),
                c: c0,
            };
            let (out, st) = if fused {
                l.forward(x.clone(), Some(&mask), init)
            } else {
                l.forward_unfused(x.clone(), Some(&mask), init)
            };
            let mut loss = (out.clone() * coef.clone()).sum() + st.h.sum() * 0.5;
            if let Some(c) = st.c {
                loss = loss + (c.clone() * c).sum() * 0.3;
            }
            let grads = loss.backward();
            let layout = FlatLayout::of(&l);
            let mut g = vec![0.0; layout.total];
            layout.read_grads(&l, &grads, &mut g).unwrap();
            let gx: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
            let gh: Vec<f32> = h0.grad(&grads).unwrap().into_data().to_vec().unwrap();
            let o: Vec<f32> = out.into_data().to_vec().unwrap();
            (o, g, gx, gh)
        };
        let a = run(true);
        let r = run(false);
        // The two paths sum in different orders: measured (seeded cases) up to 1.7e-7 of
        // each quantity's largest value without LayerNorm, 8e-7 with it over 5 units,
        // and 3.4e-6 with it over 2 units (normalising 2 values leaves gradients that
        // are differences of near-equal terms). Bounds ~6x those, plus 1e-7 of the case's
        // largest value anywhere (rounding of large terms reaches small gradients through
        // such cancellations: 3.9e-7 in an input gradient of at most 8.6e-4, whose case
        // has parameter gradients of 8.3).
        let tol = match (ln, h) {
            (false, _) => 1e-6,
            (true, 0..=2) => 2e-5,
            (true, _) => 5e-6,
        };
        let largest = |v: &[f32]| v.iter().fold(0.0f32, |a, b| a.max(b.abs()));
        let case_top = [&r.0, &r.1, &r.2, &r.3]
            .iter()
            .fold(0.0f32, |a, v| a.max(largest(v)));
        let close = |name: &str, x: &[f32], y: &[f32]| {
            assert_eq!(x.len(), y.len());
            let top = largest(y);
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                assert!(
                    (p - q).abs() <= tol * top + 1e-7 * case_top,
                    "{cell:?} ln={ln} {name}[{i}] (b{b} t{t} d{d} h{h}): fused {p} vs reference \
                     {q} (largest {top})"
                );
            }
        };
        close("output", &a.0, &r.0);
        close("param grads", &a.1, &r.1);
        close("input grad", &a.2, &r.2);
        close("h0 grad", &a.3, &r.3);
    }
    // The whole model: same loss and same flat gradient.
    for (cell, att, ln) in [
        (CellKind::Gru, AttentionKind::None, false),
        (CellKind::Gru, AttentionKind::Luong, false),
        (CellKind::Gru, AttentionKind::Bahdanau, false),
        (CellKind::Lstm, AttentionKind::Luong, false),
        (CellKind::Gru, AttentionKind::Luong, true),
    ] {
        let cfg = tiny(cell, att, ln);
        let fused = seeded(17, || {
            NmtConfig {
                fused: true,
                ..cfg.clone()
            }
            .init::<B>(&dev())
            .unwrap()
        });
        let layout = FlatLayout::of(&fused);
        let mut p = vec![0.0; layout.total];
        layout.read_params(&fused, &mut p).unwrap();
        // Built under the lock too (its draws are overwritten, but they are draws).
        let shell = seeded(18, || {
            NmtConfig {
                fused: false,
                ..cfg
            }
            .init::<B>(&dev())
            .unwrap()
        });
        let reference = layout.write_params(shell, &p).unwrap();
        let mut ga = vec![0.0; layout.total];
        let mut gb = vec![0.0; layout.total];
        let la = loss_of(&fused);
        let lb = loss_of(&reference);
        let (va, vb) = (la.clone().into_scalar(), lb.clone().into_scalar());
        assert!(
            (va - vb).abs() < 1e-5,
            "{cell:?}/{att:?}/ln={ln}: {va} vs {vb}"
        );
        layout.read_grads(&fused, &la.backward(), &mut ga).unwrap();
        layout
            .read_grads(&reference, &lb.backward(), &mut gb)
            .unwrap();
        let max = ga
            .iter()
            .zip(&gb)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(
            max < 1e-5,
            "{cell:?}/{att:?}: max gradient difference {max}"
        );
    }
}

/// The parameter count computed from the sizes (what the configuration check uses before
/// building anything) is the built model's, for every cell, attention and LayerNorm.
#[test]
fn parameter_count_from_the_sizes_is_the_models() {
    for cell in [CellKind::Gru, CellKind::Lstm] {
        for att in [
            AttentionKind::None,
            AttentionKind::Luong,
            AttentionKind::Bahdanau,
        ] {
            for (ln, tie) in [(false, false), (true, false), (false, true)] {
                let cfg = NmtConfig {
                    layers: 3,
                    embed: 5,
                    tie_embeddings: tie,
                    ..tiny(cell, att, ln)
                };
                let model = seeded(19, || cfg.init::<B>(&dev()).unwrap());
                assert_eq!(
                    cfg.param_count(),
                    FlatLayout::of(&model).total as u128,
                    "{cell:?}/{att:?}/ln={ln}/tie={tie}"
                );
                // Tied, the output layer has no matrix of its own.
                let names: Vec<String> = FlatLayout::of(&model)
                    .params
                    .iter()
                    .map(|p| p.name.clone())
                    .collect();
                assert_eq!(
                    names.iter().any(|n| n.contains("out_weight")),
                    !tie,
                    "{names:?}"
                );
            }
        }
    }
}

/// Beam search over a batch of sentences (padded together, every hypothesis a row)
/// gives each sentence what it gets searched alone (a batch of one: no padding, no
/// other sentence's rows): untrained models of each attention kind and cell (many
/// close scores), sources of 0-9 tokens, beams of 1-5. (Before the one-sentence search
/// became a batch of one, its separate implementation gave the same output on all
/// 1,000 validation sentences at beam 5: BENCHMARKS.md.)
#[test]
fn batched_beam_search_equals_one_sentence_at_a_time() {
    let sp = Specials {
        pad: 0,
        bos: 2,
        eos: 3,
    };
    let sources: Vec<Vec<u32>> = (0..12)
        .map(|i| {
            (0..(i * 7) % 10)
                .map(|t| 4 + ((i * 5 + t * 3) % 9) as u32)
                .collect()
        })
        .collect();
    assert!(sources.iter().any(|s| s.is_empty()));
    for (case, (cell, att)) in [
        (CellKind::Gru, AttentionKind::Luong),
        (CellKind::Lstm, AttentionKind::Bahdanau),
        (CellKind::Gru, AttentionKind::None),
    ]
    .into_iter()
    .enumerate()
    {
        let model = seeded(40 + case as u64, || {
            tiny(cell, att, false).init::<B>(&dev()).unwrap()
        });
        let inf = model.valid();
        for k in [1, 3, 5] {
            let batched = beam_search_batch(&inf, &sources, k, 0.6, sp, &dev()).unwrap();
            for (s, got) in sources.iter().zip(&batched) {
                let alone = beam_search(&inf, s, k, 0.6, sp, &dev()).unwrap();
                assert_eq!(got, &alone, "{cell:?}/{att:?}, beam {k}, source {s:?}");
            }
        }
    }
}
