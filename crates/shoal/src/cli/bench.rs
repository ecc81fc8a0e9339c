//! `shoal bench`: the benchmarks' shoal side (bench/run runs them against their peers).

use super::train_ctr::{sparse_rule, SparseOpt};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub(crate) enum BenchCmd {
    /// NMT training throughput (seed model, no attention), on fixed batches.
    NmtTrain {
        /// Timed training steps.
        #[arg(long, default_value_t = 60)]
        steps: usize,
        /// Untimed steps first (allocation, caches).
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Write the batches here for the PyTorch peer.
        #[arg(long)]
        dump_batches: Option<PathBuf>,
        /// The Multi30k directory the batches come from.
        #[arg(long, default_value = "../shared/data/multi30k")]
        data_dir: PathBuf,
        /// The recurrent cell.
        #[arg(long, value_enum, default_value = "gru")]
        cell: shoal_nmt::CellKind,
        /// LayerNorm inside the recurrent cells.
        #[arg(long)]
        layer_norm: bool,
        /// Run the engine's step-by-step recurrence instead of the fused operation.
        #[arg(long)]
        unfused: bool,
    },
    /// Allreduce of one buffer over N ranks (threads of this process).
    Allreduce {
        /// local, shm or tcp
        #[arg(long, default_value = "shm")]
        transport: String,
        /// Ranks taking part.
        #[arg(long, default_value_t = 2)]
        ranks: usize,
        /// Sizes in MB, comma-separated.
        #[arg(long, default_value = "1,16,64")]
        sizes: String,
        /// Timed repetitions per size (the median is reported).
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Ranks as processes (this program started once per rank) instead of threads
        /// (shm only).
        #[arg(long)]
        processes: bool,
        /// Internal: run as rank R of a group of processes named by --job.
        #[arg(long, hide = true, requires = "job")]
        rank: Option<usize>,
        #[arg(long, hide = true)]
        job: Option<String>,
    },
    /// Push + pull of a gradient between two ranks (threads) over shared memory and TCP,
    /// and through a tonic gRPC service, per size.
    Transport {
        /// Sizes in MB, comma-separated.
        #[arg(long, default_value = "16,64")]
        sizes: String,
        /// Timed repetitions per size (the median is reported).
        #[arg(long, default_value_t = 10)]
        iters: usize,
    },
    /// Synchronous parameter-server steps (push + Adam + pull) of 2 workers (threads) with
    /// 1 and 2 shards, over loopback TCP and over shared-memory links, per gradient size.
    PsShards {
        /// Sizes in MB, comma-separated.
        #[arg(long, default_value = "16")]
        sizes: String,
        /// Worker threads pushing and pulling.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Timed steps per size (the median is reported).
        #[arg(long, default_value_t = 10)]
        iters: usize,
    },
    /// Sparse rows at scale: bytes per touched row, rows created per second, and sparse
    /// push + pull rows per second through 1 and 2 parameter-server shards.
    CtrScale {
        /// Distinct keys to create.
        #[arg(long, default_value_t = 10_000_000)]
        rows: usize,
        /// Values per row (DeepFM: 1 + embedding dim).
        #[arg(long, default_value_t = 9)]
        dim: usize,
        /// Update rule of the rows (its state is part of each row's bytes).
        #[arg(long, value_enum, default_value = "row-adagrad")]
        rule: SparseOpt,
        /// Distinct sparse keys each parameter-server step touches.
        #[arg(long, default_value_t = 20_000)]
        ps_keys: usize,
        /// Timed parameter-server steps.
        #[arg(long, default_value_t = 30)]
        ps_steps: usize,
    },
    /// One recurrent layer, forward + backward, on random input.
    RnnLayer {
        /// The recurrent cell.
        #[arg(long, value_enum, default_value = "gru")]
        cell: shoal_nmt::CellKind,
        /// Sequences per batch.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Hidden size.
        #[arg(long, default_value_t = 128)]
        hidden: usize,
        /// Input size (default: the hidden size).
        #[arg(long)]
        input: Option<usize>,
        /// Time steps per sequence.
        #[arg(long, default_value_t = 20)]
        len: usize,
        /// Timed forward + backward passes (the median is reported).
        #[arg(long, default_value_t = 50)]
        iters: usize,
        /// Untimed passes first.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Run the engine's step-by-step recurrence instead of the fused operation.
        #[arg(long)]
        unfused: bool,
    },
}

pub(crate) fn run(b: BenchCmd) -> Result<()> {
    match b {
        BenchCmd::NmtTrain {
            steps,
            warmup,
            dump_batches,
            data_dir,
            cell,
            layer_norm,
            unfused,
        } => {
            let opts = shoal_nmt::bench::NmtBenchOptions {
                data_dir,
                steps,
                warmup,
                dump_batches,
                cell,
                layer_norm,
                fused: !unfused,
                ..Default::default()
            };
            let r = shoal_nmt::bench::nmt_train(&opts, |l| eprintln!("{l}"))?;
            eprintln!(
                "shoal: {:.0} target tokens/s over {} steps ({:.1} s), loss {:.3} -> {:.3}, peak RSS {:.0} MiB",
                r.words_per_s, r.steps_timed, r.seconds, r.loss_first, r.loss_last, r.peak_rss_mb
            );
            println!("{}", serde_json::to_string(&r)?);
        }
        BenchCmd::Allreduce {
            transport,
            ranks,
            sizes,
            iters,
            processes,
            rank,
            job,
        } => {
            use shoal_comm::bench::{allreduce_seconds, memcpy_bandwidth, Which};
            if let (Some(rank), Some(job)) = (rank, &job) {
                let bytes: usize = sizes.parse().context("--sizes: bytes expected")?;
                let secs =
                    shoal_comm::bench::shm_rank_allreduce_seconds(job, rank, ranks, bytes, iters)?;
                println!("{secs}");
                return Ok(());
            }
            if processes && transport != "shm" {
                bail!("--processes works with --transport shm only");
            }
            let which = match transport.as_str() {
                "local" => Which::Local,
                "shm" => Which::Shm,
                "tcp" => Which::Tcp,
                other => bail!("--transport {other}: expected local, shm or tcp"),
            };
            for bytes in sizes_mb(&sizes)? {
                let secs = if processes {
                    shm_processes_seconds(ranks, bytes, iters)?
                } else {
                    allreduce_seconds(which, ranks, bytes, iters)?
                };
                let bus = 2.0 * (ranks as f64 - 1.0) / ranks as f64 * bytes as f64 / secs;
                let memcpy = memcpy_bandwidth(bytes.min(64 << 20));
                println!(
                    "{}",
                    serde_json::json!({"transport": transport, "ranks": ranks, "bytes": bytes,
                        "processes": processes,
                        "seconds": secs, "bus_gbps": bus / 1e9, "memcpy_gbps": memcpy / 1e9})
                );
            }
        }
        BenchCmd::Transport { sizes, iters } => {
            use shoal_comm::bench::{push_pull_seconds, Which};
            for bytes in sizes_mb(&sizes)? {
                let shm = push_pull_seconds(Which::Shm, bytes, iters)?;
                let tcp = push_pull_seconds(Which::Tcp, bytes, iters)?;
                let tls = push_pull_seconds(Which::TcpTls, bytes, iters)?;
                let grpc = shoal_control::bench::grpc_push_pull_seconds(bytes, iters)?;
                let gbs = |t: f64| 2.0 * bytes as f64 / t / 1e9;
                println!(
                    "{}",
                    serde_json::json!({"bytes": bytes, "shm_s": shm, "tcp_s": tcp, "tls_s": tls,
                        "grpc_s": grpc, "shm_gbps": gbs(shm), "tcp_gbps": gbs(tcp),
                        "tls_gbps": gbs(tls), "grpc_gbps": gbs(grpc)})
                );
            }
        }
        BenchCmd::CtrScale {
            rows,
            dim,
            rule,
            ps_keys,
            ps_steps,
        } => {
            let r = shoal_ctr::bench::ctr_scale(rows, dim, sparse_rule(rule), ps_keys, ps_steps)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        BenchCmd::PsShards {
            sizes,
            workers,
            iters,
        } => {
            for bytes in sizes_mb(&sizes)? {
                for plane in ["tcp", "shm"] {
                    for shards in [1usize, 2] {
                        let t = shoal_comm::bench::ps_step_seconds(
                            shards,
                            workers,
                            bytes,
                            iters,
                            plane == "shm",
                        )?;
                        println!(
                            "{}",
                            serde_json::json!({"bytes": bytes, "shards": shards, "workers": workers,
                                "plane": plane, "step_s": t,
                                "gbps": 2.0 * (workers * bytes) as f64 / t / 1e9})
                        );
                    }
                }
            }
        }
        BenchCmd::RnnLayer {
            cell,
            batch,
            hidden,
            input,
            len,
            iters,
            warmup,
            unfused,
        } => {
            let o = shoal_nmt::bench::RnnLayerOptions {
                cell,
                batch,
                hidden,
                input: input.unwrap_or(hidden),
                len,
                iters,
                warmup,
                fused: !unfused,
            };
            let r = shoal_nmt::bench::rnn_layer(&o)?;
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
}

/// Seconds per shared-memory allreduce of `bytes` with each of `ranks` ranks a process
/// (this program, `bench allreduce --rank R --job J`): the slowest rank's time.
pub(crate) fn shm_processes_seconds(ranks: usize, bytes: usize, iters: usize) -> Result<f64> {
    let exe = std::env::current_exe().context("finding this program's path")?;
    let job = format!("bench-{}-{}", std::process::id(), bytes);
    let children = (0..ranks)
        .map(|r| {
            std::process::Command::new(&exe)
                .args(["bench", "allreduce", "--ranks", &ranks.to_string()])
                .args(["--sizes", &bytes.to_string(), "--iters", &iters.to_string()])
                .args(["--rank", &r.to_string(), "--job", &job])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .with_context(|| format!("starting benchmark rank {r}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut worst = 0.0f64;
    for (r, c) in children.into_iter().enumerate() {
        let out = c
            .wait_with_output()
            .with_context(|| format!("waiting for rank {r}"))?;
        if !out.status.success() {
            bail!("benchmark rank {r} failed ({})", out.status);
        }
        let secs: f64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .with_context(|| format!("rank {r} printed no time"))?;
        worst = worst.max(secs);
    }
    Ok(worst)
}

/// The largest buffer a benchmark takes (`--sizes`, in MB).
const MAX_BENCH_MB: f64 = 4096.0;

/// `--sizes` in MB (comma-separated) as byte counts, each a multiple of 4 (whole f32s):
/// every size a positive number of at most 4 GiB, and four buffers of it (the ranks'
/// and their copies) within the memory available.
fn sizes_mb(sizes: &str) -> Result<Vec<usize>> {
    sizes
        .split(',')
        .map(|mb| {
            let v: f64 = mb
                .trim()
                .parse()
                .with_context(|| format!("--sizes: '{mb}' is not a number"))?;
            if !(v > 0.0 && v <= MAX_BENCH_MB) {
                bail!("--sizes: {mb} MB is not a size in (0, {MAX_BENCH_MB}]");
            }
            let bytes = ((v * 1048576.0) as usize / 4 * 4).max(4);
            let avail = shoal_runtime::sys::available_memory_bytes().unwrap_or(u64::MAX);
            if 4 * bytes as u64 > avail {
                bail!(
                    "--sizes: {mb} MB needs about {:.1} GB, {:.1} GB of memory is available",
                    4.0 * bytes as f64 / 1e9,
                    avail as f64 / 1e9
                );
            }
            Ok(bytes)
        })
        .collect()
}
