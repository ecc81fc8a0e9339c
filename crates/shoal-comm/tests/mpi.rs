//! The MPI transport under `mpirun` (feature `mpi`): the collectives over MPI point to
//! point and MPI's own allreduce equal a sequential computation, for 2 and 3 ranks and
//! sizes from 1 value to 64 MB; a wrong-sized message is refused.
#![cfg(feature = "mpi")]

mod common;

use common::{expected_sum, input};
use shoal_comm::mpi::MpiTransport;
use shoal_comm::{Communicator, Transport};

/// Makes a run of this test binary under mpirun one rank of `collectives_under_mpirun`
/// instead of its parent.
const CHILD_ENV: &str = "SHOAL_MPI_CHILD";

/// Starts this test binary under `mpirun -n ranks`, filtered to this test, whose child
/// branch (`SHOAL_MPI_CHILD` set) runs one rank in each process.
#[test]
fn collectives_under_mpirun() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return mpi_rank();
    }
    for ranks in ["2", "3"] {
        let out = std::process::Command::new("mpirun")
            .args([
                "--allow-run-as-root",
                "--oversubscribe",
                "-n",
                ranks,
                std::env::current_exe().unwrap().to_str().unwrap(),
                "--exact",
                "collectives_under_mpirun",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .expect("mpirun (Debian: openmpi-bin) must be installed for the mpi feature's tests");
        assert!(
            out.status.success(),
            "{ranks} ranks failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let ok = text.matches("mpi rank ok").count();
        assert_eq!(ok.to_string(), ranks, "{text}");
    }
}

/// One rank of `collectives_under_mpirun`.
fn mpi_rank() {
    let t = MpiTransport::init(16 << 20).unwrap();
    let mut c = Communicator::new(t);
    let (n, r) = (c.size(), c.rank());
    for len in [1usize, 7, 4099, 1 << 20, 16 << 20] {
        let want = expected_sum(n, len);
        let mut d = input(r, len);
        c.allreduce_sum(&mut d).unwrap();
        assert!(d == want, "MPI_Allreduce len {len}");
        if len <= 1 << 20 {
            let mut d = input(r, len);
            c.allreduce_ring(&mut d).unwrap();
            assert!(d == want, "ring over MPI len {len}");
        }
    }
    let mine = input(r, 3);
    let mut all = vec![0.0; 3 * n];
    c.allgather(&mine, &mut all).unwrap();
    assert_eq!(all, (0..n).flat_map(|q| input(q, 3)).collect::<Vec<_>>());
    let mut b = if r == 0 {
        input(99, 5000)
    } else {
        vec![0.0; 5000]
    };
    c.broadcast(&mut b, 0).unwrap();
    assert_eq!(b, input(99, 5000));
    // A message of the wrong size is refused, naming the peer.
    let t = c.transport();
    if r == 0 {
        t.send(1, 77, &[1, 2, 3]).unwrap();
    } else if r == 1 {
        let e = t.recv(0, 77, &mut [0u8; 4]).unwrap_err().to_string();
        assert!(e.contains("expected 4 bytes, got 3"), "{e}");
    }
    c.barrier().unwrap();
    println!("mpi rank ok");
}
