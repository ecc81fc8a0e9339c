//! Generates the ONNX message types from `proto/onnx.proto` (the subset shoal uses, with
//! ONNX's field numbers), parsed by `protox` (a protobuf compiler in Rust: no system protoc).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let fds = protox::compile(["onnx.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
