//! The coordinator with real clients on loopback: rendezvous gives every process the
//! same member table and distinct ranks; barriers; an orderly leave is not a failure; a
//! wrong token is refused; a member that stops heartbeating is reported to the others
//! and fails the barriers they wait on; too few members is a timeout, not a hang.
//!
//! Nothing here is timed: the tests wait for the event (a reported failure, a call's
//! answer), with a bound far beyond any real wait that only keeps a broken coordinator
//! from hanging the test. The heartbeat timeout (3 s, heartbeats every 750 ms) is one a
//! loaded machine cannot trip for a live member.

use shoal_control::proto::coordinator_client::CoordinatorClient;
use shoal_control::proto::HeartbeatRequest;
use shoal_control::{ControlClient, Coordinator, CoordinatorConfig};
use std::time::{Duration, Instant};

/// The heartbeat timeout of every job here.
const HEARTBEAT_MS: u64 = 3000;

/// How long a wait may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(120);

fn coordinator(world: u32, rendezvous_s: u64) -> Coordinator {
    Coordinator::start(
        "127.0.0.1:0".parse().unwrap(),
        CoordinatorConfig {
            token: "job-token".into(),
            world,
            heartbeat_timeout: Duration::from_millis(HEARTBEAT_MS),
            rendezvous_timeout: Duration::from_secs(rendezvous_s),
            tls: None,
        },
    )
    .unwrap()
}

fn join(url: &str, n: usize) -> Vec<(ControlClient, shoal_control::Registration)> {
    let hs: Vec<_> = (0..n)
        .map(|i| {
            let url = url.to_string();
            std::thread::spawn(move || {
                let role = if i == 0 { "ps" } else { "worker" };
                ControlClient::register(
                    &url,
                    "job-token",
                    role,
                    "localhost",
                    &format!("127.0.0.1:{}", 7000 + i),
                )
                .unwrap()
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Polls `ready` until it gives a value; fails naming `what` if that takes longer than
/// [`HANG`] (a hang guard, not a measure of speed).
fn wait_for<T>(what: &str, mut ready: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = ready() {
            return v;
        }
        assert!(start.elapsed() < HANG, "hung waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One heartbeat for `rank`, sent by hand (as its client would), answered before this
/// returns.
fn heartbeat(url: &str, rank: u32) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = CoordinatorClient::connect(url.to_string()).await.unwrap();
        let reply = c
            .heartbeat(HeartbeatRequest {
                token: "job-token".into(),
                rank,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(reply.failed.is_empty(), "{:?}", reply.failed);
    });
}

/// Rendezvous, a barrier, and leaves that are not failures: three members leave, then
/// a fourth (the witness) heartbeats once more and goes silent. When the coordinator
/// declares the witness failed, every leaver had been silent longer than it, so a leave
/// mistaken for silence would be declared in the same sweep or before: the witness must
/// be the only failure.
#[test]
fn rendezvous_barrier_and_leave() {
    let c = coordinator(4, 10);
    let url = format!("http://{}", c.addr);
    let mut joined = join(&url, 4);
    let mut ranks: Vec<u32> = joined.iter().map(|(_, r)| r.rank).collect();
    ranks.sort();
    assert_eq!(ranks, vec![0, 1, 2, 3]);
    for (_, r) in &joined {
        assert_eq!(r.members, joined[0].1.members);
        assert_eq!(r.members.len(), 4);
    }
    let (mut witness, w) = joined.pop().unwrap();
    let hs: Vec<_> = joined
        .drain(..)
        .map(|(mut cl, _)| {
            std::thread::spawn(move || {
                cl.barrier("epoch-1").unwrap();
                cl.check().unwrap();
                cl.leave().unwrap();
            })
        })
        .collect();
    witness.barrier("epoch-1").unwrap();
    witness.check().unwrap();
    // Every leave answered: the coordinator has recorded it.
    for h in hs {
        h.join().unwrap();
    }
    witness.abandon();
    heartbeat(&url, w.rank);
    let failed = wait_for("the silent witness to be declared failed", || {
        let f = c.failures();
        (!f.is_empty()).then_some(f)
    });
    assert_eq!(
        failed.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
        vec![w.rank],
        "an orderly leave is not a failure: {failed:?}"
    );
    assert!(failed[0].1.contains("no heartbeat"), "{failed:?}");
}

#[test]
fn wrong_token_is_refused() {
    let c = coordinator(1, 2);
    let e = ControlClient::register(&format!("http://{}", c.addr), "guess", "worker", "h", "a")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("token"), "{e}");
}

/// A member that stops heartbeating is reported to a live one (as the member's failure,
/// for want of heartbeats), is the only member declared failed, and fails a barrier
/// instead of leaving it hanging.
#[test]
fn silent_member_is_reported() {
    let c = coordinator(3, 10);
    let url = format!("http://{}", c.addr);
    let mut joined = join(&url, 3);
    let (dead, reg) = joined.pop().unwrap();
    let dead_rank = reg.rank;
    dead.abandon();
    let (mut a, _) = joined.pop().unwrap();
    let msg = wait_for("the silent member to be reported", || {
        a.check().err().map(|e| e.to_string())
    });
    assert!(msg.contains(&format!("rank {dead_rank}")), "{msg}");
    assert!(msg.contains("no heartbeat"), "{msg}");
    let failed: Vec<u32> = c.failures().iter().map(|(r, _)| *r).collect();
    assert_eq!(failed, vec![dead_rank], "a live member was declared failed");
    // A barrier the dead member will never reach fails instead of hanging.
    let e = a.barrier("never").unwrap_err().to_string();
    assert!(e.contains(&format!("rank {dead_rank}")), "{e}");
}

/// Registering into a job that never assembles ends in the rendezvous timeout's error
/// (the call is awaited in a thread so that a hang fails the test instead).
#[test]
fn incomplete_job_times_out() {
    let c = coordinator(2, 1);
    let url = format!("http://{}", c.addr);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = ControlClient::register(&url, "job-token", "worker", "h", "a");
        let _ = tx.send(r.err().map(|e| e.to_string()));
    });
    let e = rx
        .recv_timeout(HANG)
        .expect("registration hung")
        .expect("registered into a job of 2 alone");
    assert!(e.contains("rendezvous") && e.contains("1 of 2"), "{e}");
    assert!(e.contains("DeadlineExceeded"), "{e}");
}

/// An empty job token is refused on both sides: a coordinator does not start with one,
/// and a client does not present one.
#[test]
fn empty_job_tokens_are_refused() {
    let e = Coordinator::start(
        "127.0.0.1:0".parse().unwrap(),
        CoordinatorConfig {
            token: String::new(),
            world: 1,
            heartbeat_timeout: Duration::from_secs(3),
            rendezvous_timeout: Duration::from_secs(3),
            tls: None,
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("token"), "{e}");
    let c = coordinator(1, 3);
    let e = ControlClient::connect(&format!("http://{}", c.addr), "", Duration::ZERO, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("token"), "{e}");
}

/// More connections that say nothing than the port holds at once, and one that sends
/// garbage: the members still join (the strangers' deadlines free the places), and the
/// coordinator closes every silent one instead of keeping it.
#[test]
fn silent_and_garbage_connections_are_dropped_and_members_still_join() {
    use std::io::{Read, Write};
    let c = coordinator(2, 120);
    let url = format!("http://{}", c.addr);
    let silent: Vec<std::net::TcpStream> = (0..shoal_control::gate::MAX_STRANGERS + 8)
        .map(|_| std::net::TcpStream::connect(c.addr).unwrap())
        .collect();
    let mut garbage = std::net::TcpStream::connect(c.addr).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let members = join(&url, 2);
    assert_eq!(members.len(), 2);
    for (i, mut s) in silent.into_iter().enumerate() {
        s.set_read_timeout(Some(HANG)).unwrap();
        let mut b = [0u8; 16];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("silent connection {i} was not closed: {other:?}"),
        }
    }
    for (cl, _) in members {
        cl.leave().unwrap();
    }
    c.wait_finished().unwrap();
}
