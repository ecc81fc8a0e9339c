//! Generates the gRPC service code from `proto/control.proto` (and the transport
//! benchmark's `proto/transfer.proto`); needs `protoc`, from Debian's `protobuf-compiler`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::compile_protos("proto/control.proto")?;
    tonic_prost_build::compile_protos("proto/transfer.proto")?;
    Ok(())
}
