//! Control-plane requests as the coordinator's gRPC service decodes them (protobuf):
//! a message or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;
use shoal_control::proto;

fuzz_target!(|data: &[u8]| {
    let _ = proto::RegisterRequest::decode(data);
    let _ = proto::BarrierRequest::decode(data);
    let _ = proto::HeartbeatRequest::decode(data);
    let _ = proto::LeaveRequest::decode(data);
    let _ = proto::RegisterReply::decode(data);
    let _ = proto::HeartbeatReply::decode(data);
});
