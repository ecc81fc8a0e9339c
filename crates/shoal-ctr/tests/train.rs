//! CTR training end to end on a synthetic click log: the held-out AUC gets close to the
//! planted model's (the best achievable), every model kind learns, and a saved model
//! loaded for scoring gives exactly the trainer's predictions.

use shoal_ctr::model::CtrKind;
use shoal_ctr::trainer::{CtrPredictor, CtrTrainConfig, CtrTrainer};
use shoal_data::ctr::{write_synth, SynthConfig};
use std::path::{Path, PathBuf};

/// Writes a synthetic click log of `rows` rows into `dir`; returns its path (the
/// planted probabilities are beside it, with `.p` appended).
fn synth(dir: &Path, rows: usize, fields: usize, ids_per_field: u64) -> PathBuf {
    let data = dir.join("s.csv");
    let syn = SynthConfig {
        rows,
        fields,
        ids_per_field,
        ..Default::default()
    };
    write_synth(&syn, &data, &dir.join("s.csv.p")).unwrap();
    data
}

#[test]
fn ctr_models_learn_the_planted_model_and_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 600_000, 6, 30);
    let probs = d.path().join("s.csv.p");
    for kind in [CtrKind::Lr, CtrKind::Fm, CtrKind::Deepfm, CtrKind::WideDeep] {
        let cfg = CtrTrainConfig {
            kind,
            dim: 4,
            hidden: vec![16],
            data: data.clone(),
            planted: Some(probs.clone()),
            sparse_lr: 0.02,
            epochs: 2,
            ..Default::default()
        };
        let mut t = CtrTrainer::new(cfg).unwrap();
        let e = t.run(|_| {}).unwrap();
        eprintln!("{kind:?}: AUC {} planted {:?}", e.auc, e.planted_auc);
        let planted = e.planted_auc.unwrap();
        // LR and Wide & Deep's wide part miss the planted pairwise terms (the MLP has
        // to learn them from few samples); FM and DeepFM model them directly.
        let slack = match kind {
            CtrKind::Lr => 0.04,
            CtrKind::WideDeep => 0.03,
            _ => 0.015,
        };
        assert!(
            e.auc > planted - slack,
            "{kind:?}: held-out AUC {} vs planted {planted}",
            e.auc
        );
        // 6 fields x 30 ids: no more rows than that.
        assert!(t.table.len() <= 180, "{} rows", t.table.len());
        let out = d.path().join(format!("{kind:?}"));
        t.save(&out).unwrap();
        let mut p = CtrPredictor::load(&out).unwrap();
        let (rows, _, _) =
            shoal_data::ctr::read_csv(&data, shoal_data::ctr::BadRows::Fail).unwrap();
        let few = rows.select(&(0..500).collect::<Vec<_>>());
        let idx: Vec<usize> = (0..500).collect();
        assert_eq!(p.predict(&few).unwrap(), t.predict(&few, &idx).unwrap());
    }
}

/// 2 workers x batch 32 against 2 sync parameter-server shards end with the dense
/// parameters and rows of 1 process x batch 64 after the same updates.
#[test]
fn sync_parameter_servers_equal_one_process_on_the_global_batch() {
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 20_000, 5, 40);
    // Without eviction, and with the shards evicting cold rows as the one process does.
    for evict in [0, 5] {
        sync_ps_run(d.path(), &data, evict);
    }
}

fn sync_ps_run(dir: &Path, data: &Path, evict: u64) {
    use shoal_comm::ps::PsClient;
    use shoal_runtime::exchange::{Attachment, Exchange};
    let data = data.to_path_buf();
    let cfg = |batch| CtrTrainConfig {
        evict_idle_steps: evict,
        kind: CtrKind::Deepfm,
        dim: 4,
        hidden: vec![8],
        data: data.clone(),
        batch_size: batch,
        max_steps: 25,
        ..Default::default()
    };
    let mut one = CtrTrainer::new(cfg(64)).unwrap();
    one.run(|_| {}).unwrap();
    let c = cfg(32);
    let width = one.model.cfg.row_width();
    let total = one.dense().len();
    let (servers, addrs) = start_shards(&c, total, width);
    // The rows the single process touched, to read back from the shards.
    let keys = std::sync::Arc::new(one.table.rows().0.to_vec());
    let saved = dir.join(format!("from-ps-{evict}"));
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let (c, addrs, keys, saved) = (c.clone(), addrs.clone(), keys.clone(), saved.clone());
            std::thread::spawn(move || {
                let mut t = CtrTrainer::new(c).unwrap();
                let client = PsClient::connect(&addrs, rank, total, width, "t").unwrap();
                t.attach(Attachment::new(rank, 2, Exchange::Ps(client)).unwrap())
                    .unwrap();
                t.run(|_| {}).unwrap();
                let mut rows = vec![0.0; keys.len() * width];
                t.pull_rows(&keys, &mut rows).unwrap();
                let dense = t.dense().to_vec();
                if rank == 0 {
                    t.save(&saved).unwrap();
                }
                t.detach().unwrap();
                (dense, rows)
            })
        })
        .collect();
    let outs: Vec<(Vec<f32>, Vec<f32>)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    if evict > 0 {
        // The shards hold the rows the one process kept (plus those just pulled back).
        let held: usize = servers.iter().map(|s| s.sparse_rows()).sum();
        assert_eq!(
            held,
            keys.len(),
            "rows on the shards with eviction every {evict}"
        );
    }
    for s in servers {
        s.join().unwrap();
    }
    let rel = |a: &[f32], b: &[f32]| {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den).sqrt()
    };
    let mut local = vec![0.0; keys.len() * width];
    one.pull_rows(&keys, &mut local).unwrap();
    assert!(keys.len() > 100, "only {} rows touched", keys.len());
    for (rank, (dense, rows)) in outs.iter().enumerate() {
        let r = rel(dense, one.dense());
        assert!(
            r < 1e-5,
            "evict {evict}: worker {rank}: dense parameters differ by {r:e}"
        );
        let r = rel(rows, &local);
        assert!(
            r < 1e-5,
            "evict {evict}: worker {rank}: sparse rows differ by {r:e}"
        );
    }
    // The model saved from the shards scores like the single process's.
    let (rows, _, _) = shoal_data::ctr::read_csv(&data, shoal_data::ctr::BadRows::Fail).unwrap();
    let few = rows.select(&(0..300).collect::<Vec<_>>());
    let mine = CtrPredictor::load(&saved).unwrap().predict(&few).unwrap();
    let theirs = one.predict(&few, &(0..300).collect::<Vec<_>>()).unwrap();
    let r = rel(&mine, &theirs);
    assert!(r < 1e-5, "saved model's predictions differ by {r:e}");
}

/// The frequency filter: keys seen in fewer than `min_count` training rows share their
/// field's rare row, so the table holds only the frequent keys plus one row per field;
/// a saved model maps unseen keys the same way when scoring.
#[test]
fn frequency_filter_keeps_frequent_keys_only() {
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 30_000, 4, 100_000);
    let (rows, _, _) = shoal_data::ctr::read_csv(&data, shoal_data::ctr::BadRows::Fail).unwrap();
    let cfg = CtrTrainConfig {
        kind: CtrKind::Fm,
        dim: 4,
        data: data.clone(),
        min_count: 5,
        // A whole epoch: every frequent key gets its row.
        epochs: 1,
        ..Default::default()
    };
    let mut t = CtrTrainer::new(cfg.clone()).unwrap();
    t.run(|_| {}).unwrap();
    // Reference count of keys with >= 5 rows among the training rows.
    let (train, valid) = rows.split(cfg.valid_fraction, cfg.seed);
    let mut counts = std::collections::HashMap::new();
    for &i in &train {
        for &k in rows.row(i) {
            *counts.entry(k).or_insert(0usize) += 1;
        }
    }
    let frequent = counts.values().filter(|&&c| c >= 5).count();
    let all = counts.len();
    assert!(
        frequent < all / 2,
        "{frequent} of {all} keys frequent: the test needs rare ones"
    );
    assert!(
        t.table.len() <= frequent + 4,
        "{} rows for {frequent} frequent keys",
        t.table.len()
    );
    let out = d.path().join("m");
    t.save(&out).unwrap();
    let held = rows.select(&valid);
    let mut p = CtrPredictor::load(&out).unwrap();
    let ours: Vec<f32> = t.predict_held_out().unwrap();
    assert!(
        p.predict(&held).unwrap() == ours,
        "the saved model scores differently"
    );
}

/// A run stopped after one epoch, saved and resumed for a second ends exactly where an
/// uninterrupted two-epoch run does (dense parameters, rows, optimizer state, data
/// order).
#[test]
fn stopped_and_resumed_ctr_run_matches_an_uninterrupted_one() {
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 5_000, 4, 60);
    let cfg = CtrTrainConfig {
        kind: CtrKind::Deepfm,
        dim: 4,
        hidden: vec![8],
        data,
        batch_size: 64,
        epochs: 2,
        sparse_rule: shoal_optim::SparseRule::LazyAdam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
        ..Default::default()
    };
    let mut whole = CtrTrainer::new(cfg.clone()).unwrap();
    whole.run(|_| {}).unwrap();
    let mut first = CtrTrainer::new(CtrTrainConfig {
        epochs: 1,
        max_steps: 30, // stop inside the first epoch's 71 steps
        ..cfg.clone()
    })
    .unwrap();
    first.run(|_| {}).unwrap();
    let ck = d.path().join("ck");
    first.save(&ck).unwrap();
    let mut rest = CtrTrainer::resume(&ck, |c| {
        c.epochs = 2;
        c.max_steps = 0;
    })
    .unwrap();
    rest.run(|_| {}).unwrap();
    assert!(
        rest.dense() == whole.dense(),
        "dense parameters differ after resume"
    );
    let (k1, v1) = whole.table.rows();
    let (k2, v2) = rest.table.rows();
    let sorted = |k: Vec<u64>, v: Vec<f32>| {
        let w = v.len() / k.len().max(1);
        let mut rows: Vec<(u64, Vec<f32>)> = k
            .into_iter()
            .enumerate()
            .map(|(i, k)| (k, v[i * w..(i + 1) * w].to_vec()))
            .collect();
        rows.sort_by_key(|r| r.0);
        rows
    };
    assert!(sorted(k1, v1) == sorted(k2, v2), "rows differ after resume");
}

/// Runs 2 CTR workers (threads) against 2 fresh sync shards up to `max_steps`, from
/// scratch or from a checkpoint; worker 0 saves the model to `save` if given. Returns
/// worker 0's dense parameters and the rows of `keys` read from the shards.
fn ps_job(
    cfg: &CtrTrainConfig,
    resume: Option<std::path::PathBuf>,
    save: Option<std::path::PathBuf>,
    keys: std::sync::Arc<Vec<u64>>,
) -> (Vec<f32>, Vec<f32>) {
    use shoal_comm::ps::PsClient;
    use shoal_runtime::exchange::{Attachment, Exchange};
    let probe = CtrTrainer::new(cfg.clone()).unwrap();
    let (total, width) = (probe.dense().len(), probe.model.cfg.row_width());
    let (servers, addrs) = start_shards(cfg, total, width);
    let hs: Vec<_> = (0..2)
        .map(|rank| {
            let (cfg, addrs, keys) = (cfg.clone(), addrs.clone(), keys.clone());
            let (resume, save) = (resume.clone(), save.clone());
            std::thread::spawn(move || {
                let mut t = match &resume {
                    Some(p) => CtrTrainer::resume(p, |c| c.max_steps = cfg.max_steps).unwrap(),
                    None => CtrTrainer::new(cfg).unwrap(),
                };
                let c = PsClient::connect(&addrs, rank, total, width, "t").unwrap();
                t.attach(Attachment::new(rank, 2, Exchange::Ps(c)).unwrap())
                    .unwrap();
                t.run(|_| {}).unwrap();
                let mut rows = vec![0.0; keys.len() * width];
                t.pull_rows(&keys, &mut rows).unwrap();
                if rank == 0 {
                    if let Some(s) = &save {
                        t.save(s).unwrap();
                    }
                }
                let dense = t.dense().to_vec();
                t.detach().unwrap();
                (dense, rows)
            })
        })
        .collect();
    let outs: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    for s in servers {
        s.join().unwrap();
    }
    outs.into_iter().next().unwrap()
}

/// A job on parameter servers saved after 20 updates and resumed on fresh shards (rows,
/// the MLP's Adam state and the step restored into them) ends like an uninterrupted one.
#[test]
fn parameter_server_job_resumes_on_fresh_shards() {
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 8_000, 4, 50);
    let cfg = |steps| CtrTrainConfig {
        kind: CtrKind::Deepfm,
        dim: 4,
        hidden: vec![8],
        data: data.clone(),
        batch_size: 32,
        max_steps: steps,
        ..Default::default()
    };
    let mut one = CtrTrainer::new(cfg(40)).unwrap();
    one.run(|_| {}).unwrap();
    let keys = std::sync::Arc::new(one.table.rows().0);
    let (whole_dense, whole_rows) = ps_job(&cfg(40), None, None, keys.clone());
    let ck = d.path().join("ck");
    ps_job(&cfg(20), None, Some(ck.clone()), keys.clone());
    let (dense, rows) = ps_job(&cfg(40), Some(ck), None, keys.clone());
    let rel = |a: &[f32], b: &[f32]| {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den).sqrt()
    };
    let (rd, rr) = (rel(&dense, &whole_dense), rel(&rows, &whole_rows));
    assert!(
        rd < 1e-5 && rr < 1e-5,
        "resumed job differs: dense {rd:e}, rows {rr:e}"
    );
}

/// Eviction bounds the table: with rows dropped after 10 idle updates, a log with a
/// long tail of ids keeps far fewer rows than it touches, and still learns (rows of rare
/// ids evicted and relearned cost some AUC: the trade of a memory bound).
#[test]
fn eviction_bounds_the_table() {
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 60_000, 4, 3_000);
    let run = |evict| {
        let mut t = CtrTrainer::new(CtrTrainConfig {
            kind: CtrKind::Fm,
            dim: 4,
            data: data.clone(),
            evict_idle_steps: evict,
            ..Default::default()
        })
        .unwrap();
        let e = t.run(|_| {}).unwrap();
        (t.table.len(), e.auc)
    };
    let (all, auc_all) = run(0);
    let (kept, auc_kept) = run(10);
    assert!(kept * 3 < all * 2, "eviction kept {kept} of {all} rows");
    eprintln!("rows {kept} of {all}, AUC {auc_kept} vs {auc_all}");
    assert!(
        auc_all > 0.55 && auc_kept > 0.53,
        "AUC {auc_kept} vs {auc_all}"
    );
}

/// Two sync parameter-server shards for `cfg`'s model (`total` dense values, rows of
/// `width`), and their addresses.
fn start_shards(
    cfg: &CtrTrainConfig,
    total: usize,
    width: usize,
) -> (Vec<shoal_comm::ps::PsServer>, Vec<std::net::SocketAddr>) {
    use shoal_comm::ps::{shard_range, PsMode, PsServer};
    let shard_cfg = shoal_ctr::trainer::ctr_shard_config(cfg, width, 2, PsMode::Sync, "t");
    let servers: Vec<PsServer> = (0..2)
        .map(|i| {
            let (a, b) = shard_range(total, 2, i);
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            PsServer::start(l, b - a, shard_cfg.clone()).unwrap()
        })
        .collect();
    let addrs = servers.iter().filter_map(|s| s.addr()).collect();
    (servers, addrs)
}

/// A saved model whose bytes were flipped (here: inside its tensors) is refused with the
/// file named and the checksum's word, not loaded to predict NaN.
#[test]
fn a_corrupt_model_file_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 2_000, 4, 30);
    let mut t = CtrTrainer::new(CtrTrainConfig {
        kind: CtrKind::Deepfm,
        dim: 4,
        hidden: vec![8],
        data,
        max_steps: 3,
        ..Default::default()
    })
    .unwrap();
    t.run(|_| {}).unwrap();
    let out = d.path().join("m");
    t.save(&out).unwrap();
    assert!(CtrPredictor::load(&out).is_ok());
    let file = out.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    for b in &mut bytes[n - 16..n - 8] {
        *b ^= 0x5a;
    }
    std::fs::write(&file, &bytes).unwrap();
    let e = CtrPredictor::load(&out).err().unwrap().to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("corrupt"),
        "{e}"
    );
}
