//! ONNX against recorded references: a PyTorch export (fixtures/onnx/torch_export.py)
//! imports into a network that gives PyTorch's outputs, and compresses; shoal's own
//! exports (dense, int8 QDQ, factorized) are byte-for-byte the files onnxruntime ran in
//! fixtures/onnx/ort_check.py on raw pixels in [0, 1] (the graph standardizes), and
//! shoal's outputs on the standardized pixels equal onnxruntime's recorded ones.
//! Malformed files and unsupported graphs are refused with the operator and node named.
//! With SHOAL_WRITE_FIXTURES=1 the export test rewrites its model files instead (then
//! run ort_check.py).

use shoal_cnn::compress::{self, CompressSpec, Quant};
use shoal_cnn::onnx::{export, import};
use shoal_cnn::trainer::CnnModel;
use shoal_onnx::{node, tensor_f32, value_info, Dim, GraphProto, FLOAT};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx")
}

fn recorded() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("torch_cnn.json")).unwrap()).unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn logits(m: &CnnModel, x: &[f32], batch: usize) -> Vec<f32> {
    let mut ws = shoal_cnn::model::CnnWork::default();
    m.net
        .predict(&m.params, &m.stats, x, batch, &mut ws)
        .unwrap()
        .to_vec()
}

/// shoal's f32 network against PyTorch's and onnxruntime's f32 outputs on the same
/// weights: other summation orders (measured worst 4.6e-7 relative; bound 10x that).
const TOL_F32: f32 = 5e-6;

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0f32, f32::max);
    eprintln!("MEASURE {what}: {worst:e}");
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x - y).abs() <= tol * y.abs().max(1.0),
            "{what}: {x} vs {y}"
        );
    }
}

#[test]
fn a_pytorch_export_imports_and_compresses() {
    let r = recorded();
    let m = import(&fixtures().join("torch_cnn.onnx")).unwrap();
    assert_eq!(m.cfg.model.blocks, vec![vec![3], vec![4]]);
    assert_eq!((m.cfg.model.fc.clone(), m.cfg.model.classes), (vec![6], 3));
    let x = floats(&r["input"]);
    let want = floats(&r["pytorch_logits"]);
    close(&logits(&m, &x, 3), &want, TOL_F32, "imported vs PyTorch");
    // One image at a time (batch 1 runs on the calling thread, in other code than a
    // batch): each gives its PyTorch logits too.
    let (n, k) = (x.len() / 3, want.len() / 3);
    for i in 0..3 {
        close(
            &logits(&m, &x[i * n..(i + 1) * n], 1),
            &want[i * k..(i + 1) * k],
            TOL_F32,
            &format!("image {i} alone vs PyTorch"),
        );
    }
    // It compresses like a trained shoal model, and exports back to the same network.
    let spec = CompressSpec {
        quant: Some(Quant::Int8),
        ..Default::default()
    };
    let (q, books) = compress::compress(&m, &spec, &dummy(), &dummy(), |_, _, _, _| {}).unwrap();
    let bytes = compress::encode(&q, &spec, &books, compress::Part::All).unwrap();
    assert!(
        bytes.len()
            < compress::encode(&m, &CompressSpec::default(), &[], compress::Part::All)
                .unwrap()
                .len()
    );
    close(
        &logits(&q, &x, 3),
        &floats(&r["pytorch_logits"]),
        // int8 weights and activations: measured 7.1e-4.
        5e-3,
        "int8 vs PyTorch",
    );
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("again.onnx");
    shoal_onnx::save(&export(&m, false).unwrap(), &p).unwrap();
    let again = import(&p).unwrap();
    assert_eq!(again.params, m.params);
    assert_eq!(again.stats, m.stats);
}

/// An image set of one black 8x8 image (compression without fine-tuning reads none).
fn dummy() -> shoal_data::images::ImageSet {
    shoal_data::images::ImageSet {
        rows: 8,
        cols: 8,
        pixels: vec![0; 64],
        labels: vec![0],
    }
}

/// The network of the export test: the PyTorch fixture's shape, weights from a seed,
/// BN statistics made non-trivial.
fn native(rank: bool) -> CnnModel {
    let model = shoal_cnn::model::CnnConfig {
        input: [1, 8, 8],
        blocks: vec![vec![3], vec![4]],
        fc: vec![6],
        classes: 3,
        fc_rank: if rank { vec![2, 0] } else { vec![] },
        ..Default::default()
    };
    let net = shoal_cnn::model::Cnn::new(model.clone()).unwrap();
    let (params, mut stats) = net.init(11);
    for (i, v) in stats.iter_mut().enumerate() {
        *v += 0.1 * ((i % 5) as f32 - 1.0).abs() + if i % 2 == 0 { -0.05 } else { 0.2 };
    }
    CnnModel {
        cfg: shoal_cnn::trainer::CnnTrainConfig {
            model,
            ..Default::default()
        },
        net,
        params,
        stats,
    }
}

#[test]
fn exports_are_what_onnxruntime_ran_and_agree_with_it() {
    let write = std::env::var_os("SHOAL_WRITE_FIXTURES").is_some();
    // Rewriting the fixtures checks nothing: never in CI.
    assert!(
        !(write && std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")),
        "SHOAL_WRITE_FIXTURES is set under CI"
    );
    let r = recorded();
    let x = floats(&r["input"]);
    let ort: serde_json::Value = if write {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&std::fs::read(fixtures().join("shoal_export.json")).unwrap())
            .unwrap()
    };
    for (name, rank, int8) in [
        ("shoal_dense", false, false),
        ("shoal_int8", false, true),
        ("shoal_low_rank", true, false),
    ] {
        let mut m = native(rank);
        if int8 {
            // The model computes with the int8 grid the export stores.
            let spec = CompressSpec {
                quant: Some(Quant::Int8),
                ..Default::default()
            };
            m = compress::compress(&m, &spec, &dummy(), &dummy(), |_, _, _, _| {})
                .unwrap()
                .0;
        }
        let bytes = shoal_onnx::to_bytes(&export(&m, int8).unwrap());
        let path = fixtures().join(format!("{name}.onnx"));
        if write {
            std::fs::write(&path, &bytes).unwrap();
            continue;
        }
        assert!(
            bytes == std::fs::read(&path).unwrap(),
            "{name}: export differs from the fixture onnxruntime ran"
        );
        // onnxruntime ran it on the pixels the standardized inputs came from, with the
        // constants it read from the model's metadata.
        let md = &ort[format!("{name}_metadata")];
        assert_eq!(md["input_range"], "[0, 1]", "{name}: {md}");
        assert_eq!(
            md["normalization_mean"],
            shoal_cnn::trainer::PIXEL_MEAN.to_string()
        );
        close(&logits(&m, &x, 3), &floats(&ort[name]), TOL_F32, name);
        // And it reads back as the same network.
        let back = import(&path).unwrap();
        assert_eq!(back.params, m.params, "{name} re-imported");
    }
}

#[test]
fn bad_files_and_graphs_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let full = std::fs::read(fixtures().join("torch_cnn.onnx")).unwrap();
    let p = d.path().join("cut.onnx");
    std::fs::write(&p, &full[..full.len() / 3]).unwrap();
    let e = import(&p).unwrap_err().to_string();
    assert!(e.contains("cut.onnx"), "{e}");
    let graph = |nodes, inits| {
        shoal_onnx::model(GraphProto {
            node: nodes,
            initializer: inits,
            input: vec![value_info(
                "input",
                FLOAT,
                &[
                    Dim::Named("N".into()),
                    Dim::Fixed(1),
                    Dim::Fixed(8),
                    Dim::Fixed(8),
                ],
            )],
            ..Default::default()
        })
    };
    let cases = [
        (
            graph(
                vec![node("Softmax", "sm", &["input"], &["y"], vec![])],
                vec![],
            ),
            "unsupported ONNX operator Softmax (node 'sm')",
        ),
        (
            graph(
                vec![node(
                    "Conv",
                    "c5",
                    &["input", "w"],
                    &["y"],
                    vec![shoal_onnx::attr_ints("pads", &[2, 2, 2, 2])],
                )],
                vec![tensor_f32("w", &[2, 1, 5, 5], &[0.0; 50])],
            ),
            "node 'c5': only 3x3",
        ),
        (
            graph(
                vec![node("Gemm", "g", &["input", "nowhere"], &["y"], vec![])],
                vec![],
            ),
            "input 'nowhere' is not a constant",
        ),
        // Valid protobuf, impossible nodes: no inputs, no outputs.
        (
            graph(vec![node("Conv", "bare", &[], &["y"], vec![])], vec![]),
            "node 'bare' (Conv): has 0 inputs, needs input 1",
        ),
        (
            graph(
                vec![node("BatchNormalization", "bn", &["input"], &["y"], vec![])],
                vec![],
            ),
            "node 'bn'",
        ),
        (
            graph(
                vec![node("DequantizeLinear", "dq", &["w", "s"], &[], vec![])],
                vec![
                    tensor_f32("w", &[4], &[1.0; 4]),
                    tensor_f32("s", &[1], &[0.5]),
                ],
            ),
            "node 'dq' (DequantizeLinear): has no output",
        ),
        (
            graph(
                vec![node("Sub", "centre", &["input", "v"], &["y"], vec![])],
                vec![tensor_f32("v", &[2], &[0.5; 2])],
            ),
            "node 'centre' (Sub): only a scalar constant",
        ),
        // A standardisation the network was not trained behind.
        (
            {
                let mut m = export(&native(false), false).unwrap();
                let g = m.graph.as_mut().unwrap();
                let t = g
                    .initializer
                    .iter_mut()
                    .find(|t| t.name == "pixel_mean")
                    .unwrap();
                *t = tensor_f32("pixel_mean", &[1], &[0.5]);
                m
            },
            "standardizes its input with mean 0.5, std 0.353",
        ),
    ];
    for (i, (m, want)) in cases.into_iter().enumerate() {
        let p = d.path().join(format!("bad{i}.onnx"));
        shoal_onnx::save(&m, &p).unwrap();
        let e = import(&p).unwrap_err().to_string();
        assert!(
            e.contains(want) && e.contains(&format!("bad{i}.onnx")),
            "'{want}' not in: {e}"
        );
    }
}

/// Found by `fuzz/` (target `onnx`): an int8 export whose DequantizeLinear has fewer
/// zero points than scales indexed past them (a panic); now an error naming the node.
/// The file is the fuzzer's input, kept as it found it.
#[test]
fn dequantize_with_mismatched_zero_points_is_refused() {
    let p = fixtures().join("fuzz-dequantize-zero-points.onnx");
    let e = import(&p).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        e.contains("fc1.weight_dq") && e.contains("6 scales and 3 zero points"),
        "{e}"
    );
}
