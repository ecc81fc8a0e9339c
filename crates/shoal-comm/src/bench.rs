//! Timing helpers for `bench/run allreduce`: an allreduce of a given size over a
//! transport with ranks as threads of this process, and this machine's memcpy
//! bandwidth as the reference ceiling.

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
}

fn run_ranks<T: Transport + 'static>(ts: Vec<T>, values: usize, iters: usize) -> Result<f64> {
    let handles: Vec<_> = ts
        .into_iter()
        .map(|t| {
            std::thread::spawn(move || -> Result<f64> {
                let mut c = Communicator::new(t);
                let mut d = vec![1.0f32; values];
                c.allreduce_sum(&mut d)?; // warm-up
                c.barrier()?;
                let start = Instant::now();
                for _ in 0..iters {
                    c.allreduce_sum(&mut d)?;
                }
                Ok(start.elapsed().as_secs_f64() / iters as f64)
            })
        })
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

/// Seconds per allreduce of `bytes` over `ranks` ranks (threads) on `which`.
pub fn allreduce_seconds(which: Which, ranks: usize, bytes: usize, iters: usize) -> Result<f64> {
    let values = bytes / 4;
    match which {
        Which::Local => run_ranks(LocalTransport::group(ranks), values, iters),
        Which::Shm => {
            let job = format!("bench-{}-{}", std::process::id(), bytes);
            let hs: Vec<_> = (0..ranks)
                .map(|r| {
                    let job = job.clone();
                    std::thread::spawn(move || {
                        ShmTransport::connect(&job, r, ranks, 8 << 20, Duration::from_secs(30))
                    })
                })
                .collect();
            run_ranks(join_all(hs)?, values, iters)
        }
        Which::Tcp => {
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
                    let addrs = addrs.clone();
                    std::thread::spawn(move || {
                        TcpTransport::connect(r, &addrs, l, &TcpOptions::default())
                    })
                })
                .collect();
            run_ranks(join_all(hs)?, values, iters)
        }
    }
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
