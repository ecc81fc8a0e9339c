//! The CNN to and from ONNX. Export writes the network as opset-13 operators (Conv,
//! BatchNormalization, Relu, MaxPool, Flatten, Gemm), a factorized layer as two Gemm,
//! and int8 weights as int8 initializers with per-channel scales behind
//! DequantizeLinear (the QDQ form onnxruntime runs). The exported graph takes pixels as
//! a user has them, in [0, 1] (torchvision's `ToTensor`): its first two nodes are the
//! standardisation shoal trains with (Sub mean, Div std), and the model's doc string and
//! metadata say so. Import strips that standardisation again (a graph without it is
//! read as taking standardized pixels, as a PyTorch export of a network does), and
//! refuses one with other constants. Import reads the same shapes of
//! network from any exporter (PyTorch's included): a chain of 3x3 same-padding
//! convolutions with optional BatchNormalization, 2x2 max pooling, flattening, and
//! fully-connected layers (Gemm, or MatMul + Add); a convolution's bias before a
//! BatchNormalization folds into its running mean. Anything else is refused, naming
//! the operator and the node.

use crate::model::{Cnn, CnnConfig, BN_EPS};
use crate::trainer::{CnnModel, CnnTrainConfig, PIXEL_MEAN, PIXEL_STD};
use crate::{Error, Result};
use shoal_onnx::{
    attr, attr_float, attr_int, attr_ints, dims, meta, node, tensor_f32, tensor_i8, value_info,
    values_f32, Dim, GraphProto, ModelProto, FLOAT,
};
use std::collections::HashMap;
use std::path::Path;

/// A node's input `i`, or why not (a node that lacks it is named).
fn node_input<'a>(
    n: &'a shoal_onnx::NodeProto,
    i: usize,
    who: &str,
) -> std::result::Result<&'a str, String> {
    n.input.get(i).map(String::as_str).ok_or_else(|| {
        format!(
            "node '{who}' ({}): has {} inputs, needs input {i}",
            n.op_type,
            n.input.len()
        )
    })
}

/// A node's first output, or why not.
fn node_output<'a>(
    n: &'a shoal_onnx::NodeProto,
    who: &str,
) -> std::result::Result<&'a str, String> {
    n.output
        .first()
        .map(String::as_str)
        .ok_or_else(|| format!("node '{who}' ({}): has no output", n.op_type))
}

/// The network as an ONNX model; with `int8`, every convolution and fully-connected
/// weight is stored as int8 with one scale per output channel.
pub fn export(m: &CnnModel, int8: bool) -> Result<ModelProto> {
    let cfg = &m.cfg.model;
    let p = |name: &str| m.tensor(name);
    let mut g = GraphProto {
        name: "shoal-cnn".into(),
        ..Default::default()
    };
    let [c, h, w] = cfg.input;
    let mut input = value_info(
        "input",
        FLOAT,
        &[
            Dim::Named("N".into()),
            Dim::Fixed(c),
            Dim::Fixed(h),
            Dim::Fixed(w),
        ],
    );
    input.doc_string = INPUT_DOC.into();
    g.input.push(input);
    // A weight as an initializer, or int8 + scales + DequantizeLinear; returns the
    // name the consuming node reads.
    let weight = |g: &mut GraphProto, name: &str| -> Result<String> {
        let (v, shape) = p(name)?;
        if !int8 {
            g.initializer.push(tensor_f32(name, shape, v));
            return Ok(name.to_string());
        }
        let rows = shape[0];
        let cols = v.len() / rows;
        let q = shoal_kernels::host::int8::QuantI8::from_dense(v, rows, cols)?;
        let (qn, sn, zn, out) = (
            format!("{name}_quantized"),
            format!("{name}_scale"),
            format!("{name}_zero_point"),
            format!("{name}_dequantized"),
        );
        g.initializer.push(tensor_i8(&qn, shape, &q.q));
        g.initializer.push(tensor_f32(&sn, &[rows], &q.scale));
        g.initializer.push(tensor_i8(&zn, &[rows], &vec![0; rows]));
        g.node.push(node(
            "DequantizeLinear",
            &format!("{name}_dq"),
            &[&qn, &sn, &zn],
            &[&out],
            vec![attr_int("axis", 0)],
        ));
        Ok(out)
    };
    // The standardisation the network was trained behind, inside the graph.
    g.initializer
        .push(tensor_f32(NORM_MEAN, &[1], &[PIXEL_MEAN]));
    g.initializer.push(tensor_f32(NORM_STD, &[1], &[PIXEL_STD]));
    g.node.push(node(
        "Sub",
        "centre",
        &["input", NORM_MEAN],
        &["centred"],
        vec![],
    ));
    g.node.push(node(
        "Div",
        "standardize",
        &["centred", NORM_STD],
        &["standardized"],
        vec![],
    ));
    let mut x = "standardized".to_string();
    let mut k = 0;
    for (bi, block) in cfg.blocks.iter().enumerate() {
        for _ in block {
            k += 1;
            let wn = weight(&mut g, &format!("conv{k}.weight"))?;
            let mut inputs = vec![x.clone(), wn];
            if !cfg.batch_norm {
                let (b, s) = p(&format!("conv{k}.bias"))?;
                g.initializer
                    .push(tensor_f32(&format!("conv{k}.bias"), s, b));
                inputs.push(format!("conv{k}.bias"));
            }
            let out = format!("conv{k}");
            let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
            g.node.push(node(
                "Conv",
                &out,
                &refs,
                &[&out],
                vec![
                    attr_ints("kernel_shape", &[3, 3]),
                    attr_ints("pads", &[1, 1, 1, 1]),
                    attr_ints("strides", &[1, 1]),
                ],
            ));
            x = out;
            if cfg.batch_norm {
                let names: Vec<String> = ["weight", "bias", "running_mean", "running_var"]
                    .iter()
                    .map(|s| format!("bn{k}.{s}"))
                    .collect();
                for n in &names {
                    let (v, s) = p(n)?;
                    g.initializer.push(tensor_f32(n, s, v));
                }
                let out = format!("bn{k}");
                let mut ins = vec![x.as_str()];
                ins.extend(names.iter().map(String::as_str));
                g.node.push(node(
                    "BatchNormalization",
                    &out,
                    &ins,
                    &[&out],
                    vec![attr_float("epsilon", BN_EPS)],
                ));
                x = out;
            }
            let out = format!("relu{k}");
            g.node.push(node("Relu", &out, &[&x], &[&out], vec![]));
            x = out;
        }
        let out = format!("pool{}", bi + 1);
        g.node.push(node(
            "MaxPool",
            &out,
            &[&x],
            &[&out],
            vec![
                attr_ints("kernel_shape", &[2, 2]),
                attr_ints("strides", &[2, 2]),
            ],
        ));
        x = out;
    }
    g.node.push(node(
        "Flatten",
        "flatten",
        &[&x],
        &["flat"],
        vec![attr_int("axis", 1)],
    ));
    x = "flat".into();
    let layers = m.net.fc_layers();
    for (i, l) in layers.iter().enumerate() {
        let n = i + 1;
        let bias = format!("fc{n}.bias");
        let (b, s) = p(&bias)?;
        g.initializer.push(tensor_f32(&bias, s, b));
        let trans = vec![attr_int("transB", 1)];
        let out = if l.low_rank.is_some() {
            let v = weight(&mut g, &format!("fc{n}.v.weight"))?;
            let u = weight(&mut g, &format!("fc{n}.u.weight"))?;
            let mid = format!("fc{n}_v");
            g.node
                .push(node("Gemm", &mid, &[&x, &v], &[&mid], trans.clone()));
            let out = format!("fc{n}");
            g.node
                .push(node("Gemm", &out, &[&mid, &u, &bias], &[&out], trans));
            out
        } else {
            let wn = weight(&mut g, &format!("fc{n}.weight"))?;
            let out = if i + 1 == layers.len() {
                "logits".to_string()
            } else {
                format!("fc{n}")
            };
            g.node
                .push(node("Gemm", &out, &[&x, &wn, &bias], &[&out], trans));
            out
        };
        x = out;
        if i + 1 < layers.len() {
            let out = format!("fc{n}_relu");
            g.node.push(node("Relu", &out, &[&x], &[&out], vec![]));
            x = out;
        } else if x != "logits" {
            g.node
                .push(node("Identity", "logits", &[&x], &["logits"], vec![]));
        }
    }
    g.output.push(value_info(
        "logits",
        FLOAT,
        &[Dim::Named("N".into()), Dim::Fixed(cfg.classes)],
    ));
    let mut model = shoal_onnx::model(g);
    model.doc_string = format!(
        "shoal CNN ({}). Input 'input': float32 [N, {c}, {h}, {w}], {INPUT_DOC}. \
         Output 'logits': float32 [N, {}], one unnormalized score per class (the argmax is \
         the prediction; softmax gives probabilities).",
        if int8 {
            "int8 weights, per output channel"
        } else {
            "float32 weights"
        },
        cfg.classes
    );
    model.metadata_props = vec![
        meta("input_range", "[0, 1]"),
        meta("input_layout", "NCHW"),
        meta("normalization_mean", &PIXEL_MEAN.to_string()),
        meta("normalization_std", &PIXEL_STD.to_string()),
        meta("output", "logits"),
        meta("classes", &cfg.classes.to_string()),
    ];
    Ok(model)
}

/// The exported graph's input, in words.
const INPUT_DOC: &str = "pixels scaled to [0, 1] (p / 255, as torchvision's ToTensor gives); \
     the graph standardizes them itself";
/// Names of the standardisation's constants in an exported graph.
const NORM_MEAN: &str = "pixel_mean";
const NORM_STD: &str = "pixel_std";

/// A layer read from the graph, in order.
enum Layer {
    Conv {
        w: Vec<f32>,
        shape: Vec<usize>,
        bias: Option<Vec<f32>>,
        bn: Option<[Vec<f32>; 4]>,
    },
    Pool,
    Fc {
        w: Vec<f32>,
        out: usize,
        inp: usize,
        bias: Option<Vec<f32>>,
        relu: bool,
    },
}

/// Reads an ONNX CNN (see the module docs) into a model.
pub fn import(path: &Path) -> Result<CnnModel> {
    let fail = |why: String| Error::Checkpoint {
        path: path.to_path_buf(),
        why,
    };
    let m = shoal_onnx::load(path).map_err(|e| fail(e.to_string()))?;
    let g = m.graph.expect("load checks the graph");
    // Constant tensors: initializers, and what DequantizeLinear makes of them.
    let mut consts: HashMap<String, (Vec<f32>, Vec<usize>)> = HashMap::new();
    for t in &g.initializer {
        let v = values_f32(t).map_err(fail)?;
        consts.insert(t.name.clone(), (v, dims(t)));
    }
    let get = |consts: &HashMap<String, (Vec<f32>, Vec<usize>)>, n: &str, node: &str| {
        consts.get(n).cloned().ok_or_else(|| {
            fail(format!(
                "node '{node}': input '{n}' is not a constant weight"
            ))
        })
    };
    let ints = |n: &shoal_onnx::NodeProto, a: &str| attr(n, a).map(|x| x.ints.clone());
    let mut layers: Vec<Layer> = Vec::new();
    let mut flattened = false;
    // A standardisation in front of the network: (mean, std).
    let mut norm: Option<(f32, f32)> = None;
    for n in &g.node {
        let who = if n.name.is_empty() {
            n.op_type.clone()
        } else {
            n.name.clone()
        };
        match n.op_type.as_str() {
            "DequantizeLinear" => {
                let (q, shape) = get(&consts, node_input(n, 0, &who).map_err(fail)?, &who)?;
                let (s, _) = get(&consts, n.input.get(1).map_or("", |s| s.as_str()), &who)?;
                let zp = match n.input.get(2) {
                    Some(z) if !z.is_empty() => get(&consts, z, &who)?.0,
                    _ => vec![0.0; s.len()],
                };
                let axis = attr(n, "axis").and_then(|a| a.i).unwrap_or(1);
                // Scales and zero points one per channel (or one in all), and as many
                // quantized values as the shape says, a whole number per channel.
                let elems = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                if s.is_empty()
                    || zp.len() != s.len()
                    || elems != Some(q.len())
                    || q.len() % s.len() != 0
                {
                    return Err(fail(format!(
                        "node '{who}': DequantizeLinear of {} values (shape {shape:?}) with {} scales and {} zero points",
                        q.len(),
                        s.len(),
                        zp.len()
                    )));
                }
                let v: Vec<f32> = if s.len() == 1 {
                    q.iter().map(|&x| (x - zp[0]) * s[0]).collect()
                } else if axis == 0 && shape.first() == Some(&s.len()) && !s.is_empty() {
                    let per = q.len() / s.len();
                    q.iter().enumerate().map(|(i, &x)| (x - zp[i / per]) * s[i / per]).collect()
                } else {
                    return Err(fail(format!("node '{who}': DequantizeLinear along axis {axis} is not supported")));
                };
                consts.insert(node_output(n, &who).map_err(fail)?.to_string(), (v, shape));
            }
            "Sub" | "Div" if layers.is_empty() && !flattened => {
                // x - mean, then / std, by scalar constants.
                let c = n
                    .input
                    .iter()
                    .skip(1)
                    .find_map(|i| consts.get(i))
                    .filter(|(v, _)| v.len() == 1)
                    .map(|(v, _)| v[0])
                    .ok_or_else(|| {
                        fail(format!(
                            "node '{who}' ({}): only a scalar constant second input is supported before the first convolution",
                            n.op_type
                        ))
                    })?;
                let (m, s) = norm.unwrap_or((0.0, 1.0));
                norm = Some(if n.op_type == "Sub" {
                    if s != 1.0 {
                        return Err(fail(format!("node '{who}': Sub after Div; shoal reads (x - mean) / std")));
                    }
                    (m + c, s)
                } else {
                    (m, s * c)
                });
            }
            "Conv" => {
                if flattened {
                    return Err(fail(format!("node '{who}': a convolution after the flattening")));
                }
                let (w, shape) = get(&consts, node_input(n, 1, &who).map_err(fail)?, &who)?;
                let ok = shape.len() == 4
                    && shape[2..] == [3, 3]
                    && ints(n, "pads").is_some_and(|p| p == [1, 1, 1, 1])
                    && ints(n, "strides").is_none_or(|s| s == [1, 1])
                    && ints(n, "dilations").is_none_or(|s| s == [1, 1])
                    && attr(n, "group").and_then(|a| a.i).is_none_or(|g| g == 1);
                if !ok {
                    return Err(fail(format!(
                        "node '{who}': only 3x3 convolutions with padding 1, stride 1, one group are supported (weight {shape:?})"
                    )));
                }
                let bias = match n.input.get(2) {
                    Some(b) if !b.is_empty() => Some(get(&consts, b, &who)?.0),
                    _ => None,
                };
                layers.push(Layer::Conv { w, shape, bias, bn: None });
            }
            "BatchNormalization" => {
                let Some(Layer::Conv { bn, bias, .. }) = layers.last_mut() else {
                    return Err(fail(format!("node '{who}': BatchNormalization not after a convolution")));
                };
                let mut parts = Vec::new();
                for i in 1..5 {
                    parts.push(get(&consts, node_input(n, i, &who).map_err(fail)?, &who)?.0);
                }
                let eps = attr(n, "epsilon").and_then(|a| a.f).unwrap_or(1e-5);
                // Another epsilon: the same normalisation through the variance.
                for v in parts[3].iter_mut() {
                    *v += eps - BN_EPS;
                }
                // A convolution bias before BN shifts the mean.
                if let Some(b) = bias.take() {
                    for (m, b) in parts[2].iter_mut().zip(b) {
                        *m -= b;
                    }
                }
                let [a, b, c, d]: [Vec<f32>; 4] = parts.try_into().map_err(|_| fail("bn".into()))?;
                *bn = Some([a, b, c, d]);
            }
            "MaxPool" => {
                let ok = ints(n, "kernel_shape").is_some_and(|k| k == [2, 2])
                    && ints(n, "strides").is_some_and(|s| s == [2, 2])
                    && ints(n, "pads").is_none_or(|p| p.iter().all(|&x| x == 0));
                if !ok {
                    return Err(fail(format!("node '{who}': only 2x2 max pooling with stride 2 is supported")));
                }
                layers.push(Layer::Pool);
            }
            "Relu" => {
                if let Some(Layer::Fc { relu, .. }) = layers.last_mut() {
                    *relu = true;
                }
            }
            "Flatten" | "Reshape" => flattened = true,
            "Dropout" | "Identity" => {}
            "Gemm" | "MatMul" => {
                let (w, shape) = get(&consts, node_input(n, 1, &who).map_err(fail)?, &who)?;
                if shape.len() != 2 {
                    return Err(fail(format!("node '{who}': weight of shape {shape:?}")));
                }
                let gemm = n.op_type == "Gemm";
                let trans_b = gemm && attr(n, "transB").and_then(|a| a.i) == Some(1);
                let unit = |a: &str| attr(n, a).and_then(|x| x.f).is_none_or(|v| v == 1.0);
                if gemm && (attr(n, "transA").and_then(|a| a.i).unwrap_or(0) != 0 || !unit("alpha") || !unit("beta")) {
                    return Err(fail(format!("node '{who}': Gemm with transA, alpha or beta is not supported")));
                }
                // Stored as [out, in].
                let (out, inp, w) = if trans_b {
                    (shape[0], shape[1], w)
                } else {
                    let (i, o) = (shape[0], shape[1]);
                    let mut t = vec![0.0; w.len()];
                    for r in 0..i {
                        for c in 0..o {
                            t[c * i + r] = w[r * o + c];
                        }
                    }
                    (o, i, t)
                };
                let bias = match n.input.get(2) {
                    Some(b) if gemm && !b.is_empty() => Some(get(&consts, b, &who)?.0),
                    _ => None,
                };
                layers.push(Layer::Fc { w, out, inp, bias, relu: false });
            }
            "Add" => {
                // MatMul + Add: the bias.
                let Some(Layer::Fc { bias: b @ None, out, .. }) = layers.last_mut() else {
                    return Err(fail(format!("node '{who}': Add not after a MatMul")));
                };
                let name = n.input.iter().find(|i| consts.contains_key(*i)).cloned().unwrap_or_default();
                let (v, _) = get(&consts, &name, &who)?;
                if v.len() != *out {
                    return Err(fail(format!("node '{who}': a bias of {} values for {out} outputs", v.len())));
                }
                *b = Some(v);
            }
            other => {
                return Err(fail(format!(
                    "unsupported ONNX operator {other} (node '{who}'); shoal imports Sub/Div (the input's standardisation), Conv, BatchNormalization, Relu, MaxPool, Flatten, Gemm/MatMul+Add, Dropout, DequantizeLinear"
                )))
            }
        }
    }
    if let Some((m, s)) = norm {
        if (m - PIXEL_MEAN).abs() > 1e-6 || (s - PIXEL_STD).abs() > 1e-6 {
            return Err(fail(format!(
                "the graph standardizes its input with mean {m}, std {s}; shoal's CNN takes pixels standardized with mean {PIXEL_MEAN}, std {PIXEL_STD} (export from the network itself, without the standardisation)"
            )));
        }
    }
    // The graph input's shape.
    let inp = g
        .input
        .iter()
        .find(|i| !consts.contains_key(&i.name))
        .ok_or_else(|| fail("the graph has no input".into()))?;
    let dims_of = |v: &shoal_onnx::ValueInfoProto| -> Option<Vec<i64>> {
        use shoal_onnx::proto::{tensor_shape_proto::dimension::Value, type_proto};
        let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref()?.value.as_ref() else {
            return None;
        };
        Some(
            t.shape
                .as_ref()?
                .dim
                .iter()
                .map(|d| match d.value {
                    Some(Value::DimValue(x)) => x,
                    _ => -1,
                })
                .collect(),
        )
    };
    let idims = dims_of(inp).unwrap_or_default();
    if idims.len() != 4 || idims[1..].iter().any(|&d| d <= 0) {
        return Err(fail(format!(
            "input '{}' has shape {idims:?}; expected [N, C, H, W]",
            inp.name
        )));
    }
    // The configuration, and the tensors by shoal's names.
    let mut blocks: Vec<Vec<usize>> = vec![Vec::new()];
    let mut fc: Vec<usize> = Vec::new();
    let mut fc_rank: Vec<usize> = Vec::new();
    let mut named: Vec<(String, Vec<f32>)> = Vec::new();
    let (mut k, mut bn_count, mut convs) = (0, 0, 0);
    let mut i = 0;
    while i < layers.len() {
        match &layers[i] {
            Layer::Conv { w, shape, bias, bn } => {
                k += 1;
                convs += 1;
                blocks.last_mut().expect("a block").push(shape[0]);
                named.push((format!("conv{k}.weight"), w.clone()));
                if let Some(b) = bias {
                    named.push((format!("conv{k}.bias"), b.clone()));
                }
                if let Some([gm, bt, mn, vr]) = bn {
                    bn_count += 1;
                    for (s, v) in ["weight", "bias", "running_mean", "running_var"]
                        .iter()
                        .zip([gm, bt, mn, vr])
                    {
                        named.push((format!("bn{k}.{s}"), v.clone()));
                    }
                } else if bias.is_none() {
                    named.push((format!("conv{k}.bias"), vec![0.0; shape[0]]));
                }
            }
            Layer::Pool => blocks.push(Vec::new()),
            Layer::Fc {
                w,
                out,
                inp: _,
                bias,
                relu,
            } => {
                let n = fc_rank.len() + 1;
                // Two products without a non-linearity between (the first without a
                // bias): one factorized layer.
                if let (
                    false,
                    None,
                    Some(Layer::Fc {
                        w: u,
                        out: o2,
                        inp: i2,
                        bias: b2,
                        relu: _,
                    }),
                ) = (*relu, bias, layers.get(i + 1))
                {
                    if i2 == out {
                        named.push((format!("fc{n}.v.weight"), w.clone()));
                        named.push((format!("fc{n}.u.weight"), u.clone()));
                        named.push((
                            format!("fc{n}.bias"),
                            b2.clone().unwrap_or_else(|| vec![0.0; *o2]),
                        ));
                        fc_rank.push(*out);
                        fc.push(*o2);
                        i += 2;
                        continue;
                    }
                }
                named.push((format!("fc{n}.weight"), w.clone()));
                named.push((
                    format!("fc{n}.bias"),
                    bias.clone().unwrap_or_else(|| vec![0.0; *out]),
                ));
                fc_rank.push(0);
                fc.push(*out);
            }
        }
        i += 1;
    }
    if blocks.last().is_some_and(|b| b.is_empty()) {
        blocks.pop();
    }
    if convs == 0
        || fc.is_empty()
        || blocks.iter().any(|b| b.is_empty())
        || !layers
            .iter()
            .rev()
            .take(1)
            .any(|l| matches!(l, Layer::Fc { .. }))
    {
        return Err(fail("not a CNN shoal takes: blocks of convolutions each closed by 2x2 max pooling, then fully-connected layers".into()));
    }
    if bn_count != 0 && bn_count != convs {
        return Err(fail(
            "BatchNormalization after some convolutions only".into(),
        ));
    }
    let classes = fc.pop().expect("an output layer");
    let model = CnnConfig {
        input: [idims[1] as usize, idims[2] as usize, idims[3] as usize],
        blocks,
        fc,
        classes,
        batch_norm: bn_count > 0,
        dropout: CnnConfig::default().dropout,
        fc_rank: if fc_rank.iter().any(|&r| r > 0) {
            fc_rank
        } else {
            Vec::new()
        },
    };
    Cnn::new(model.clone()).map_err(|e| fail(format!("the graph's network: {e}")))?;
    let cfg = CnnTrainConfig {
        model,
        ..Default::default()
    };
    CnnModel::assemble(cfg, |t| {
        named
            .iter()
            .find(|(n, _)| n == &t.name)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| fail(format!("no tensor for {}", t.name)))
    })
    .map_err(|e| match e {
        Error::Config(why) => fail(why),
        other => other,
    })
}
