//! A cost model of synchronous data-parallel training: the time of one step on a
//! described cluster (nodes, workers per node, links) for a model (gradient bytes,
//! compute time per step), for ring allreduce and for parameter servers (shard count and
//! placement). Alpha-beta link costs, calibrated from the transport benchmarks.
//!
//! Per step, every worker computes (`compute_s`), then:
//! - allreduce: on one host, a ring over all workers moves `2(W-1)/W * S` bytes per rank
//!   over the local data plane in `2(W-1)` latency-bound steps. Over several hosts with
//!   `g > 1` workers each, shoal's two-level allreduce: a reduce-scatter and an allgather
//!   within each host (`(g-1)/g * S` each over the local plane) around a ring across the
//!   `n` hosts, where each host's link carries `2(n-1)/n * S`. Then each worker runs the
//!   optimizer on all parameters.
//! - parameter servers: a push phase (each worker sends `S/M` bytes to each of `M`
//!   shards), the shards' optimizer (`values/M` each, in parallel), and a pull phase
//!   (the same bytes back). In each phase a host's network time is the larger of the
//!   bytes it receives and sends over the inter-node link; traffic between a worker and
//!   a shard on the same host goes over local streams, in parallel up to the host's
//!   cores.

use serde::Serialize;

/// A link: bandwidth in bytes per second (one direction) and latency in seconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Link {
    pub bytes_per_s: f64,
    pub latency_s: f64,
}

/// The machines.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Cluster {
    pub nodes: usize,
    pub workers_per_node: usize,
    /// Cores (or independent copy engines) per host for parallel local streams.
    pub cores_per_node: usize,
    /// Between hosts.
    pub inter: Link,
    /// The allreduce data plane between workers on one host (shared memory, NVLink).
    pub intra: Link,
    /// One local stream between a worker and a shard on the same host (loopback TCP).
    pub local_stream: Link,
}

/// What one worker does per step.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Workload {
    /// Gradient bytes exchanged per worker per step.
    pub grad_bytes: f64,
    /// Values the optimizer updates per step.
    pub opt_values: f64,
    /// Seconds per value of the optimizer update (Adam on the host running it).
    pub opt_s_per_value: f64,
    /// Forward + backward + moving gradients and parameters, per step (no optimizer).
    pub compute_s: f64,
    /// Target words per worker per step.
    pub words_per_step: f64,
}

/// How workers combine gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Strategy {
    Allreduce,
    Ps { shards: usize, colocated: bool },
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Strategy::Allreduce => write!(f, "allreduce"),
            Strategy::Ps { shards, colocated } => write!(
                f,
                "{shards} ps {}",
                if *colocated { "colocated" } else { "separate" }
            ),
        }
    }
}

/// The predicted step.
#[derive(Debug, Clone, Serialize)]
pub struct Prediction {
    pub strategy: Strategy,
    pub workers: usize,
    pub step_s: f64,
    pub compute_s: f64,
    pub optimizer_s: f64,
    pub comm_s: f64,
    pub words_per_s: f64,
    /// Over one worker alone (compute + its own optimizer).
    pub speedup: f64,
    pub efficiency: f64,
    /// The term that dominates communication.
    pub bottleneck: String,
}

/// The time of one step of one process training alone.
pub fn single(w: &Workload) -> f64 {
    w.compute_s + w.opt_values * w.opt_s_per_value
}

/// Predicts one synchronous step of `strategy` on `c`.
pub fn predict(w: &Workload, c: &Cluster, strategy: Strategy) -> Prediction {
    let n = c.nodes.max(1);
    let g = c.workers_per_node.max(1);
    let workers = n * g;
    let s = w.grad_bytes;
    let (optimizer_s, comm_s, bottleneck) = match strategy {
        Strategy::Allreduce => {
            let opt = w.opt_values * w.opt_s_per_value;
            let (nf, gf) = (n as f64, g as f64);
            if workers == 1 {
                (opt, 0.0, "none".to_string())
            } else if n == 1 || g == 1 {
                // One flat ring (over the network when it spans hosts).
                let link = if n > 1 { c.inter } else { c.intra };
                let wf = workers as f64;
                let bytes = 2.0 * (wf - 1.0) / wf * s;
                let t = bytes / link.bytes_per_s + 2.0 * (wf - 1.0) * link.latency_s;
                let which = if n > 1 {
                    "inter-node link"
                } else {
                    "local data plane"
                };
                (opt, t, format!("{which}: {:.1} MB per rank", bytes / 1e6))
            } else {
                let local = 2.0
                    * ((gf - 1.0) / gf * s / c.intra.bytes_per_s + (gf - 1.0) * c.intra.latency_s);
                let net_bytes = 2.0 * (nf - 1.0) / nf * s;
                let net = net_bytes / c.inter.bytes_per_s + 2.0 * (nf - 1.0) * c.inter.latency_s;
                (
                    opt,
                    local + net,
                    format!(
                        "inter-node link (two-level): {:.1} MB per host",
                        net_bytes / 1e6
                    ),
                )
            }
        }
        Strategy::Ps { shards, colocated } => {
            let m = shards.max(1);
            let per_shard = s / m as f64;
            // Which host each shard lives on: worker hosts 0..n, or hosts of their own.
            let host_of = |j: usize| if colocated { j % n } else { n + j };
            let hosts = if colocated { n } else { n + m };
            let mut worst_net = 0.0f64;
            let mut worst_local = 0.0f64;
            for h in 0..hosts {
                let workers_here = if h < n { g } else { 0 };
                let shards_here = (0..m).filter(|&j| host_of(j) == h).count();
                let remote_workers = workers - workers_here;
                let remote_shards = m - shards_here;
                // One phase (push; the pull mirrors it).
                let inbound = shards_here as f64 * remote_workers as f64 * per_shard;
                let outbound = workers_here as f64 * remote_shards as f64 * per_shard;
                worst_net = worst_net.max(inbound.max(outbound));
                let streams = shards_here * workers_here;
                if streams > 0 {
                    let bytes = streams as f64 * per_shard;
                    let par = streams.min(c.cores_per_node.max(1)) as f64;
                    worst_local = worst_local.max(bytes / (c.local_stream.bytes_per_s * par));
                }
            }
            let net = worst_net / c.inter.bytes_per_s;
            let lat = if worst_net > 0.0 {
                c.inter.latency_s
            } else {
                c.local_stream.latency_s
            };
            let phase = net + worst_local + lat;
            let opt = w.opt_values / m as f64 * w.opt_s_per_value;
            let which = if net >= worst_local {
                format!("shard host network: {:.1} MB per phase", worst_net / 1e6)
            } else {
                "local streams to the shards".to_string()
            };
            (opt, 2.0 * phase, which)
        }
    };
    let step_s = w.compute_s + optimizer_s + comm_s;
    let alone = single(w);
    let speedup = workers as f64 * alone / step_s;
    Prediction {
        strategy,
        workers,
        step_s,
        compute_s: w.compute_s,
        optimizer_s,
        comm_s,
        words_per_s: workers as f64 * w.words_per_step / step_s,
        speedup,
        efficiency: speedup / workers as f64,
        bottleneck,
    }
}

/// Every strategy shoal runs for `c`: allreduce, and 1..=2n shards (up to the worker
/// count) colocated and separate. Sorted fastest first.
pub fn candidates(w: &Workload, c: &Cluster) -> Vec<Prediction> {
    let workers = c.nodes.max(1) * c.workers_per_node.max(1);
    let mut out = vec![predict(w, c, Strategy::Allreduce)];
    for shards in 1..=workers.min(8) {
        for colocated in [true, false] {
            out.push(predict(w, c, Strategy::Ps { shards, colocated }));
        }
    }
    out.sort_by(|a, b| a.step_s.total_cmp(&b.step_s));
    out
}

/// The seed's published NMT table (target words/s; 2 nodes, 8 GPUs): setup, nodes,
/// workers per node, strategy, words/s.
pub const SEED_TABLE: [(&str, usize, usize, Option<Strategy>, f64); 5] = [
    ("1 machine, 1 GPU", 1, 1, None, 5277.0),
    (
        "1 ps / 4 workers",
        1,
        4,
        Some(Strategy::Ps {
            shards: 1,
            colocated: false,
        }),
        7589.0,
    ),
    (
        "1 ps / 4 workers, ps on the same host",
        1,
        4,
        Some(Strategy::Ps {
            shards: 1,
            colocated: true,
        }),
        15473.0,
    ),
    (
        "1 ps / 8 workers",
        2,
        4,
        Some(Strategy::Ps {
            shards: 1,
            colocated: true,
        }),
        21035.0,
    ),
    (
        "2 ps / 8 workers",
        2,
        4,
        Some(Strategy::Ps {
            shards: 2,
            colocated: true,
        }),
        23316.0,
    ),
];

/// Our assumptions about the seed's cluster (it published none): 10 Gb Ethernet between
/// hosts at 1.1 GB/s effective and 50 us, PCIe 3 between GPUs of a host (10 GB/s),
/// 2 GB/s per local gRPC stream, 16 cores per host.
pub fn seed_cluster(nodes: usize, workers_per_node: usize) -> Cluster {
    Cluster {
        nodes,
        workers_per_node,
        cores_per_node: 16,
        inter: Link {
            bytes_per_s: 1.1e9,
            latency_s: 50e-6,
        },
        intra: Link {
            bytes_per_s: 10e9,
            latency_s: 10e-6,
        },
        local_stream: Link {
            bytes_per_s: 2e9,
            latency_s: 20e-6,
        },
    }
}

/// Our reading of the seed's workload: its model (3 x 128 GRU, English-French) with an
/// assumed 40,000-word vocabulary per side has about 16.6 M parameters, but TensorFlow
/// sends embedding gradients as sparse rows: per step the dense output layer (5.16 M),
/// the GRUs (0.59 M) and ~500 touched rows of each embedding (0.13 M), 5.88 M values =
/// 23.5 MB. Batch 32 x ~25 target words = 800 words per step; at the published 5,277
/// words/s on one GPU that is 0.152 s per step, of which the optimizer (host Adam,
/// 2.5 ns per value) is 15 ms.
pub fn seed_workload() -> Workload {
    let values = 5.88e6;
    let opt = 2.5e-9;
    let step = 800.0 / 5277.0;
    Workload {
        grad_bytes: values * 4.0,
        opt_values: values,
        opt_s_per_value: opt,
        compute_s: step - values * opt,
        words_per_step: 800.0,
    }
}

/// Measures the cost model's local links on this machine: the bus bandwidth of a 2-rank
/// allreduce of `bytes` over shared memory (the allreduce data plane) and over TCP (one
/// local stream per direction).
pub fn plan_links(bytes: usize) -> crate::Result<(Link, Link)> {
    use shoal_comm::bench::{allreduce_seconds, Which};
    let bus = |which| -> crate::Result<f64> {
        let t = allreduce_seconds(which, 2, bytes, 5)?;
        Ok(bytes as f64 / t)
    };
    Ok((
        Link {
            bytes_per_s: bus(Which::Shm)?,
            latency_s: 5e-6,
        },
        Link {
            bytes_per_s: bus(Which::Tcp)?,
            latency_s: 30e-6,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(nodes: usize, per: usize) -> Cluster {
        let l = |gb: f64| Link {
            bytes_per_s: gb * 1e9,
            latency_s: 50e-6,
        };
        Cluster {
            nodes,
            workers_per_node: per,
            cores_per_node: 16,
            inter: l(1.0),
            intra: l(10.0),
            local_stream: l(2.0),
        }
    }

    const W: Workload = Workload {
        grad_bytes: 100e6,
        opt_values: 25e6,
        opt_s_per_value: 1e-9,
        compute_s: 0.1,
        words_per_step: 1000.0,
    };

    #[test]
    fn ring_allreduce_matches_the_textbook_formula() {
        let p = predict(&W, &machine(1, 4), Strategy::Allreduce);
        // 2(4-1)/4 * 100 MB over the 10 GB/s local plane + 6 latencies.
        let want = 1.5 * 100e6 / 10e9 + 6.0 * 50e-6;
        assert!((p.comm_s - want).abs() < 1e-12);
        assert!((p.step_s - (0.1 + 0.025 + want)).abs() < 1e-12);
        let p = predict(&W, &machine(8, 1), Strategy::Allreduce);
        let want = 1.75 * 100e6 / 1e9 + 14.0 * 50e-6;
        assert!((p.comm_s - want).abs() < 1e-12);
    }

    #[test]
    fn two_level_allreduce_sends_each_byte_once_per_host() {
        let p = predict(&W, &machine(2, 4), Strategy::Allreduce);
        // Within hosts: 2 x (3/4 x 100 MB at 10 GB/s + 3 latencies); across the 2 hosts:
        // 2(2-1)/2 x 100 MB at 1 GB/s + 2 latencies.
        let want = 2.0 * (0.75 * 100e6 / 10e9 + 3.0 * 50e-6) + 100e6 / 1e9 + 2.0 * 50e-6;
        assert!((p.comm_s - want).abs() < 1e-12, "{} vs {want}", p.comm_s);
    }

    #[test]
    fn one_separate_shard_carries_every_worker() {
        // 4 workers on one host, the shard on another: 4 x 100 MB in per phase.
        let p = predict(
            &W,
            &machine(1, 4),
            Strategy::Ps {
                shards: 1,
                colocated: false,
            },
        );
        let want = 2.0 * (400e6 / 1e9 + 50e-6);
        assert!((p.comm_s - want).abs() < 1e-12, "{}", p.comm_s);
        assert!((p.optimizer_s - 0.025).abs() < 1e-12);
    }

    #[test]
    fn colocating_and_adding_shards_relieve_the_bottleneck() {
        let c = machine(2, 4);
        let sep1 = predict(
            &W,
            &c,
            Strategy::Ps {
                shards: 1,
                colocated: false,
            },
        );
        let col1 = predict(
            &W,
            &c,
            Strategy::Ps {
                shards: 1,
                colocated: true,
            },
        );
        let col2 = predict(
            &W,
            &c,
            Strategy::Ps {
                shards: 2,
                colocated: true,
            },
        );
        assert!(col1.step_s < sep1.step_s);
        assert!(col2.step_s < col1.step_s);
        // Two colocated shards: per phase each host receives 4 remote workers x 50 MB
        // over the network and serves its 4 local workers over 4 parallel streams.
        let want = 2.0 * (200e6 / 1e9 + 200e6 / (2e9 * 4.0) + 50e-6);
        assert!(
            (col2.comm_s - want).abs() < 1e-12,
            "{} vs {want}",
            col2.comm_s
        );
    }
}
