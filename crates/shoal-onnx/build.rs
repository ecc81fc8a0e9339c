//! Generates the ONNX message types from `proto/onnx.proto` (the subset shoal uses, with
//! ONNX's field numbers); needs `protoc`, from Debian's `protobuf-compiler`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    prost_build::compile_protos(&["proto/onnx.proto"], &["proto"])?;
    Ok(())
}
