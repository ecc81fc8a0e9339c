//! A parameter-server shard fed arbitrary requests by a worker that said a valid
//! hello (over an in-process link): every request is served, refused or fails the
//! shard with an error; the shard never panics and always ends.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shoal_comm::local::LocalTransport;
use shoal_comm::ps::{LinkOpener, PsServer, ShardConfig, ShardPlane};
use shoal_comm::Transport;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    let cfg = ShardConfig {
        workers: 1,
        sparse_dim: 2,
        token: "t".into(),
        timeout: Duration::from_millis(2),
        ..Default::default()
    };
    let mut pair = LocalTransport::group(2).into_iter();
    let (shard_end, mut worker) = (pair.next().unwrap(), pair.next().unwrap());
    let opener: LinkOpener = Box::new(move || Ok(Box::new(shard_end) as Box<dyn Transport>));
    let server = PsServer::start_on(ShardPlane::Links(vec![opener]), 6, cfg).unwrap();
    // The hello (operation 1: worker 0 and the token), then the input as requests:
    // [operation u8][length u16][payload]...
    let _ = worker.send_parts(0, 1, &[&0u64.to_le_bytes(), b"t"]);
    let mut rest = data;
    while rest.len() >= 3 {
        let op = u32::from(rest[0] % 13);
        let len = u16::from_le_bytes([rest[1], rest[2]]) as usize;
        rest = &rest[3..];
        let n = len.min(rest.len());
        if worker.send(0, op, &rest[..n]).is_err() {
            break;
        }
        rest = &rest[n..];
    }
    drop(worker);
    let _ = server.join();
});
