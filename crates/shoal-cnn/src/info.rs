//! `shoal info` for the CNN: a trained model directory, a compressed `.shoalz` file or
//! an ONNX file: the network, how it was made, its recorded scores and the commands
//! that use it.

use crate::compress::decode;
use crate::trainer::{CnnModel, CnnTrainConfig};
use crate::Result;
use shoal_runtime::info::{read_metrics, Info};
use std::path::Path;

/// The description of `path` when it is a CNN model, `.shoalz` or ONNX file; `None`
/// when it is something else.
pub fn describe(path: &Path) -> Result<Option<Info>> {
    if path.is_file() {
        let bytes = std::fs::read(path).map_err(crate::error::io_err(path))?;
        if bytes.starts_with(b"SHOALZ01") {
            return shoalz(path, &bytes).map(Some);
        }
        if path.extension().is_some_and(|e| e == "onnx") {
            return onnx(path).map(Some);
        }
        return Ok(None);
    }
    let Ok(meta) = std::fs::read(path.join("meta.json")) else {
        return Ok(None);
    };
    if serde_json::from_slice::<CnnTrainConfig>(&meta).is_err() {
        return Ok(None);
    }
    let m = CnnModel::load(path)?;
    let mut i = Info::new(path, "cnn-model", "a CNN model (from `shoal train cnn`)");
    network(&mut i, &m);
    let c = &m.cfg;
    i.made(
        "data",
        format!(
            "{}{}",
            c.data_dir.display(),
            match (c.train_limit, c.test_limit) {
                (0, 0) => String::new(),
                (a, b) => format!(" (first {a} training / {b} test images; 0: all)"),
            }
        ),
    );
    i.made(
        "recipe",
        format!(
            "Adam lr {} (cosine), batch {}, {} epochs{}, seed {}",
            c.lr,
            c.batch_size,
            c.epochs,
            match c.max_steps {
                0 => String::new(),
                s => format!(" or {s} updates"),
            },
            c.seed
        ),
    );
    i.metrics = read_metrics(path)?;
    let d = path.display();
    i.usage = vec![
        format!("shoal compress --model {d} --quant int8 --onnx model.onnx"),
        format!(
            "shoal compress --model {d} --prune-fc 0.95 --fine-tune-steps 1500 --out model.shoalz"
        ),
        format!("shoal compress --model {d} --sensitivity"),
    ];
    Ok(Some(i))
}

/// The network's lines of a description.
fn network(i: &mut Info, m: &CnnModel) {
    let n = &m.cfg.model;
    let blocks: Vec<String> = n
        .blocks
        .iter()
        .map(|b| {
            b.iter()
                .map(|w| w.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let fc: Vec<String> = n.fc.iter().map(|w| w.to_string()).collect();
    i.made(
        "network",
        format!(
            "input {}x{}x{}, conv blocks {}{}, FC head {}, {} classes; {} parameters",
            n.input[0],
            n.input[1],
            n.input[2],
            blocks.join("/"),
            if n.batch_norm { " (BatchNorm)" } else { "" },
            if fc.is_empty() {
                "-".into()
            } else {
                fc.join(",")
            },
            n.classes,
            m.net.len()
        ),
    );
    if n.fc_rank.iter().any(|&r| r > 0) {
        i.made("factorized", format!("FC ranks {:?} (0: full)", n.fc_rank));
    }
}

/// A compressed model file.
fn shoalz(path: &Path, bytes: &[u8]) -> Result<Info> {
    let (m, spec) = decode(bytes, path)?;
    let mut i = Info::new(
        path,
        "shoalz",
        "a compressed CNN model (from `shoal compress --out`)",
    );
    network(&mut i, &m);
    i.made("compression", spec.label());
    let dense = 4 * (m.params.len() + m.stats.len());
    i.made(
        "size",
        format!(
            "{} bytes; the model in float32: {dense} bytes ({:.2}x)",
            bytes.len(),
            dense as f64 / bytes.len().max(1) as f64
        ),
    );
    i.made(
        "scores",
        "not stored in the file; `shoal compress` printed them when it wrote it",
    );
    let d = path.display();
    i.usage = vec![
        format!("shoal compress --model {d} --onnx model.onnx  (scores it and exports it)"),
        format!("shoal compress --model {d} --quant int8  (compresses it further)"),
    ];
    Ok(i)
}

/// An ONNX file shoal can import (its metadata shown as written).
fn onnx(path: &Path) -> Result<Info> {
    let proto = shoal_onnx::load(path)?;
    let m = crate::onnx::import(path)?;
    let producer = format!("{} {}", proto.producer_name, proto.producer_version);
    let shoal_made = proto.producer_name == "shoal";
    let mut i = Info::new(
        path,
        "onnx",
        if shoal_made {
            "an ONNX model (from `shoal compress --onnx`)".to_string()
        } else {
            format!("an ONNX model (from {})", producer.trim())
        },
    );
    network(&mut i, &m);
    for p in &proto.metadata_props {
        i.made(&p.key, &p.value);
    }
    if !proto.doc_string.is_empty() {
        i.made("doc", &proto.doc_string);
    }
    let d = path.display();
    i.usage = vec![
        format!("onnxruntime.InferenceSession(\"{d}\") on float32 [N, 1, 28, 28] pixels / 255"),
        format!("shoal compress --model {d} --quant int8"),
    ];
    Ok(i)
}
