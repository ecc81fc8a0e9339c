//! Collectives checked against a sequential computation of the same inputs, for 2 to 8
//! ranks, sizes from 1 element to 64 MB (and not divisible by the rank count), over the
//! in-process, TCP and shared-memory transports (ranks as threads and as processes, the
//! single-copy path on, where it must work, and switched off); and the TCP transport's
//! refusals. A capability this machine lacks is a failure under CI, a notice elsewhere.

mod common;

use common::{expected_sum, input, require};
use shoal_comm::local::LocalTransport;
use shoal_comm::shm::ShmTransport;
use shoal_comm::tcp::{TcpOptions, TcpTransport};
use shoal_comm::{Communicator, Transport};
use std::net::TcpListener;
use std::time::Duration;

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
    common::tcp_group(
        n,
        &TcpOptions {
            token: token.into(),
            ..Default::default()
        },
    )
}

fn check_all_collectives<T: Transport + 'static>(make: impl Fn(usize) -> Vec<T>) {
    for n in 2..=8 {
        for len in [1usize, 2, 7, 1000, 4099, 65_537] {
            run(make(n), move |c| {
                let n = c.size();
                let mut d = input(c.rank(), len);
                c.allreduce_sum(&mut d).unwrap();
                assert_eq!(d, expected_sum(n, len), "allreduce n={n} len={len}");
                // Both algorithms explicitly, where they apply.
                let mut d = input(c.rank(), len);
                c.allreduce_ring(&mut d).unwrap();
                assert_eq!(d, expected_sum(n, len), "ring n={n} len={len}");
                if len <= 1000 {
                    let mut d = input(c.rank(), len);
                    c.allreduce_doubling(&mut d).unwrap();
                    assert_eq!(d, expected_sum(n, len), "doubling n={n} len={len}");
                }
                // A fusion buffer of three gradients, averaged.
                let mut f = shoal_comm::FusionBuffer::new(&[3, 0, 5]);
                f.slot_mut(0).copy_from_slice(&input(c.rank(), 3));
                f.slot_mut(2).copy_from_slice(&input(c.rank() + 1, 5));
                f.allreduce(c, true).unwrap();
                let k = 1.0 / n as f32;
                let want0: Vec<f32> = expected_sum(n, 3).iter().map(|x| x * k).collect();
                assert_eq!(f.slot(0), &want0[..]);
                assert!(f.slot(1).is_empty());
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

fn shm_group_with(n: usize, job: &str, single_copy: bool) -> Vec<ShmTransport> {
    let handles: Vec<_> = (0..n)
        .map(|r| {
            let job = job.to_string();
            std::thread::spawn(move || {
                let t = Duration::from_secs(10);
                ShmTransport::connect_with(&job, r, n, 1 << 20, t, single_copy).unwrap()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn shm_group(n: usize, job: &str) -> Vec<ShmTransport> {
    shm_group_with(n, job, true)
}

fn unique_job(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{name}-{}-{nanos}", std::process::id())
}

#[test]
fn collectives_match_sequential_over_shared_memory() {
    let job = unique_job("test-shm");
    let counter = std::sync::atomic::AtomicUsize::new(0);
    check_all_collectives(|n| {
        let k = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        shm_group(n, &format!("{job}-{k}"))
    });
}

/// With the single-copy path turned off, large allreduces go through the rings.
#[test]
fn collectives_match_sequential_over_shared_memory_rings_only() {
    let job = unique_job("test-shm-rings");
    let counter = std::sync::atomic::AtomicUsize::new(0);
    check_all_collectives(|n| {
        let k = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let g = shm_group_with(n, &format!("{job}-{k}"), false);
        assert!(g.iter().all(|t| !t.single_copy()));
        g
    });
}

/// The single-copy allreduce: on by agreement (off everywhere if one rank refuses), the
/// same bits on every rank for non-integer values, sums within rounding of a sequential
/// f64 sum, and a length mismatch an error on every rank rather than a hang.
#[test]
fn single_copy_allreduce_agrees_and_checks_lengths() {
    let job = unique_job("test-shm-cma");
    let g = shm_group(3, &format!("{job}-a"));
    // A kernel or sandbox without process_vm_readv between these threads: the ring path
    // is what runs (the rings-only tests check it); under CI that is a failure.
    if !require(
        g[0].single_copy(),
        "the single-copy path (process_vm_readv between threads)",
    ) {
        return;
    }
    assert!(g.iter().all(|t| t.single_copy()));
    // One rank refusing turns it off for all.
    let handles: Vec<_> = (0..3)
        .map(|r| {
            let job = format!("{job}-b");
            std::thread::spawn(move || {
                let t = Duration::from_secs(10);
                ShmTransport::connect_with(&job, r, 3, 1 << 20, t, r != 1).unwrap()
            })
        })
        .collect();
    for h in handles {
        assert!(!h.join().unwrap().single_copy());
    }
    let len = 200_003;
    let value = |r: usize, i: usize| ((i * 7 + r * 13) as f32 * 0.011).sin() / 7.0;
    let results = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let handles: Vec<_> = g
        .into_iter()
        .map(|t| {
            let results = results.clone();
            std::thread::spawn(move || {
                let mut c = Communicator::new(t);
                let r = c.rank();
                let mut d: Vec<f32> = (0..len).map(|i| value(r, i)).collect();
                c.allreduce_sum(&mut d).unwrap();
                // Ranks disagreeing on the length fail, naming the other length.
                let mut bad = vec![1.0f32; 100_000 + 1000 * r];
                let e = c.allreduce_sum(&mut bad).unwrap_err().to_string();
                assert!(e.contains("passed"), "{e}");
                results.lock().unwrap().push(d);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a rank panicked");
    }
    let results = results.lock().unwrap();
    for d in results.iter() {
        assert_eq!(
            d.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            results[0].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
    for (i, x) in results[0].iter().enumerate() {
        let want: f64 = (0..3).map(|r| value(r, i) as f64).sum();
        assert!((*x as f64 - want).abs() < 1e-6, "value {i}: {x} vs {want}");
    }
}

/// The environment variable that makes a re-run of this test binary one rank of a
/// cross-process test (`job rank size [mode]`) instead of its parent.
const CHILD_ENV: &str = "SHOAL_SHM_CHILD";

/// The child's part, when this process is one rank of a cross-process test.
fn child_spec() -> Option<String> {
    std::env::var(CHILD_ENV).ok()
}

/// Starts this test binary again, filtered to `test` (the caller), as one rank (`spec`:
/// job, rank, size and an optional mode), with `single_copy` as its
/// `SHOAL_SHM_SINGLE_COPY` (`None`: unset).
fn spawn_child(test: &str, spec: String, single_copy: Option<&str>) -> std::process::Child {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, spec)
        .env_remove("SHOAL_SHM_SINGLE_COPY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(v) = single_copy {
        c.env("SHOAL_SHM_SINGLE_COPY", v);
    }
    c.spawn().unwrap()
}

/// A child's exit status and everything it printed. Waits for its exit; the bound (far
/// longer than any child takes) only keeps a broken child from hanging the test: one
/// still running then is killed and the test fails.
fn finish(c: std::process::Child) -> (bool, String) {
    let pid = c.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(c.wait_with_output().unwrap());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(300))
        .unwrap_or_else(|_| {
            // SAFETY: signalling our own child, which has not been reaped (its waiter is
            // still blocked), so the pid is still its own.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("child {pid} still running after 300 s: hung; killed")
        });
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Runs `n` ranks as child processes of `test`, each with `single_copy` as its
/// `SHOAL_SHM_SINGLE_COPY`; checks that every one ran its rank and returns whether each
/// reported the single-copy path on.
fn run_children(test: &str, n: usize, single_copy: Option<&str>) -> Vec<bool> {
    let job = unique_job("test-shm-proc");
    let children: Vec<_> = (0..n)
        .map(|r| spawn_child(test, format!("{job} {r} {n}"), single_copy))
        .collect();
    children
        .into_iter()
        .enumerate()
        .map(|(r, c)| {
            let (ok, text) = finish(c);
            assert!(ok, "rank {r} failed: {text}");
            // (The test harness prints the test's name on the same line, before it.)
            let said = text
                .split_once(&format!("SHM-CHILD-OK rank {r} "))
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("rank {r} did not run its rank: {text}"));
            match said {
                "single_copy=true" => true,
                "single_copy=false" => false,
                _ => panic!("rank {r} did not say whether it read its peers directly: {text}"),
            }
        })
        .collect()
}

/// Ranks in separate processes (this test binary re-run as children, each running this
/// test's child branch) reduce 1.2 MB over shared memory to the sequential sum: by
/// default through the single-copy path, which every rank must report on (where the
/// kernel forbids it the rings run instead, a failure under CI); with
/// `SHOAL_SHM_SINGLE_COPY=0` through the rings, which every rank must report.
#[test]
fn shared_memory_allreduce_across_processes() {
    const NAME: &str = "shared_memory_allreduce_across_processes";
    if let Some(spec) = child_spec() {
        return shm_child_rank(&spec);
    }
    let n = 3;
    let on = run_children(NAME, n, None);
    // The ranks agree: all on or all off.
    assert!(on.iter().all(|&x| x == on[0]), "ranks disagree: {on:?}");
    require(
        on[0],
        "the single-copy path (process_vm_readv between processes)",
    );
    // The fallback, switched off in every child: the same sum through the rings.
    let off = run_children(NAME, n, Some("0"));
    assert_eq!(off, vec![false; n], "SHOAL_SHM_SINGLE_COPY=0 left it on");
}

/// A child that dies is reported to the rank waiting on it: the waiter's timeout (an
/// hour) is far beyond the parent's bound on a child's life, so an error that arrives at
/// all comes from noticing the death, not from timing out.
#[test]
fn shared_memory_reports_a_dead_process() {
    const NAME: &str = "shared_memory_reports_a_dead_process";
    if let Some(spec) = child_spec() {
        return shm_child_rank(&spec);
    }
    let job = unique_job("test-shm-dead");
    let waiter = spawn_child(NAME, format!("{job} 0 2 expect-dead"), None);
    let dier = spawn_child(NAME, format!("{job} 1 2 die"), None);
    // Reap the dead child first (a zombie still counts as alive).
    assert!(finish(dier).0);
    let (ok, text) = finish(waiter);
    assert!(
        ok && text.contains("SHM-CHILD-OK dead peer reported"),
        "{text}"
    );
}

/// Ring files are made exclusively: one left by a process that died (killed before its
/// peer came) is replaced and the group forms; one of a live process is refused (two
/// groups with one name); a symbolic link planted at a ring's path is not followed (its
/// target is untouched).
#[test]
fn stale_rings_are_replaced_live_ones_refused_links_not_followed() {
    const NAME: &str = "stale_rings_are_replaced_live_ones_refused_links_not_followed";
    if let Some(spec) = child_spec() {
        return shm_child_rank(&spec);
    }
    let job = unique_job("test-shm-stale");
    let ring = shoal_comm::shm::ring_path(&job, 1, 0);
    let holder = spawn_child(NAME, format!("{job} 1 2 hold"), None);
    let t = std::time::Instant::now();
    while !std::path::Path::new(&ring).exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the child made no ring"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let Err(e) = ShmTransport::connect(&job, 1, 2, 1 << 16, Duration::from_secs(1)) else {
        panic!("a second rank 1 joined while the first lives")
    };
    let e = e.to_string();
    assert!(e.contains("alive"), "{e}");
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(holder.id() as libc::pid_t, libc::SIGKILL) };
    let _ = finish(holder);
    assert!(
        std::path::Path::new(&ring).exists(),
        "the dead child's ring is there"
    );
    check_group(shm_group(2, &job));
    // A link at the path of a ring: removed and replaced, its target never written.
    let job = unique_job("test-shm-link");
    let target = std::env::temp_dir().join(format!("{job}-target"));
    std::fs::write(&target, b"keep").unwrap();
    std::os::unix::fs::symlink(&target, shoal_comm::shm::ring_path(&job, 0, 1)).unwrap();
    check_group(shm_group(2, &job));
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    let _ = std::fs::remove_file(&target);
}

/// A group of transports sums correctly (one allreduce, checked against the sequential
/// sum).
fn check_group(group: Vec<ShmTransport>) {
    let n = group.len();
    run(group, move |c| {
        let mut d = input(c.rank(), 1000);
        c.allreduce_sum(&mut d).unwrap();
        assert_eq!(d, expected_sum(n, 1000));
    });
}

/// One rank of a cross-process test (`spec`: job, rank, size and an optional mode).
fn shm_child_rank(spec: &str) {
    let parts: Vec<&str> = spec.split(' ').collect();
    let (job, r, n): (&str, usize, usize) = (
        parts[0],
        parts[1].parse().unwrap(),
        parts[2].parse().unwrap(),
    );
    match parts.get(3).copied() {
        // Makes its rings and waits for its peers (until the parent kills it).
        Some("hold") => {
            let _ = ShmTransport::connect(job, r, n, 1 << 16, Duration::from_secs(60));
            std::process::exit(0)
        }
        // Joins, then dies without a word.
        Some("die") => {
            let _t = ShmTransport::connect(job, r, n, 1 << 16, Duration::from_secs(20)).unwrap();
            std::process::exit(0)
        }
        // Waits on a peer that dies: must fail naming it. The timeout is an hour, so
        // the error can only come from noticing the death.
        Some("expect-dead") => {
            let t = ShmTransport::connect(job, r, n, 1 << 16, Duration::from_secs(3600)).unwrap();
            let mut c = Communicator::new(t);
            let e = c
                .allreduce_sum(&mut vec![1.0; 1000])
                .unwrap_err()
                .to_string();
            assert!(e.contains("rank 1"), "{e}");
            println!("SHM-CHILD-OK dead peer reported: {e}");
        }
        None => {
            let t = ShmTransport::connect(job, r, n, 1 << 16, Duration::from_secs(20)).unwrap();
            let single_copy = t.single_copy();
            let mut c = Communicator::new(t);
            // 1.2 MB: above the single-copy threshold.
            let len = 300_001;
            assert!(len * 4 >= shoal_comm::shm::SINGLE_COPY_MIN_BYTES);
            let mut d = input(r, len);
            c.allreduce_sum(&mut d).unwrap();
            assert_eq!(d, expected_sum(n, len));
            c.barrier().unwrap();
            println!("SHM-CHILD-OK rank {r} single_copy={single_copy}");
        }
        Some(other) => panic!("unknown child mode {other}"),
    }
}

/// Non-integer values: every rank ends with the same bits, for both algorithms.
#[test]
fn allreduce_gives_identical_bits_on_every_rank() {
    for len in [5usize, 3000, 100_000] {
        let results = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let handles: Vec<_> = LocalTransport::group(5)
            .into_iter()
            .map(|t| {
                let results = results.clone();
                std::thread::spawn(move || {
                    let mut c = Communicator::with_piece_bytes(t, 4096);
                    let mut d: Vec<f32> = (0..len)
                        .map(|i| ((i * 3 + c.rank()) as f32 * 0.37).sin() / 3.0)
                        .collect();
                    c.allreduce_sum(&mut d).unwrap();
                    results.lock().unwrap().push(d);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let r = results.lock().unwrap();
        for d in r.iter() {
            assert!(
                d.iter().zip(&r[0]).all(|(a, b)| a.to_bits() == b.to_bits()),
                "len {len}"
            );
        }
    }
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
    // An intruder: wrong token. As the highest rank it only connects and introduces
    // itself, so its side forms; rank 0 refuses it by closing the connection, which the
    // intruder's next receive sees.
    let a1 = addrs.clone();
    let bad = std::thread::spawn(move || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut t = TcpTransport::connect(
            1,
            &a1,
            l,
            &TcpOptions {
                token: "guess".into(),
                ..Default::default()
            },
        )
        .expect("the intruder's side forms (the refusal is rank 0's)");
        t.recv(0, 1, &mut [0u8; 1]).unwrap_err()
    });
    let e = bad.join().expect("the intruder panicked");
    assert!(
        matches!(e, shoal_comm::Error::Disconnected { peer: 0 }),
        "the intruder was not refused by rank 0: {e}"
    );
    // Garbage bytes instead of a hello, and a connection that says nothing at all (held
    // open until the end): both are dropped and the group forms.
    let mut g = std::net::TcpStream::connect(addrs[0]).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\n\r\n....").unwrap();
    drop(g);
    let silent = std::net::TcpStream::connect(addrs[0]).unwrap();
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
    drop(silent);
    // An empty job token is refused before anything connects.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = vec![l.local_addr().unwrap()];
    let e = TcpTransport::connect(0, &a, l, &TcpOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("token"), "{e}");
}

/// With a deadline, a receive from a peer that is connected but sends nothing, and a
/// send to one that takes nothing, fail naming the peer instead of waiting for ever.
#[test]
fn a_silent_peer_fails_a_receive_and_a_full_one_a_send_after_the_deadline() {
    let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
    let opts = TcpOptions {
        token: "t".into(),
        io_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let (a, o) = (addrs.clone(), opts.clone());
    let r0 = std::thread::spawn(move || TcpTransport::connect(0, &a, l0, &o).unwrap());
    let mut t1 = TcpTransport::connect(1, &addrs, l1, &opts).unwrap();
    let mut t0 = r0.join().unwrap();
    let e = t0.recv(1, 1, &mut [0u8; 8]).unwrap_err().to_string();
    assert!(e.contains("rank 1") && e.contains("deadline"), "{e}");
    // Rank 0 never receives: rank 1's sends fill the socket buffers, then one fails.
    let big = vec![0u8; 1 << 20];
    let e = (0..1000)
        .find_map(|_| t1.send(0, 2, &big).err())
        .expect("1 GB went into a peer that reads nothing")
        .to_string();
    assert!(e.contains("rank 0") && e.contains("deadline"), "{e}");
}

/// The two-level allreduce (ranks on several hosts) gives the sequential sum, the same
/// bits on every rank, for hosts laid out in blocks and interleaved, and falls back to
/// the flat ring for uneven hosts.
#[test]
fn two_level_allreduce_matches_sequential() {
    let layouts: [&[usize]; 4] = [
        &[0, 0, 1, 1],
        &[0, 1, 0, 1],
        &[7, 7, 7, 3, 3, 3],
        &[0, 0, 1],
    ];
    for host_of in layouts {
        for len in [1usize, 4099, 300_001] {
            let n = host_of.len();
            let hosts = host_of.to_vec();
            let results = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let handles: Vec<_> = LocalTransport::group(n)
                .into_iter()
                .map(|t| {
                    let (results, hosts) = (results.clone(), hosts.clone());
                    std::thread::spawn(move || {
                        let mut c = Communicator::with_piece_bytes(t, 4096);
                        c.set_hosts(&hosts).unwrap();
                        let mut d = input(c.rank(), len);
                        c.allreduce_sum(&mut d).unwrap();
                        let mut e = input(c.rank(), len);
                        c.allreduce_two_level(&mut e).unwrap();
                        results.lock().unwrap().push((d, e));
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            let want = expected_sum(n, len);
            for (d, e) in results.lock().unwrap().iter() {
                assert_eq!(d, &want, "layout {host_of:?}, len {len}");
                assert_eq!(e, &want, "layout {host_of:?}, len {len}");
            }
        }
    }
}

/// 64 MB (16 M values, not divisible by 3) over every transport, 2 and 3 ranks, exact.
#[test]
fn allreduce_of_64_mb_on_every_transport() {
    let len = (16 << 20) + 1;
    for n in [2usize, 3] {
        let want = std::sync::Arc::new(expected_sum(n, len));
        let check = move |c: &mut Communicator<Box<dyn Transport>>, want: &[f32]| {
            let mut d = input(c.rank(), len);
            c.allreduce_sum(&mut d).unwrap();
            assert!(d == want, "64 MB allreduce over {n} ranks differs");
        };
        let groups: Vec<(&str, Vec<Box<dyn Transport>>)> = vec![
            (
                "local",
                LocalTransport::group(n)
                    .into_iter()
                    .map(|t| Box::new(t) as Box<dyn Transport>)
                    .collect(),
            ),
            (
                "tcp",
                tcp_group(n, "big")
                    .into_iter()
                    .map(|t| Box::new(t) as Box<dyn Transport>)
                    .collect(),
            ),
            (
                "shm",
                shm_group(n, &unique_job("big"))
                    .into_iter()
                    .map(|t| Box::new(t) as Box<dyn Transport>)
                    .collect(),
            ),
        ];
        for (name, ts) in groups {
            let hs: Vec<_> = ts
                .into_iter()
                .map(|t| {
                    let want = want.clone();
                    std::thread::spawn(move || check(&mut Communicator::new(t), &want))
                })
                .collect();
            for h in hs {
                h.join().unwrap_or_else(|_| panic!("{name}: a rank failed"));
            }
        }
    }
}

/// A crowd of silent connections on a rank's listener (more than it reads hellos for at
/// once) does not keep the real peer out: the hellos are read concurrently, the crowd
/// beyond the cap waits in the backlog instead of being taken and dropped, and the
/// group forms and reduces. (Read one at a time, the 300 strangers' deadlines of 3 s
/// each would hold the group for 15 minutes; the test states no time, it would hang.)
#[test]
fn silent_crowd_on_a_listener_does_not_keep_the_peer_out() {
    let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let connected = std::sync::Arc::new(AtomicUsize::new(0));
    let crowd: Vec<_> = (0..300)
        .map(|_| {
            let (to, done, connected) = (addrs[0], done.clone(), connected.clone());
            std::thread::spawn(move || {
                // Connects (perhaps only once the backlog has room) and says nothing.
                let s = std::net::TcpStream::connect(to);
                connected.fetch_add(1, SeqCst);
                while !done.load(SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                drop(s);
            })
        })
        .collect();
    // The crowd is there before the real peers (at least the part that fits any
    // listen backlog; the rest is still knocking).
    while connected.load(SeqCst) < 100 {
        std::thread::yield_now();
    }
    let group: Vec<TcpTransport> = [l0, l1]
        .into_iter()
        .enumerate()
        .map(|(r, l)| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let opts = TcpOptions {
                    token: "crowd".into(),
                    ..Default::default()
                };
                TcpTransport::connect(r, &addrs, l, &opts).unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    run(group, |c| {
        let mut d = input(c.rank(), 100);
        c.allreduce_sum(&mut d).unwrap();
        assert_eq!(d, expected_sum(2, 100));
    });
    done.store(true, SeqCst);
    for t in crowd {
        t.join().unwrap();
    }
}
