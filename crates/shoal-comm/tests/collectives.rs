//! Collectives checked against a sequential computation of the same inputs, for 2 to 8
//! ranks, sizes from 1 element to 16 MB (and not divisible by the rank count), over the
//! in-process and the TCP transports; and the TCP transport's refusals.

use shoal_comm::local::LocalTransport;
use shoal_comm::tcp::{TcpOptions, TcpTransport};
use shoal_comm::{Communicator, Transport};
use std::net::{SocketAddr, TcpListener};

/// Rank r's input: small integers (exactly representable, so sums are exact).
fn input(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13) % 101) as f32 - 50.0)
        .collect()
}

fn expected_sum(n: usize, len: usize) -> Vec<f32> {
    let mut s = vec![0.0f32; len];
    for r in 0..n {
        for (a, b) in s.iter_mut().zip(input(r, len)) {
            *a += b;
        }
    }
    s
}

/// Runs `body` on `n` ranks (threads), each with its own transport.
fn run<T: Transport + 'static>(
    transports: Vec<T>,
    body: impl Fn(&mut Communicator<T>) + Send + Sync + Copy + 'static,
) {
    let handles: Vec<_> = transports
        .into_iter()
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Communicator::with_piece_bytes(t, 4096);
                body(&mut c);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a rank panicked");
    }
}

fn tcp_group(n: usize, token: &str) -> Vec<TcpTransport> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let addrs = addrs.clone();
            let opts = TcpOptions {
                token: token.into(),
                ..Default::default()
            };
            std::thread::spawn(move || TcpTransport::connect(r, &addrs, l, &opts).unwrap())
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn check_all_collectives<T: Transport + 'static>(make: impl Fn(usize) -> Vec<T>) {
    for n in 2..=8 {
        for len in [1usize, 2, 7, 1000, 4099, 65_537] {
            run(make(n), move |c| {
                let n = c.size();
                let mut d = input(c.rank(), len);
                c.allreduce_sum(&mut d).unwrap();
                assert_eq!(d, expected_sum(n, len), "allreduce n={n} len={len}");
                // allgather of each rank's first 3 values
                let mine: Vec<f32> = input(c.rank(), 3);
                let mut all = vec![0.0; 3 * n];
                c.allgather(&mine, &mut all).unwrap();
                let want: Vec<f32> = (0..n).flat_map(|r| input(r, 3)).collect();
                assert_eq!(all, want);
                // broadcast from the last rank
                let mut b = if c.rank() == n - 1 {
                    input(99, len)
                } else {
                    vec![0.0; len]
                };
                c.broadcast(&mut b, n - 1).unwrap();
                assert_eq!(b, input(99, len));
                c.barrier().unwrap();
            });
        }
    }
}

#[test]
fn collectives_match_sequential_in_process() {
    check_all_collectives(LocalTransport::group);
}

#[test]
fn collectives_match_sequential_over_tcp() {
    check_all_collectives(|n| tcp_group(n, "job-1"));
}

#[test]
fn large_allreduce_over_tcp_with_rounding() {
    // 16 MB of non-integer values: equal to the sequential sum within rounding.
    let len = 4 << 20;
    run(tcp_group(3, "t"), move |c| {
        let mine: Vec<f32> = (0..len)
            .map(|i| ((i + c.rank() * 31) as f32 * 0.001).sin())
            .collect();
        let mut d = mine.clone();
        c.allreduce_sum(&mut d).unwrap();
        for i in (0..len).step_by(9973) {
            let want: f32 = (0..3).map(|r| ((i + r * 31) as f32 * 0.001).sin()).sum();
            assert!((d[i] - want).abs() < 1e-5, "[{i}] {} vs {want}", d[i]);
        }
    });
}

#[test]
fn wrong_token_is_refused_and_garbage_is_rejected() {
    use std::io::Write;
    // A peer with the wrong token is refused; the group still forms with the right one.
    let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
    let a0 = addrs.clone();
    let r0 = std::thread::spawn(move || {
        TcpTransport::connect(
            0,
            &a0,
            l0,
            &TcpOptions {
                token: "secret".into(),
                ..Default::default()
            },
        )
    });
    // An intruder: wrong token.
    let a1 = addrs.clone();
    let bad = std::thread::spawn(move || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        TcpTransport::connect(
            1,
            &a1,
            l,
            &TcpOptions {
                token: "guess".into(),
                ..Default::default()
            },
        )
    });
    let _ = bad.join();
    // Garbage bytes instead of a hello.
    let mut g = std::net::TcpStream::connect(addrs[0]).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\n\r\n....").unwrap();
    drop(g);
    let mut t1 = TcpTransport::connect(
        1,
        &addrs,
        l1,
        &TcpOptions {
            token: "secret".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let mut t0 = r0.join().unwrap().unwrap();
    t1.send(0, 5, b"hello").unwrap();
    let mut buf = [0u8; 5];
    t0.recv(1, 5, &mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    // A message with another tag or size is an error naming the peer.
    t1.send(0, 6, b"hi").unwrap();
    let e = t0.recv(1, 5, &mut buf).unwrap_err().to_string();
    assert!(e.contains("rank 1"), "{e}");
    // A dead peer: the next receive fails instead of hanging.
    drop(t1);
    let e = t0.recv(1, 7, &mut buf).unwrap_err().to_string();
    assert!(e.contains("rank 1"), "{e}");
}
