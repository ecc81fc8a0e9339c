//! Parameter-server behaviour against local references: sync push/pull equals the same
//! optimizer applied locally to the summed gradients (1 and 2 shards), sparse rows
//! likewise, async converges, a dead worker is reported, a wrong token is refused.

use shoal_comm::ps::{shard_range, PsClient, PsMode, PsServer, ShardConfig};
use shoal_optim::{Optimizer, OptimizerConfig, OptimizerKind};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

fn cfg(workers: usize, mode: PsMode, kind: OptimizerKind, dim: usize) -> ShardConfig {
    ShardConfig {
        workers,
        mode,
        optimizer: OptimizerConfig {
            kind,
            momentum: 0.9,
            ..Default::default()
        },
        lr: 0.05,
        average: false,
        sparse_dim: dim,
        token: "tok".into(),
        timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

fn start(m: usize, total: usize, c: &ShardConfig) -> (Vec<PsServer>, Vec<SocketAddr>) {
    let servers: Vec<PsServer> = (0..m)
        .map(|i| {
            let (a, b) = shard_range(total, m, i);
            PsServer::start(TcpListener::bind("127.0.0.1:0").unwrap(), b - a, c.clone()).unwrap()
        })
        .collect();
    let addrs = servers.iter().filter_map(|s| s.addr()).collect();
    (servers, addrs)
}

/// The shards' optimizer applied locally to the summed gradients of `c.workers`
/// workers, `steps` times from `init`: what a sync job must end with.
fn local_reference(c: &ShardConfig, init: &[f32], steps: u64) -> Vec<f32> {
    let mut p = init.to_vec();
    let mut o = Optimizer::new(c.optimizer, p.len()).unwrap();
    for s in 0..steps {
        let g: Vec<f32> = (0..p.len())
            .map(|i| (0..c.workers).map(|w| grad(w, s, i)).sum())
            .collect();
        o.step(c.lr, &mut p, &g).unwrap();
    }
    p
}

/// The largest absolute difference between two buffers.
fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn grad(worker: usize, step: u64, i: usize) -> f32 {
    (((worker * 7919 + step as usize * 104_729 + i * 31) % 97) as f32 - 48.0) / 48.0
}

#[test]
fn sync_push_pull_equals_local_optimizer_on_summed_gradients() {
    for kind in [
        OptimizerKind::Adam,
        OptimizerKind::Sgd,
        OptimizerKind::Adagrad,
    ] {
        for shards in [1, 2] {
            let (total, workers, steps) = (1001, 3, 5);
            let c = cfg(workers, PsMode::Sync, kind, 0);
            let (servers, addrs) = start(shards, total, &c);
            let init: Vec<f32> = (0..total).map(|i| (i as f32 * 0.01).sin()).collect();
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let (addrs, init) = (addrs.clone(), init.clone());
                    std::thread::spawn(move || {
                        let mut cl = PsClient::connect(&addrs, w, total, 0, "tok").unwrap();
                        if w == 0 {
                            cl.init(&init).unwrap();
                        }
                        let mut p = vec![0.0; total];
                        cl.pull(0, &mut p).unwrap();
                        for s in 0..steps {
                            let g: Vec<f32> = (0..total).map(|i| grad(w, s, i)).collect();
                            cl.push(s, &g, None).unwrap();
                            cl.pull(s + 1, &mut p).unwrap();
                        }
                        cl.close().unwrap();
                        p
                    })
                })
                .collect();
            let results: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            for s in servers {
                s.join().unwrap();
            }
            // Local reference: the same optimizer on the summed gradients.
            let p = local_reference(&c, &init, steps);
            for r in &results {
                let max = max_difference(r, &p);
                assert!(
                    max < 1e-5,
                    "{kind:?}, {shards} shards: max difference {max}"
                );
            }
        }
    }
}

#[test]
fn sparse_rows_match_local_updates() {
    let (dim, workers) = (4, 2);
    let c = cfg(workers, PsMode::Sync, OptimizerKind::Adagrad, dim);
    let (servers, addrs) = start(2, 0, &c);
    let keys: Vec<u64> = vec![3, 1 << 40, 77, 123_456_789_012];
    let mut cl0 = PsClient::connect(&addrs, 0, 0, dim, "tok").unwrap();
    let mut cl1 = PsClient::connect(&addrs, 1, 0, dim, "tok").unwrap();
    cl0.init(&[]).unwrap();
    let mut before = vec![0.0; keys.len() * dim];
    cl0.pull_sparse(&keys, &mut before).unwrap();
    // Worker 0 touches keys 0,1 (key 0 twice: deduplicated by summing); worker 1 keys 1,2.
    let g0 = [
        1.0f32, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 0.5, 1.0, 0.0, -1.0, 0.0,
    ];
    let k0 = [keys[0], keys[1], keys[0]];
    let g1 = [-1.0f32, -1.0, 2.0, 2.0, 0.1, 0.2, 0.3, 0.4];
    let k1 = [keys[1], keys[2]];
    let t = std::thread::spawn(move || {
        cl1.push(0, &[], Some((&k1, &g1))).unwrap();
        cl1.pull(1, &mut []).unwrap();
        cl1.close().unwrap();
    });
    cl0.push(0, &[], Some((&k0, &g0))).unwrap();
    cl0.pull(1, &mut []).unwrap();
    t.join().unwrap();
    let mut after = vec![0.0; keys.len() * dim];
    cl0.pull_sparse(&keys, &mut after).unwrap();
    cl0.close().unwrap();
    // Summed gradient per row, then one Adagrad step per touched row.
    let sums: [Vec<f32>; 4] = [
        vec![2.0, 2.0, 2.0, 4.0],
        vec![-0.5, -0.5, 2.5, 2.5],
        vec![0.1, 0.2, 0.3, 0.4],
        vec![0.0; 4],
    ];
    for (r, g) in sums.iter().enumerate() {
        let mut p = before[r * dim..(r + 1) * dim].to_vec();
        if r < 3 {
            let mut o = Optimizer::new(c.optimizer, dim).unwrap();
            o.step(c.lr, &mut p, g).unwrap();
        }
        for j in 0..dim {
            assert!((after[r * dim + j] - p[j]).abs() < 1e-6, "row {r}[{j}]");
        }
    }
    let rows: usize = servers.iter().map(|s| s.sparse_rows()).sum();
    assert_eq!(rows, 4, "rows are created on first touch, once");
    for s in servers {
        s.join().unwrap();
    }
}

/// A shard that evicts cold rows does exactly what one local table does with the same
/// updates, ticks and evictions: the idle rows go (and come back fresh when touched
/// again), the others keep their values.
#[test]
fn shards_evict_idle_rows_like_a_local_table() {
    use shoal_optim::{SparseRule, SparseTable};
    let dim = 3;
    let mut c = cfg(1, PsMode::Sync, OptimizerKind::Adagrad, dim);
    c.sparse_rule = Some(SparseRule::Adagrad { eps: 1e-8 });
    c.sparse_evict_idle = 3;
    c.sparse_init = (0.1, 7);
    let (servers, addrs) = start(2, 0, &c);
    let mut cl = PsClient::connect(&addrs, 0, 0, dim, "tok").unwrap();
    cl.init(&[]).unwrap();
    let mut local = SparseTable::new(dim, SparseRule::Adagrad { eps: 1e-8 }, 0.1, 7).unwrap();
    local.track_updates();
    let hot: Vec<u64> = (0..40).map(|i| i * 1_000_003).collect();
    let cold: Vec<u64> = (0..40).map(|i| (i + 1) << 33).collect();
    for step in 0..10u64 {
        // The cold keys are touched only at steps 0 and 8.
        let mut keys = hot.clone();
        if step == 0 || step == 8 {
            keys.extend(&cold);
        }
        let g: Vec<f32> = (0..keys.len() * dim).map(|i| grad(0, step, i)).collect();
        cl.push(step, &[], Some((&keys, &g))).unwrap();
        cl.pull(step + 1, &mut []).unwrap();
        local.apply(&keys, &g, c.lr).unwrap();
        local.tick();
        if (step + 1) % 3 == 0 {
            local.evict_idle(3).unwrap();
        }
        let rows: usize = servers.iter().map(|s| s.sparse_rows()).sum();
        assert_eq!(rows, local.len(), "step {step}");
    }
    let all: Vec<u64> = hot.iter().chain(&cold).copied().collect();
    let mut got = vec![0.0; all.len() * dim];
    cl.pull_sparse(&all, &mut got).unwrap();
    let mut want = vec![0.0; all.len() * dim];
    local.peek(&all, &mut want);
    assert_eq!(got, want);
    cl.close().unwrap();
    for s in servers {
        s.join().unwrap();
    }
}

#[test]
fn async_training_converges() {
    let (total, workers) = (64, 2);
    let mut c = cfg(
        workers,
        PsMode::Async {
            max_staleness: Some(2),
        },
        OptimizerKind::Sgd,
        0,
    );
    c.optimizer.momentum = 0.0;
    c.lr = 0.05;
    let (servers, addrs) = start(2, total, &c);
    let target: Vec<f32> = (0..total).map(|i| i as f32 * 0.1 - 3.0).collect();
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (addrs, target) = (addrs.clone(), target.clone());
            std::thread::spawn(move || {
                let mut cl = PsClient::connect(&addrs, w, total, 0, "tok").unwrap();
                if w == 0 {
                    cl.init(&vec![0.0; total]).unwrap();
                }
                let mut p = vec![0.0; total];
                for s in 0..200u64 {
                    cl.pull(s, &mut p).unwrap();
                    let g: Vec<f32> = p.iter().zip(&target).map(|(x, t)| 2.0 * (x - t)).collect();
                    cl.push(s, &g, None).unwrap();
                }
                cl.pull(200, &mut p).unwrap();
                cl.close().unwrap();
                p
            })
        })
        .collect();
    for h in handles {
        let p = h.join().unwrap();
        let err = p
            .iter()
            .zip(&target)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-2, "async did not converge: max error {err}");
    }
    for s in servers {
        s.join().unwrap();
    }
}

#[test]
fn dead_worker_is_reported_and_wrong_token_refused() {
    let total = 10;
    let mut c = cfg(2, PsMode::Sync, OptimizerKind::Sgd, 0);
    // Far longer than noticing a closed connection takes: a report that came from the
    // timeout says "timed out", and is told apart below.
    c.timeout = Duration::from_secs(60);
    let (servers, addrs) = start(1, total, &c);
    let e = PsClient::connect(&addrs, 0, total, 0, "wrong")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("token"), "{e}");
    let mut a = PsClient::connect(&addrs, 0, total, 0, "tok").unwrap();
    let b = PsClient::connect(&addrs, 1, total, 0, "tok").unwrap();
    a.init(&vec![0.0; total]).unwrap();
    a.push(0, &vec![1.0; total], None).unwrap();
    drop(b); // worker 1 dies without pushing or saying goodbye
    let e = a.pull(1, &mut vec![0.0; total]).unwrap_err().to_string();
    assert!(e.contains("worker 1"), "{e}");
    // Reported as the shard's failure (its connection to worker 1 closed), not as a
    // pull that timed out waiting for worker 1's push.
    assert!(
        e.contains("shard failed") && !e.contains("timed out"),
        "not reported as worker 1's death: {e}"
    );
    for s in servers {
        assert!(s.join().is_err());
    }
}

/// Weighted pushes with a per-step learning rate give the local optimizer applied to
/// the weighted mean; the state fetched after step 2 restored into fresh shards
/// continues exactly like the uninterrupted servers.
#[test]
fn weighted_sync_and_state_restore_match_local_optimizer() {
    let (total, workers) = (517, 2);
    let weights = [3.0f32, 5.0];
    let lr = |s: u64| 0.01 * (s + 1) as f32;
    let mut c = cfg(workers, PsMode::Sync, OptimizerKind::Adam, 0);
    c.average = true;
    let init: Vec<f32> = (0..total).map(|i| (i as f32 * 0.03).cos()).collect();
    // Local reference.
    let mut reference = init.clone();
    let mut opt = Optimizer::new(c.optimizer, total).unwrap();
    for s in 0..4u64 {
        let g: Vec<f32> = (0..total)
            .map(|i| (weights[0] * grad(0, s, i) + weights[1] * grad(1, s, i)) / 8.0)
            .collect();
        opt.step(lr(s), &mut reference, &g).unwrap();
    }
    // Runs steps `from..to` on fresh shards started from `init` or a saved state; returns
    // the final parameters and the state after the last step.
    let run = |from: u64, to: u64, restore: Option<shoal_comm::ps::PsState>| {
        let (servers, addrs) = start(2, total, &c);
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (addrs, init, restore) = (addrs.clone(), init.clone(), restore.clone());
                std::thread::spawn(move || {
                    let mut cl = PsClient::connect(&addrs, w, total, 0, "tok").unwrap();
                    if w == 0 {
                        match &restore {
                            Some(st) => cl.init_state(st).unwrap(),
                            None => cl.init(&init).unwrap(),
                        }
                    }
                    let mut p = vec![0.0; total];
                    for s in from..to {
                        let g: Vec<f32> = (0..total).map(|i| grad(w, s, i)).collect();
                        cl.push_weighted(s, lr(s), weights[w], &g, None).unwrap();
                        cl.pull(s + 1, &mut p).unwrap();
                    }
                    let st = (w == 0).then(|| cl.state().unwrap());
                    cl.close().unwrap();
                    (p, st)
                })
            })
            .collect();
        let outs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for s in servers {
            s.join().unwrap();
        }
        let (p, st) = outs.into_iter().next().unwrap();
        (p, st.unwrap())
    };
    let close = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-6 * (1.0 + y.abs()))
    };
    let (whole, _) = run(0, 4, None);
    assert!(
        close(&whole, &reference),
        "4 steps differ from the local optimizer"
    );
    let (half, st) = run(0, 2, None);
    assert_eq!(st.applied, 2);
    assert_eq!(st.optimizer_steps, 2);
    assert_eq!(st.params, half);
    let names: Vec<&str> = st.buffers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["exp_avg", "exp_avg_sq"]);
    let (resumed, _) = run(2, 4, Some(st));
    assert_eq!(resumed, whole, "restored shards did not continue exactly");
}

/// Strangers on a shard's port do not harm the job: a connection that closes without a
/// byte, one that sends garbage, and one that stays silent (held open throughout) are
/// refused, and the real worker trains and leaves; the shard ends cleanly. An empty job
/// token is refused on both sides.
#[test]
fn strangers_on_a_shard_port_are_refused_and_the_job_goes_on() {
    use std::io::Write;
    let total = 8;
    let c = cfg(1, PsMode::Sync, OptimizerKind::Sgd, 0);
    let (servers, addrs) = start(1, total, &c);
    drop(std::net::TcpStream::connect(addrs[0]).unwrap());
    let mut garbage = std::net::TcpStream::connect(addrs[0]).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let silent = std::net::TcpStream::connect(addrs[0]).unwrap();
    let mut cl = PsClient::connect(&addrs, 0, total, 0, "tok").unwrap();
    cl.init(&vec![1.0; total]).unwrap();
    cl.push(0, &vec![0.5; total], None).unwrap();
    let mut p = vec![0.0; total];
    cl.pull(1, &mut p).unwrap();
    // SGD with momentum 0.9 at lr 0.05: the first step is p - lr * g.
    assert!(
        p.iter().all(|&x| (x - (1.0 - 0.05 * 0.5)).abs() < 1e-6),
        "{p:?}"
    );
    cl.close().unwrap();
    for s in servers {
        s.join().unwrap();
    }
    drop((garbage, silent));

    let mut empty = cfg(1, PsMode::Sync, OptimizerKind::Sgd, 0);
    empty.token = String::new();
    let e = PsServer::start(TcpListener::bind("127.0.0.1:0").unwrap(), 4, empty)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("token"), "{e}");
}

/// Which data plane a test job's shards and workers meet on.
#[derive(Debug, Clone, Copy)]
enum Plane {
    Tcp,
    Shm,
    Local,
}

/// Starts `m` shards on `plane` and returns them with a function that opens worker
/// `w`'s client.
#[allow(clippy::type_complexity)]
fn start_on(
    plane: Plane,
    m: usize,
    total: usize,
    dim: usize,
    c: &ShardConfig,
    job: &str,
) -> (Vec<PsServer>, Box<dyn Fn(usize) -> PsClient + Send + Sync>) {
    use shoal_comm::local::LocalTransport;
    use shoal_comm::ps::{shm_link, LinkOpener, ShardPlane};
    use shoal_comm::Transport;
    use std::sync::Mutex;
    let workers = c.workers;
    let wait = Duration::from_secs(20);
    match plane {
        Plane::Tcp => {
            let (servers, addrs) = start(m, total, c);
            let open = move |w| PsClient::connect(&addrs, w, total, dim, "tok").unwrap();
            (servers, Box::new(open))
        }
        Plane::Shm => {
            let servers = (0..m)
                .map(|i| {
                    let (a, b) = shard_range(total, m, i);
                    let openers: Vec<LinkOpener> = (0..workers)
                        .map(|w| {
                            let job = job.to_string();
                            Box::new(move || shm_link(&job, i, w, 0, wait)) as LinkOpener
                        })
                        .collect();
                    PsServer::start_on(ShardPlane::Links(openers), b - a, c.clone()).unwrap()
                })
                .collect();
            let job = job.to_string();
            let open = move |w| {
                let links = (0..m)
                    .map(|i| shm_link(&job, i, w, 1, wait).unwrap())
                    .collect();
                PsClient::over(links, w, total, dim, "tok").unwrap()
            };
            (servers, Box::new(open))
        }
        Plane::Local => {
            // ends[w][i]: worker w's end of its pair with shard i.
            let mut ends: Vec<Vec<Option<Box<dyn Transport>>>> =
                (0..workers).map(|_| Vec::new()).collect();
            let servers = (0..m)
                .map(|i| {
                    let (a, b) = shard_range(total, m, i);
                    let openers: Vec<LinkOpener> = (0..workers)
                        .map(|w| {
                            let mut pair = LocalTransport::group(2).into_iter();
                            let shard_end = pair.next().unwrap();
                            ends[w].push(Some(Box::new(pair.next().unwrap())));
                            Box::new(move || Ok(Box::new(shard_end) as Box<dyn Transport>))
                                as LinkOpener
                        })
                        .collect();
                    PsServer::start_on(ShardPlane::Links(openers), b - a, c.clone()).unwrap()
                })
                .collect();
            let ends = Mutex::new(ends);
            let open = move |w: usize| {
                let links = ends.lock().unwrap()[w]
                    .iter_mut()
                    .map(|e| e.take().unwrap())
                    .collect();
                PsClient::over(links, w, total, dim, "tok").unwrap()
            };
            (servers, Box::new(open))
        }
    }
}

/// The parameter server runs over any transport: the same sync job (dense and sparse
/// rows, Adam, 2 shards, 2 workers) over TCP, shared-memory links and in-process links
/// ends with the same parameters and rows to the bit (two pushes sum the same in
/// either order), and its dense part equals the optimizer applied locally.
#[test]
fn the_same_job_over_tcp_shared_memory_and_threads_gives_the_same_parameters() {
    let (total, dim, workers, steps) = (333, 3, 2, 4);
    let c = cfg(workers, PsMode::Sync, OptimizerKind::Adam, dim);
    let init: Vec<f32> = (0..total).map(|i| (i as f32 * 0.02).cos()).collect();
    let keys: Vec<u64> = (0..12u64).map(|k| k * 0x9E37_79B9 + 5).collect();
    let run = |plane: Plane| {
        let job = format!("ps-plane-test-{}-{plane:?}", std::process::id());
        let (servers, open) = start_on(plane, 2, total, dim, &c, &job);
        let open = std::sync::Arc::new(open);
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (open, init, keys) = (open.clone(), init.clone(), keys.clone());
                std::thread::spawn(move || {
                    let mut cl = open(w);
                    if w == 0 {
                        cl.init(&init).unwrap();
                    }
                    let mut p = vec![0.0; total];
                    let mine: Vec<u64> = keys.iter().copied().skip(w).step_by(2).collect();
                    let mut rows = vec![0.0; mine.len() * dim];
                    for s in 0..steps {
                        cl.pull_sparse(&mine, &mut rows).unwrap();
                        let g: Vec<f32> = (0..total).map(|i| grad(w, s, i)).collect();
                        let rg: Vec<f32> = rows.iter().map(|r| r - 0.25).collect();
                        cl.push(s, &g, Some((&mine, &rg))).unwrap();
                        cl.pull(s + 1, &mut p).unwrap();
                    }
                    let mut all = vec![0.0; keys.len() * dim];
                    cl.peek_sparse(&keys, &mut all).unwrap();
                    cl.close().unwrap();
                    (p, all)
                })
            })
            .collect();
        let outs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for s in servers {
            s.join().unwrap();
        }
        outs.into_iter().next().unwrap()
    };
    let tcp = run(Plane::Tcp);
    let max = max_difference(&tcp.0, &local_reference(&c, &init, steps));
    assert!(
        max < 1e-5,
        "TCP job differs from the local optimizer by {max}"
    );
    for plane in [Plane::Shm, Plane::Local] {
        assert_eq!(run(plane), tcp, "{plane:?} differs from TCP");
    }
}

/// A worker that lets go of its shared-memory links without saying goodbye fails the
/// shard when it does (its rings say so), and the other worker's pull names it: reported
/// as the shard's failure, not as a pull that waited out the shard's minute for worker
/// 1's push.
#[test]
fn a_worker_gone_from_shared_memory_is_reported() {
    let total = 10;
    let mut c = cfg(2, PsMode::Sync, OptimizerKind::Sgd, 0);
    c.timeout = Duration::from_secs(60);
    let job = format!("ps-shm-gone-{}", std::process::id());
    let (servers, open) = start_on(Plane::Shm, 1, total, 0, &c, &job);
    let open = std::sync::Arc::new(open);
    let second = {
        let open = open.clone();
        std::thread::spawn(move || open(1))
    };
    let mut a = open(0);
    let b = second.join().unwrap();
    a.init(&vec![0.0; total]).unwrap();
    a.push(0, &vec![1.0; total], None).unwrap();
    drop(b);
    let e = a.pull(1, &mut vec![0.0; total]).unwrap_err().to_string();
    assert!(e.contains("worker 1") && e.contains("shard failed"), "{e}");
    assert!(!e.contains("timed out"), "{e}");
    for s in servers {
        assert!(s.join().is_err());
    }
}
