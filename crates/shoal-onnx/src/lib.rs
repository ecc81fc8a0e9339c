//! ONNX in and out, independent of the engine: the ONNX messages (generated from the
//! subset of `onnx.proto` shoal uses, with ONNX's field numbers), builders for tensors,
//! nodes and value types, whole-file save (atomic) and load, and readers that turn an
//! initializer into values whatever its storage (raw bytes or typed fields).

use prost::Message;
use std::path::{Path, PathBuf};

/// The generated ONNX messages.
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

pub use proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TypeProto, ValueInfoProto,
};

/// The opset shoal writes (DequantizeLinear with a per-axis scale needs 13).
pub const OPSET: i64 = 13;
/// ONNX IR version of opset 13 models.
pub const IR_VERSION: i64 = 7;

/// ONNX element types (`TensorProto.DataType`).
pub const FLOAT: i32 = 1;
pub const UINT8: i32 = 2;
pub const INT8: i32 = 3;
pub const INT32: i32 = 6;
pub const INT64: i32 = 7;

/// Everything that can go wrong reading or writing ONNX.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not a valid ONNX protobuf, or a model shoal cannot take, and why.
    #[error("{path}: {why}")]
    Model { path: PathBuf, why: String },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A float tensor (values stored as raw little-endian bytes).
pub fn tensor_f32(name: &str, dims: &[usize], v: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: FLOAT,
        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// An int8 tensor.
pub fn tensor_i8(name: &str, dims: &[usize], v: &[i8]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: INT8,
        raw_data: v.iter().map(|&x| x as u8).collect(),
        ..Default::default()
    }
}

/// An int64 tensor.
pub fn tensor_i64(name: &str, dims: &[usize], v: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: INT64,
        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// An attribute holding integers.
pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: v.to_vec(),
        r#type: proto::attribute_proto::AttributeType::Ints as i32,
        ..Default::default()
    }
}

/// An attribute holding one integer.
pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: Some(v),
        r#type: proto::attribute_proto::AttributeType::Int as i32,
        ..Default::default()
    }
}

/// An attribute holding one float.
pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f: Some(v),
        r#type: proto::attribute_proto::AttributeType::Float as i32,
        ..Default::default()
    }
}

/// A node `op(inputs) -> outputs`.
pub fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

/// A dimension: a fixed size, or a named symbolic one (e.g. the batch).
#[derive(Debug, Clone)]
pub enum Dim {
    Fixed(usize),
    Named(String),
}

/// A graph input or output of element type `elem` and shape `dims`.
pub fn value_info(name: &str, elem: i32, dims: &[Dim]) -> ValueInfoProto {
    use proto::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => Value::DimValue(*n as i64),
                Dim::Named(s) => Value::DimParam(s.clone()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(proto::type_proto::Value::TensorType(
                proto::type_proto::Tensor {
                    elem_type: elem,
                    shape: Some(proto::TensorShapeProto { dim }),
                },
            )),
        }),
        doc_string: String::new(),
    }
}

/// A model around `graph` at [`OPSET`].
pub fn model(graph: GraphProto) -> ModelProto {
    ModelProto {
        ir_version: IR_VERSION,
        producer_name: "shoal".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        ..Default::default()
    }
}

/// A `metadata_props` entry.
pub fn meta(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: key.into(),
        value: value.into(),
    }
}

/// The model's bytes.
pub fn to_bytes(m: &ModelProto) -> Vec<u8> {
    m.encode_to_vec()
}

/// Writes the model to `path` through a temporary file and a rename.
pub fn save(m: &ModelProto, path: &Path) -> Result<()> {
    use std::io::Write;
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    let tmp = path.with_extension("onnx.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&to_bytes(m))
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Reads an ONNX model; a file that is not one is an error naming it.
pub fn load(path: &Path) -> Result<ModelProto> {
    let b = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let m = ModelProto::decode(&b[..]).map_err(|e| Error::Model {
        path: path.to_path_buf(),
        why: format!("not a valid ONNX model ({e}); truncated or another format?"),
    })?;
    if m.graph.is_none() {
        return Err(Error::Model {
            path: path.to_path_buf(),
            why: "the model has no graph".into(),
        });
    }
    Ok(m)
}

/// A tensor's dimensions.
pub fn dims(t: &TensorProto) -> Vec<usize> {
    t.dims.iter().map(|&d| d.max(0) as usize).collect()
}

/// A tensor's values as f32 (float, or integer types converted), from raw bytes or the
/// typed fields; an unsupported type or a size that does not match its dimensions is
/// an error.
pub fn values_f32(t: &TensorProto) -> std::result::Result<Vec<f32>, String> {
    let n: usize = dims(t).iter().product();
    if t.data_location == 1 {
        return Err(format!(
            "tensor {}: external data files are not supported",
            t.name
        ));
    }
    let raw = &t.raw_data;
    let v: Vec<f32> = match t.data_type {
        FLOAT if !raw.is_empty() => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        FLOAT => t.float_data.clone(),
        INT8 if !raw.is_empty() => raw.iter().map(|&b| b as i8 as f32).collect(),
        UINT8 if !raw.is_empty() => raw.iter().map(|&b| b as f32).collect(),
        INT8 | UINT8 | INT32 => t.int32_data.iter().map(|&x| x as f32).collect(),
        INT64 if !raw.is_empty() => raw
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        INT64 => t.int64_data.iter().map(|&x| x as f32).collect(),
        other => {
            return Err(format!(
                "tensor {}: element type {other} is not supported",
                t.name
            ))
        }
    };
    if v.len() != n {
        return Err(format!(
            "tensor {}: {} values for dimensions {:?}",
            t.name,
            v.len(),
            t.dims
        ));
    }
    Ok(v)
}

/// The attribute `name` of a node, if present.
pub fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_round_trips_and_garbage_is_refused() {
        let g = GraphProto {
            node: vec![node("Relu", "r", &["x"], &["y"], vec![attr_int("axis", 0)])],
            initializer: vec![
                tensor_f32("w", &[2], &[1.5, -2.0]),
                tensor_i8("q", &[3], &[-1, 0, 127]),
            ],
            input: vec![value_info(
                "x",
                FLOAT,
                &[Dim::Named("N".into()), Dim::Fixed(2)],
            )],
            ..Default::default()
        };
        let m = model(g);
        let d = std::env::temp_dir().join(format!("shoal-onnx-{}.onnx", std::process::id()));
        save(&m, &d).unwrap();
        let back = load(&d).unwrap();
        assert_eq!(back, m);
        let g = back.graph.unwrap();
        assert_eq!(values_f32(&g.initializer[0]).unwrap(), vec![1.5, -2.0]);
        assert_eq!(
            values_f32(&g.initializer[1]).unwrap(),
            vec![-1.0, 0.0, 127.0]
        );
        // A zero-valued attribute is still present (ONNX readers check presence).
        assert_eq!(attr(&g.node[0], "axis").unwrap().i, Some(0));
        std::fs::write(&d, b"\xff\xff\xff garbage").unwrap();
        assert!(load(&d)
            .unwrap_err()
            .to_string()
            .contains("not a valid ONNX model"));
        let _ = std::fs::remove_file(&d);
    }
}
