//! Inputs shared by the collectives tests (small integers, so sums are exact), and the
//! rule for a capability the machine lacks: a failure under CI, a printed notice
//! elsewhere.

/// Rank r's input: small integers (exactly representable, so sums are exact).
pub fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13) % 101) as f32 - 50.0)
        .collect()
}

/// The sum over `n` ranks of their inputs.
pub fn expected_sum(n: usize, len: usize) -> Vec<f32> {
    let mut s = vec![0.0f32; len];
    for r in 0..n {
        for (a, b) in s.iter_mut().zip(input(r, len)) {
            *a += b;
        }
    }
    s
}

/// Whether this is a CI run: `CI` set to anything but empty, `false` or `0`.
#[allow(dead_code)] // not every test file that includes this module needs it
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// `available`, for the checks that need `what`: where it is missing, a CI run fails
/// naming it (a missing capability is a failure there, not a pass), and any other run
/// prints a notice that those checks did not run.
#[allow(dead_code)] // not every test file that includes this module needs it
pub fn require(available: bool, what: &str) -> bool {
    if !available {
        assert!(!in_ci(), "{what} is not available, and CI requires it");
        eprintln!("NOTICE: {what} is not available here; the checks that need it did not run");
    }
    available
}

/// `n` ranks connected over loopback TCP with `opts` (each rank connects on a thread).
#[allow(dead_code)] // not every test file that includes this module needs it
pub fn tcp_group(
    n: usize,
    opts: &shoal_comm::tcp::TcpOptions,
) -> Vec<shoal_comm::tcp::TcpTransport> {
    use std::net::{SocketAddr, TcpListener};
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let (addrs, opts) = (addrs.clone(), opts.clone());
            std::thread::spawn(move || {
                shoal_comm::tcp::TcpTransport::connect(r, &addrs, l, &opts).unwrap()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}
