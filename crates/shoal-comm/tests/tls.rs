//! TLS on the TCP plane and the parameter-server links: a ring allreduce over TLS gives
//! the sequential sum; what crosses the wire does not contain the plaintext (a relay in
//! the middle records it, and sees the plaintext when TLS is off); a peer with another
//! job's certificates, a plaintext peer and a silent one are refused while the group
//! still forms; a shard with TLS serves TLS workers and refuses plain ones.
#![cfg(feature = "tls")]

mod common;

use common::{expected_sum, input};
use shoal_comm::ps::{PsClient, PsServer, ShardConfig};
use shoal_comm::tcp::{TcpOptions, TcpTransport};
use shoal_comm::tls::{Pem, Tls};
use shoal_comm::{Communicator, Transport};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn opts(tls: Option<Arc<Tls>>) -> TcpOptions {
    TcpOptions {
        token: "tok".into(),
        tls,
        ..Default::default()
    }
}

fn tls_group(n: usize, tls: &Arc<Tls>) -> Vec<TcpTransport> {
    common::tcp_group(n, &opts(Some(tls.clone())))
}

#[test]
fn ring_allreduce_over_tls_gives_the_sequential_sum() {
    let tls = Tls::new(&Pem::generate().unwrap()).unwrap();
    for (n, len) in [(2, 1000), (3, 65_537), (4, 300_001)] {
        let hs: Vec<_> = tls_group(n, &tls)
            .into_iter()
            .map(|t| {
                std::thread::spawn(move || {
                    let r = t.rank();
                    let mut c = Communicator::new(t);
                    let mut x = input(r, len);
                    c.allreduce_ring(&mut x).unwrap();
                    x
                })
            })
            .collect();
        let want = expected_sum(n, len);
        for h in hs {
            assert_eq!(h.join().unwrap(), want, "{n} ranks, {len} values");
        }
    }
}

/// Forwards one connection from `listener` to `to` in both directions, appending every
/// byte it carries to `seen`.
fn relay(listener: TcpListener, to: SocketAddr, seen: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let (a, _) = listener.accept().unwrap();
        let b = TcpStream::connect(to).unwrap();
        let pipe = |mut from: TcpStream, mut into: TcpStream, seen: Arc<Mutex<Vec<u8>>>| {
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(k) = from.read(&mut buf) {
                    if k == 0 || into.write_all(&buf[..k]).is_err() {
                        break;
                    }
                    seen.lock().unwrap().extend_from_slice(&buf[..k]);
                }
                let _ = into.shutdown(std::net::Shutdown::Write);
            })
        };
        pipe(a.try_clone().unwrap(), b.try_clone().unwrap(), seen.clone());
        pipe(b, a, seen);
    });
}

/// Sends a recognisable message from rank 1 to rank 0 through a relay and returns what
/// the relay saw.
fn wire_bytes(tls: Option<Arc<Tls>>, message: &[u8]) -> Vec<u8> {
    let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let mid = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a0, a1, am) = (
        l0.local_addr().unwrap(),
        l1.local_addr().unwrap(),
        mid.local_addr().unwrap(),
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    relay(mid, a0, seen.clone());
    let o = opts(tls.clone());
    let r0 = std::thread::spawn(move || TcpTransport::connect(0, &[a0, a1], l0, &o).unwrap());
    // Rank 1 reaches rank 0 through the relay.
    let mut t1 = TcpTransport::connect(1, &[am, a1], l1, &opts(tls)).unwrap();
    let mut t0 = r0.join().unwrap();
    t1.send(0, 9, message).unwrap();
    let mut got = vec![0u8; message.len()];
    t0.recv(1, 9, &mut got).unwrap();
    assert_eq!(got, message);
    drop((t0, t1));
    let v = seen.lock().unwrap().clone();
    v
}

#[test]
fn what_crosses_the_wire_is_not_the_plaintext() {
    let message: Vec<u8> = (0..200_000u32)
        .flat_map(|i| (i * 2654435761).to_le_bytes())
        .collect();
    let probe = &message[400_000..400_064];
    let has = |hay: &[u8]| hay.windows(probe.len()).any(|w| w == probe);
    let plain = wire_bytes(None, &message);
    assert!(
        has(&plain),
        "the relay check cannot see a plaintext message"
    );
    let tls = Tls::new(&Pem::generate().unwrap()).unwrap();
    let sealed = wire_bytes(Some(tls), &message);
    assert!(
        sealed.len() > message.len(),
        "the relay saw {} bytes",
        sealed.len()
    );
    assert!(!has(&sealed), "the plaintext crossed the wire under TLS");
    assert!(
        !sealed.windows(3).any(|w| w == b"tok"),
        "the job token crossed the wire in the clear under TLS"
    );
}

#[test]
fn strangers_are_refused_and_the_group_still_forms() {
    let tls = Tls::new(&Pem::generate().unwrap()).unwrap();
    let other = Tls::new(&Pem::generate().unwrap()).unwrap();
    let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs = vec![l0.local_addr().unwrap(), l1.local_addr().unwrap()];
    let (a, o) = (addrs.clone(), opts(Some(tls.clone())));
    let r0 = std::thread::spawn(move || TcpTransport::connect(0, &a, l0, &o));
    // Another job's certificates (right token): the handshake fails on one side or
    // the other, and the impostor never gets a message through.
    let a = addrs.clone();
    let impostor = std::thread::spawn(move || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        match TcpTransport::connect(1, &a, l, &opts(Some(other))) {
            Err(e) => e.to_string(),
            Ok(mut t) => t.recv(0, 1, &mut [0u8; 1]).unwrap_err().to_string(),
        }
    });
    let e = impostor.join().unwrap();
    assert!(e.contains("TLS") || e.contains("rank 0"), "{e}");
    // A plaintext hello, and a connection that says nothing (held open to the end).
    let mut plain = TcpStream::connect(addrs[0]).unwrap();
    plain.write_all(b"plaintext hello, no TLS").unwrap();
    let silent = TcpStream::connect(addrs[0]).unwrap();
    let mut t1 = TcpTransport::connect(1, &addrs, l1, &opts(Some(tls))).unwrap();
    let mut t0 = r0.join().unwrap().unwrap();
    t1.send(0, 3, b"real").unwrap();
    let mut buf = [0u8; 4];
    t0.recv(1, 3, &mut buf).unwrap();
    assert_eq!(&buf, b"real");
    // The plaintext one was closed by rank 0 (it reads end of stream or a TLS alert,
    // never a reply in the clear).
    plain
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reply = Vec::new();
    let _ = plain.read_to_end(&mut reply);
    assert!(!reply.windows(4).any(|w| w == b"real"), "{reply:?}");
    drop(silent);
}

#[test]
fn a_shard_with_tls_serves_tls_workers_and_refuses_plain_ones() {
    let tls = Tls::new(&Pem::generate().unwrap()).unwrap();
    let cfg = ShardConfig {
        workers: 1,
        optimizer: shoal_optim::OptimizerConfig {
            kind: shoal_optim::OptimizerKind::Sgd,
            ..Default::default()
        },
        lr: 0.5,
        average: false,
        token: "tok".into(),
        timeout: Duration::from_secs(30),
        tls: Some(tls.clone()),
        ..Default::default()
    };
    let s = PsServer::start(TcpListener::bind("127.0.0.1:0").unwrap(), 4, cfg).unwrap();
    let addrs = vec![s.addr().unwrap()];
    // A worker without TLS does not get through, and does not fail the shard.
    let plain = PsClient::connect(&addrs, 0, 4, 0, "tok");
    assert!(
        plain.is_err(),
        "a plaintext worker was served by a TLS shard"
    );
    let mut c = PsClient::connect_with(&addrs, 0, 4, 0, "tok", Some(&tls), None).unwrap();
    c.init(&[1.0, 2.0, 3.0, 4.0]).unwrap();
    let mut p = [0.0f32; 4];
    c.pull(0, &mut p).unwrap();
    assert_eq!(p, [1.0, 2.0, 3.0, 4.0]);
    c.push(0, &[2.0, 2.0, 2.0, 2.0], None).unwrap();
    c.pull(1, &mut p).unwrap();
    // Plain SGD, lr 0.5: p - 0.5 * 2.
    assert_eq!(p, [0.0, 1.0, 2.0, 3.0]);
    c.close().unwrap();
    s.join().unwrap();
}

#[test]
fn tls_files_round_trip_and_bad_ones_are_named() {
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("tls");
    let pem = Pem::generate().unwrap();
    pem.write_dir(&dir).unwrap();
    let e = pem.write_dir(&dir).unwrap_err().to_string();
    assert!(
        e.contains("tls"),
        "an existing directory was written into: {e}"
    );
    let back = Pem::read_dir(&dir).unwrap();
    assert_eq!(back.cert, pem.cert);
    Tls::new(&back).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for (f, allowed) in [("key.pem", 0), ("", 0)] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, allowed, "{f:?} is open to others: {mode:o}");
    }
    std::fs::write(dir.join("cert.pem"), "not a certificate").unwrap();
    let e = Tls::new(&Pem::read_dir(&dir).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("cert.pem"), "{e}");
    std::fs::remove_file(dir.join("key.pem")).unwrap();
    let e = Pem::read_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("key.pem"), "{e}");
}
