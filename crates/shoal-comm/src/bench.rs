//! Timing helpers for `bench/run allreduce` and `bench/run transport`: an allreduce, or
//! a push + pull of a buffer between two ranks, over a transport (TCP also with TLS) with ranks as threads
//! of this process (or one rank of a shared-memory group of processes), and this
//! machine's memcpy bandwidth as the reference ceiling.

use crate::local::LocalTransport;
use crate::shm::ShmTransport;
use crate::tcp::{TcpOptions, TcpTransport};
use crate::{Communicator, Error, Result, Transport};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// Which transport a benchmark uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Local,
    Shm,
    Tcp,
    /// TCP with TLS (a per-job CA made for the benchmark; feature `tls`).
    TcpTls,
}

/// Seconds per allreduce of `values` values on one rank (after one warm-up).
fn time_allreduce<T: Transport>(t: T, values: usize, iters: usize) -> Result<f64> {
    let mut c = Communicator::new(t);
    let mut d = vec![1.0f32; values];
    c.allreduce_sum(&mut d)?; // warm-up
    c.barrier()?;
    let start = Instant::now();
    for _ in 0..iters {
        c.allreduce_sum(&mut d)?;
    }
    let secs = start.elapsed().as_secs_f64() / iters as f64;
    c.barrier()?;
    Ok(secs)
}

fn run_ranks<T: Transport + 'static>(ts: Vec<T>, values: usize, iters: usize) -> Result<f64> {
    let handles: Vec<_> = ts
        .into_iter()
        .map(|t| std::thread::spawn(move || time_allreduce(t, values, iters)))
        .collect();
    let mut worst = 0.0f64;
    for h in handles {
        let t = h
            .join()
            .map_err(|_| Error::Mismatch("a benchmark rank panicked".into()))??;
        worst = worst.max(t);
    }
    Ok(worst)
}

/// Joins threads that each connect one rank.
fn join_all<T>(hs: Vec<std::thread::JoinHandle<Result<T>>>) -> Result<Vec<T>> {
    hs.into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| Error::Mismatch("a rank's connect panicked".into()))?
        })
        .collect()
}

/// `ranks` connected transports of kind `which` (ranks as threads of this process).
pub fn group(which: Which, ranks: usize) -> Result<Vec<Box<dyn Transport>>> {
    let boxed = |v: Vec<_>| {
        v.into_iter()
            .map(|t| Box::new(t) as Box<dyn Transport>)
            .collect()
    };
    Ok(match which {
        Which::Local => boxed(LocalTransport::group(ranks)),
        Which::Shm => {
            let job = format!("bench-{}-{:?}", std::process::id(), Instant::now());
            let hs: Vec<_> = (0..ranks)
                .map(|r| {
                    let job = job.clone();
                    std::thread::spawn(move || {
                        ShmTransport::connect(&job, r, ranks, 8 << 20, Duration::from_secs(30))
                    })
                })
                .collect();
            join_all(hs)?
                .into_iter()
                .map(|t| Box::new(t) as Box<dyn Transport>)
                .collect()
        }
        Which::Tcp | Which::TcpTls => {
            let tls = match which {
                Which::TcpTls => Some(crate::tls::Tls::new(&crate::tls::Pem::generate()?)?),
                _ => None,
            };
            let ls: Vec<TcpListener> = (0..ranks)
                .map(|_| TcpListener::bind("127.0.0.1:0"))
                .collect::<std::io::Result<_>>()
                .map_err(|e| Error::Io {
                    what: "binding benchmark listeners".into(),
                    source: e,
                })?;
            let addrs: Vec<SocketAddr> = ls.iter().filter_map(|l| l.local_addr().ok()).collect();
            let hs: Vec<_> = ls
                .into_iter()
                .enumerate()
                .map(|(r, l)| {
                    let (addrs, tls) = (addrs.clone(), tls.clone());
                    std::thread::spawn(move || {
                        TcpTransport::connect(
                            r,
                            &addrs,
                            l,
                            &TcpOptions {
                                token: "bench".into(),
                                tls,
                                ..Default::default()
                            },
                        )
                    })
                })
                .collect();
            join_all(hs)?
                .into_iter()
                .map(|t| Box::new(t) as Box<dyn Transport>)
                .collect()
        }
    })
}

/// Seconds per push + pull of `bytes` between two ranks on `which` (best of `iters`
/// after one warm-up): rank 0 sends the buffer (push), rank 1 receives it into its own
/// buffer and sends it back (pull), as a worker and a parameter server would.
pub fn push_pull_seconds(which: Which, bytes: usize, iters: usize) -> Result<f64> {
    let mut ts = group(which, 2)?.into_iter();
    let (mut worker, mut server) = match (ts.next(), ts.next()) {
        (Some(a), Some(b)) => (a, b),
        _ => return Err(Error::Mismatch("benchmark group of 2 is short".into())),
    };
    let srv = std::thread::spawn(move || -> Result<()> {
        let mut held = vec![0u8; bytes];
        for _ in 0..=iters {
            server.recv(0, 1, &mut held)?;
            server.send(0, 2, &held)?;
        }
        Ok(())
    });
    let grad = vec![3u8; bytes];
    let mut back = vec![0u8; bytes];
    let mut best = f64::INFINITY;
    for i in 0..=iters {
        let start = Instant::now();
        worker.send(1, 1, &grad)?;
        worker.recv(1, 2, &mut back)?;
        if i > 0 {
            best = best.min(start.elapsed().as_secs_f64());
        }
    }
    srv.join()
        .map_err(|_| Error::Mismatch("the benchmark server panicked".into()))??;
    Ok(best)
}

/// Seconds per allreduce of `bytes` over `ranks` ranks (threads) on `which`.
pub fn allreduce_seconds(which: Which, ranks: usize, bytes: usize, iters: usize) -> Result<f64> {
    run_ranks(group(which, ranks)?, bytes / 4, iters)
}

/// Seconds per allreduce of `bytes` for `rank` of a shared-memory group of `ranks`
/// processes named `job` (each process calls this with its own rank).
pub fn shm_rank_allreduce_seconds(
    job: &str,
    rank: usize,
    ranks: usize,
    bytes: usize,
    iters: usize,
) -> Result<f64> {
    let t = ShmTransport::connect(job, rank, ranks, 8 << 20, Duration::from_secs(30))?;
    time_allreduce(t, bytes / 4, iters)
}

/// This machine's single-thread memcpy bandwidth in bytes/s over a `bytes` buffer.
pub fn memcpy_bandwidth(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src);
    let iters = (1 << 30) / bytes.max(1) + 2;
    let start = Instant::now();
    for _ in 0..iters {
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
    }
    (bytes * iters) as f64 / start.elapsed().as_secs_f64()
}

/// Seconds per synchronous step of `workers` workers (threads) pushing a gradient of
/// `bytes` to `shards` parameter-server shards (over loopback TCP, or shared-memory
/// links when `shm`; Adam on the shards) and pulling the new parameters (best of
/// `iters` after one warm-up).
pub fn ps_step_seconds(
    shards: usize,
    workers: usize,
    bytes: usize,
    iters: usize,
    shm: bool,
) -> Result<f64> {
    use crate::ps::ShardPlane;
    use crate::ps::{shard_range, shm_link, LinkOpener, PsClient, PsMode, PsServer, ShardConfig};
    let total = bytes / 4;
    let cfg = ShardConfig {
        workers,
        mode: PsMode::Sync,
        optimizer: shoal_optim::OptimizerConfig::default(),
        lr: 1e-3,
        average: true,
        sparse_dim: 0,
        token: "bench".into(),
        timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let job = format!("ps-bench-{}-{shards}-{bytes}", std::process::id());
    let wait = Duration::from_secs(30);
    let servers = (0..shards)
        .map(|i| {
            let (a, b) = shard_range(total, shards, i);
            let plane = match shm {
                true => ShardPlane::Links(
                    (0..workers)
                        .map(|w| {
                            let job = job.clone();
                            Box::new(move || shm_link(&job, i, w, 0, wait)) as LinkOpener
                        })
                        .collect(),
                ),
                false => {
                    ShardPlane::Tcp(TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Io {
                        what: "binding a benchmark shard".into(),
                        source: e,
                    })?)
                }
            };
            PsServer::start_on(plane, b - a, cfg.clone())
        })
        .collect::<Result<Vec<_>>>()?;
    let addrs: Vec<SocketAddr> = servers.iter().filter_map(|s| s.addr()).collect();
    let connect = move |w: usize| -> Result<PsClient> {
        match shm {
            true => {
                let links = (0..shards)
                    .map(|i| shm_link(&job, i, w, 1, wait))
                    .collect::<Result<Vec<_>>>()?;
                PsClient::over(links, w, total, 0, "bench")
            }
            false => PsClient::connect(&addrs, w, total, 0, "bench"),
        }
    };
    let connect = std::sync::Arc::new(connect);
    let hs: Vec<_> = (0..workers)
        .map(|w| {
            let connect = connect.clone();
            std::thread::spawn(move || -> Result<f64> {
                let mut c = connect(w)?;
                let mut params = vec![0.5f32; total];
                if w == 0 {
                    c.init(&params)?;
                }
                let grad = vec![0.01f32; total];
                let mut best = f64::INFINITY;
                for step in 0..=iters as u64 {
                    let start = Instant::now();
                    c.push(step, &grad, None)?;
                    c.pull(step + 1, &mut params)?;
                    if step > 0 {
                        best = best.min(start.elapsed().as_secs_f64());
                    }
                }
                c.close()?;
                Ok(best)
            })
        })
        .collect();
    let mut worst = 0.0f64;
    for t in join_all(hs)? {
        worst = worst.max(t);
    }
    for s in servers {
        s.join()?;
    }
    Ok(worst)
}
