//! The coordinator with real clients on loopback: rendezvous gives every process the
//! same member table and distinct ranks; barriers; a wrong token is refused; a member
//! that stops heartbeating is reported to the others within the timeout and fails the
//! barriers they wait on; too few members is a timeout, not a hang.

use shoal_control::{ControlClient, Coordinator, CoordinatorConfig};
use std::time::{Duration, Instant};

fn coordinator(world: u32, hb_ms: u64, rendezvous_s: u64) -> Coordinator {
    Coordinator::start(
        "127.0.0.1:0".parse().unwrap(),
        CoordinatorConfig {
            token: "job-token".into(),
            world,
            heartbeat_timeout: Duration::from_millis(hb_ms),
            rendezvous_timeout: Duration::from_secs(rendezvous_s),
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

#[test]
fn rendezvous_barrier_and_leave() {
    let c = coordinator(3, 2000, 10);
    let url = format!("http://{}", c.addr);
    let mut joined = join(&url, 3);
    let mut ranks: Vec<u32> = joined.iter().map(|(_, r)| r.rank).collect();
    ranks.sort();
    assert_eq!(ranks, vec![0, 1, 2]);
    for (_, r) in &joined {
        assert_eq!(r.members, joined[0].1.members);
        assert_eq!(r.members.len(), 3);
    }
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
    for h in hs {
        h.join().unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(c.failures().is_empty(), "an orderly leave is not a failure");
}

#[test]
fn wrong_token_is_refused() {
    let c = coordinator(1, 2000, 2);
    let e = ControlClient::register(&format!("http://{}", c.addr), "guess", "worker", "h", "a")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("token"), "{e}");
}

#[test]
fn silent_member_is_reported_within_the_timeout() {
    let c = coordinator(3, 400, 10);
    let url = format!("http://{}", c.addr);
    let mut joined = join(&url, 3);
    let (dead, reg) = joined.pop().unwrap();
    let dead_rank = reg.rank;
    dead.abandon();
    let start = Instant::now();
    let (mut a, _) = joined.pop().unwrap();
    loop {
        if let Err(e) = a.check() {
            let msg = e.to_string();
            assert!(msg.contains(&format!("rank {dead_rank}")), "{msg}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "failure not reported"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A barrier the dead member will never reach fails instead of hanging.
    let e = a.barrier("never").unwrap_err().to_string();
    assert!(e.contains(&format!("rank {dead_rank}")), "{e}");
}

#[test]
fn incomplete_job_times_out() {
    let c = coordinator(2, 2000, 1);
    let t = Instant::now();
    let e = ControlClient::register(
        &format!("http://{}", c.addr),
        "job-token",
        "worker",
        "h",
        "a",
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("1 of 2"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));
}
