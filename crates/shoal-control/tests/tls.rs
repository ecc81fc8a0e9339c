//! The coordinator over TLS: members with the job's certificates join, meet at a
//! barrier and leave; a client without TLS and one with another job's certificates
//! (the right token) are refused and fail the job for nobody.
#![cfg(feature = "tls")]

use shoal_comm::tls::Pem;
use shoal_control::{ControlClient, Coordinator, CoordinatorConfig, Joining, TlsPem};
use std::time::Duration;

fn pem() -> TlsPem {
    let p = Pem::generate().unwrap();
    TlsPem {
        ca: p.ca,
        cert: p.cert,
        key: p.key,
    }
}

#[test]
fn members_with_the_job_certificates_join_and_strangers_are_refused() {
    let job = pem();
    let c = Coordinator::start(
        "127.0.0.1:0".parse().unwrap(),
        CoordinatorConfig {
            token: "tok".into(),
            world: 2,
            heartbeat_timeout: Duration::from_secs(3),
            rendezvous_timeout: Duration::from_secs(120),
            tls: Some(job.clone()),
        },
    )
    .unwrap();
    let url = format!("http://{}", c.addr);
    let joining = |i: u32| Joining {
        role: "worker".into(),
        host: "h".into(),
        data_addr: String::new(),
        index: Some(i),
    };
    // No TLS: the connection or the first call fails; it never registers.
    let plain = ControlClient::connect(&url, "tok", Duration::ZERO, None)
        .and_then(|mut p| p.join(&joining(0)));
    assert!(
        plain.is_err(),
        "a plaintext client registered with a TLS coordinator"
    );
    // Another job's certificates, the right token: refused likewise.
    let other = pem();
    let other_ca = ControlClient::connect(&url, "tok", Duration::ZERO, Some(&other))
        .and_then(|mut p| p.join(&joining(0)));
    let Err(e) = other_ca else {
        panic!("a client with another CA's certificate registered");
    };
    assert!(!e.to_string().is_empty());
    // The real members.
    let hs: Vec<_> = (0..2)
        .map(|i| {
            let (url, job) = (url.clone(), job.clone());
            std::thread::spawn(move || {
                let mut m =
                    ControlClient::connect(&url, "tok", Duration::ZERO, Some(&job)).unwrap();
                let r = m.join(&joining(i)).unwrap();
                m.barrier("b").unwrap();
                m.leave().unwrap();
                r.members.len()
            })
        })
        .collect();
    for h in hs {
        assert_eq!(h.join().unwrap(), 2);
    }
    c.wait_finished().unwrap();
    assert!(c.failures().is_empty(), "{:?}", c.failures());
}
