//! Generates the gRPC service code from `proto/control.proto` (and the transport
//! benchmark's `proto/transfer.proto`), parsed by `protox` (a protobuf compiler in Rust:
//! no system protoc).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in ["control.proto", "transfer.proto"] {
        println!("cargo:rerun-if-changed=proto/{proto}");
        let fds = protox::compile([proto], ["proto"])?;
        tonic_prost_build::configure().compile_fds(fds)?;
    }
    Ok(())
}
