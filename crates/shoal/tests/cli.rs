//! The real `shoal` binary, run in fresh temp directories: the train -> translate ->
//! eval flow, resume, and bad input (each a clear error naming what and where, never a
//! panic).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/multi30k");

fn shoal(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
    c.current_dir(dir)
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        // Job tokens kept by `launch` stay in the test's directory.
        .env("SHOAL_TOKEN_DIR", dir.join(".tokens"))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    if let Some(s) = stdin {
        // The command may fail (and close stdin) before reading it all.
        let _ = child.stdin.take().unwrap().write_all(s.as_bytes());
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

/// A failure with a message containing every one of `needles`, and no panic.
fn assert_clear_error(o: &Output, needles: &[&str]) {
    let err = text(&o.stderr);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "'{n}' not in error: {err}");
    }
}

fn slice(dir: &Path, n: usize) {
    for f in ["train.en", "train.de", "val.en", "val.de"] {
        let t = std::fs::read_to_string(Path::new(DATA).join(f)).unwrap();
        let lines: Vec<&str> = t.lines().take(n).collect();
        std::fs::write(dir.join(f), lines.join("\n") + "\n").unwrap();
    }
}

const TINY: &[&str] = &[
    "--set",
    "data.src_vocab=200",
    "--set",
    "data.tgt_vocab=200",
    "--set",
    "model.embed=16",
    "--set",
    "model.hidden=16",
    "--set",
    "model.layers=1",
    "--batch-size",
    "16",
    "--set",
    "eval.samples=1",
];

fn train(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "nmt", "--data-dir", ".", "--out", "run"];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    shoal(dir, &args, None)
}

#[test]
fn train_translate_eval_and_resume() {
    let d = tempfile::tempdir().unwrap();
    slice(d.path(), 64);
    let o = train(d.path(), &["--max-steps", "3", "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains("validation BLEU"), "{out}");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["steps"], 3);
    // The progress counts the steps that run (64 pairs in batches of 16: 4 per epoch,
    // 32 over the default 8 epochs), not the schedule's.
    assert!(
        text(&o.stderr).contains("3 steps (max_steps stops it at step 3 of the 32"),
        "{}",
        text(&o.stderr)
    );
    // TensorBoard events in the run directory (the format: shoal-runtime's test against
    // TensorBoard's own reader): each update's scalars and the final scores.
    assert!(
        text(&o.stderr).contains("tensorboard --logdir run"),
        "{}",
        text(&o.stderr)
    );
    // (event_tags: exactly one event file, and how often a tag is in it.)
    let run = d.path().join("run");
    assert_eq!(event_tags(&run, "train/loss"), 3);
    assert_eq!(event_tags(&run, "train/lr"), 3);
    assert_eq!(event_tags(&run, "final/bleu"), 1);

    // Translate: one output line per input line, greedy and beam.
    for beam in ["1", "3"] {
        let o = shoal(
            d.path(),
            &["translate", "--checkpoint", "run", "--beam", beam],
            Some("A man.\nTwo dogs run.\n\n"),
        );
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert_eq!(text(&o.stdout).lines().count(), 3);
    }

    // Resume continues from step 3.
    let o = shoal(
        d.path(),
        &[
            "train",
            "nmt",
            "--resume",
            "run",
            "--max-steps",
            "5",
            "--no-eval",
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let last: serde_json::Value =
        serde_json::from_str(text(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["steps"], 5);
    assert!(text(&o.stderr).contains("resuming at step 3"));

    // eval: identical files score 100; translating val with the checkpoint works.
    let o = shoal(
        d.path(),
        &["eval", "--hyp", "val.de", "--ref", "val.de", "--json"],
        None,
    );
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert!((v["bleu"].as_f64().unwrap() - 100.0).abs() < 1e-9);
    let o = shoal(
        d.path(),
        &[
            "eval",
            "--checkpoint",
            "run",
            "--src",
            "val.en",
            "--ref",
            "val.de",
            "--out",
            "hyp.txt",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).starts_with("BLEU = "));
    assert_eq!(
        std::fs::read_to_string(d.path().join("hyp.txt"))
            .unwrap()
            .lines()
            .count(),
        64
    );
}

#[test]
fn missing_file_is_named() {
    let d = tempfile::tempdir().unwrap();
    slice(d.path(), 8);
    std::fs::remove_file(d.path().join("train.de")).unwrap();
    assert_clear_error(&train(d.path(), &["--max-steps", "1"]), &["train.de"]);
}

#[test]
fn mismatched_line_counts_are_named() {
    let d = tempfile::tempdir().unwrap();
    slice(d.path(), 8);
    std::fs::write(d.path().join("train.de"), "eins\nzwei\n").unwrap();
    assert_clear_error(
        &train(d.path(), &["--max-steps", "1"]),
        &["train.en", "train.de", "8", "2"],
    );
}

#[test]
fn empty_line_is_named_with_its_line_number() {
    let d = tempfile::tempdir().unwrap();
    slice(d.path(), 8);
    let t = std::fs::read_to_string(d.path().join("train.de")).unwrap();
    let mut lines: Vec<&str> = t.lines().collect();
    lines[4] = "";
    std::fs::write(d.path().join("train.de"), lines.join("\n") + "\n").unwrap();
    assert_clear_error(&train(d.path(), &["--max-steps", "1"]), &["train.de", "5"]);
    // ... and skipped on request.
    let o = train(
        d.path(),
        &[
            "--max-steps",
            "1",
            "--set",
            "data.skip_empty=true",
            "--no-eval",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
}

#[test]
fn invalid_utf8_is_named_with_its_line_number() {
    let d = tempfile::tempdir().unwrap();
    slice(d.path(), 8);
    let mut bytes = b"one\ntwo\nthr\xffee\n".to_vec();
    bytes.extend(b"4\n5\n6\n7\n8\n");
    std::fs::write(d.path().join("train.en"), bytes).unwrap();
    assert_clear_error(&train(d.path(), &["--max-steps", "1"]), &["train.en", "3"]);
}

#[test]
fn unknown_config_key_is_named() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("c.toml"),
        "[train]\nbatch_size = 8\nlearnin_rate = 0.1\n",
    )
    .unwrap();
    let o = shoal(d.path(), &["train", "nmt", "--config", "c.toml"], None);
    assert_clear_error(&o, &["c.toml", "learnin_rate"]);
    let o = shoal(d.path(), &["train", "nmt", "--set", "model.hiden=3"], None);
    assert_clear_error(&o, &["hiden"]);
}

/// CTR and CNN runs are configured as NMT runs are: the defaults, a TOML file, flags,
/// then `--set` (later layers win), shown by `--print-config`; an unknown key in the file
/// is named with the file.
#[test]
fn every_workload_takes_a_file_flags_and_set() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("ctr.toml"),
        "dim = 4
epochs = 3
[dist]
workers = 2
",
    )
    .unwrap();
    let o = shoal(
        d.path(),
        &[
            "train",
            "ctr",
            "--config",
            "ctr.toml",
            "--epochs",
            "5",
            "--set",
            "dist.ps=2",
            "--print-config",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let cfg: toml::Table = toml::from_str(&text(&o.stdout)).unwrap();
    assert_eq!(cfg["dim"].as_integer(), Some(4), "from the file");
    assert_eq!(
        cfg["epochs"].as_integer(),
        Some(5),
        "the flag beats the file"
    );
    assert_eq!(cfg["batch_size"].as_integer(), Some(256), "the default");
    assert_eq!(cfg["dist"]["workers"].as_integer(), Some(2));
    assert_eq!(cfg["dist"]["ps"].as_integer(), Some(2), "--set");
    // NMT the same way: its flags are configuration fields laid between the file and
    // --set (which wins over a flag for the same field).
    std::fs::write(
        d.path().join("nmt.toml"),
        "[train]
epochs = 3
batch_size = 8
[model]
hidden = 32
",
    )
    .unwrap();
    let o = shoal(
        d.path(),
        &[
            "train",
            "nmt",
            "--config",
            "nmt.toml",
            "--epochs",
            "5",
            "--batch-size",
            "12",
            "--cell",
            "lstm",
            "--ps",
            "2",
            "--set",
            "train.epochs=7",
            "--set",
            "model.embed=24",
            "--print-config",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let cfg: toml::Table = toml::from_str(&text(&o.stdout)).unwrap();
    assert_eq!(
        cfg["model"]["hidden"].as_integer(),
        Some(32),
        "from the file"
    );
    assert_eq!(
        cfg["train"]["batch_size"].as_integer(),
        Some(12),
        "the flag beats the file"
    );
    assert_eq!(
        cfg["train"]["epochs"].as_integer(),
        Some(7),
        "--set beats the flag"
    );
    assert_eq!(cfg["model"]["cell"].as_str(), Some("lstm"), "a flag's enum");
    assert_eq!(cfg["model"]["embed"].as_integer(), Some(24), "--set");
    assert_eq!(cfg["dist"]["ps"].as_integer(), Some(2));
    assert_eq!(
        cfg["dist"]["mode"].as_str(),
        Some("ps-sync"),
        "--ps alone: sync shards"
    );
    std::fs::write(
        d.path().join("cnn.toml"),
        "[model]
dropout = 0.5
",
    )
    .unwrap();
    let o = shoal(
        d.path(),
        &[
            "train",
            "cnn",
            "--config",
            "cnn.toml",
            "--set",
            "epochs=1",
            "--print-config",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let cfg: toml::Table = toml::from_str(&text(&o.stdout)).unwrap();
    assert_eq!(cfg["model"]["dropout"].as_float(), Some(0.5));
    assert_eq!(cfg["epochs"].as_integer(), Some(1));
    assert_eq!(
        cfg["model"]["fc"].as_array().map(|a| a.len()),
        Some(2),
        "the default head"
    );
    std::fs::write(
        d.path().join("bad.toml"),
        "epoch = 2
",
    )
    .unwrap();
    let o = shoal(d.path(), &["train", "cnn", "--config", "bad.toml"], None);
    assert_clear_error(&o, &["bad.toml", "epoch"]);
}

/// Sizes that cannot work are refused before any allocation or loop: a model too large
/// for the machine's memory, an absurd heartbeat timeout, a huge beam, a line of two
/// million tokens, a planned cluster of 10^12 nodes (each aborted, panicked or hung).
#[test]
fn impossible_sizes_are_refused_up_front() {
    let d = tempfile::tempdir().unwrap();
    let o = shoal(
        d.path(),
        &["train", "nmt", "--set", "model.hidden=1000000000"],
        None,
    );
    assert_clear_error(&o, &["parameters", "GB", "available"]);
    let o = shoal(
        d.path(),
        &["train", "nmt", "--set", "dist.heartbeat_timeout_s=1e300"],
        None,
    );
    assert_clear_error(&o, &["dist.heartbeat_timeout_s", "1e300"]);
    let o = shoal(
        d.path(),
        &[
            "plan",
            "--nodes",
            "1000000000000",
            "--workers-per-node",
            "8",
        ],
        None,
    );
    assert_clear_error(&o, &["--nodes", "100,000"]);
    slice(d.path(), 32);
    let o = train(d.path(), &["--max-steps", "1", "--no-eval"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = shoal(
        d.path(),
        &["translate", "--checkpoint", "run", "--beam", "100000"],
        Some("A man.\n"),
    );
    assert_clear_error(&o, &["beam 100000", "256"]);
    let long = "dog ".repeat(2_000_000) + "\n";
    let o = shoal(
        d.path(),
        &["translate", "--checkpoint", "run"],
        Some(&format!("A man.\n{long}")),
    );
    assert_clear_error(&o, &["line 2", "subword tokens", "1024"]);
}

/// The defaults work from any directory: run from a temporary folder (not the
/// repository), `train nmt` finds Multi30k through the program's own location; with
/// SHOAL_DATA_DIR pointing elsewhere it reads from there, and a data folder that does
/// not hold the data is named with where shoal looked and how to point it.
#[test]
fn defaults_work_from_any_directory() {
    let d = tempfile::tempdir().unwrap();
    let args = [
        "train",
        "nmt",
        "--max-steps",
        "1",
        "--no-eval",
        "--set",
        "data.train_limit=64",
        "--set",
        "eval.valid_limit=16",
        "--out",
        "run",
    ];
    let o = shoal(d.path(), &args, None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let empty = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .current_dir(d.path())
        .args(args)
        .env("SHOAL_DATA_DIR", empty.path())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "the checkout's data is still found: {}",
        text(&o.stderr)
    );
    // A relative path given by the user is taken as given, and named.
    let o = shoal(d.path(), &["train", "nmt", "--data-dir", "nowhere"], None);
    assert_clear_error(&o, &["nowhere/train.en"]);
    // The README's commands with the data's paths work here too: eval, predict.
    let val = "../shared/data/multi30k/val.de";
    let o = shoal(
        d.path(),
        &["eval", "--hyp", val, "--ref", val, "--json"],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    let bleu = v["bleu"].as_f64().unwrap();
    assert!(
        (bleu - 100.0).abs() < 1e-9,
        "a file scored against itself: {bleu}"
    );
    let o = shoal(
        d.path(),
        &[
            "train",
            "ctr",
            "--data",
            "../shared/data/ctr/criteo_sample.txt",
            "--out",
            "ctr",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = shoal(
        d.path(),
        &[
            "predict",
            "--checkpoint",
            "ctr",
            "--data",
            "../shared/data/ctr/criteo_sample.txt",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).lines().count(), 200);
}

/// A device this build has no backend for is refused by name before anything runs (no
/// loader panic), and a device that is not one is named too.
#[test]
fn unavailable_or_bad_devices_are_refused() {
    let d = tempfile::tempdir().unwrap();
    for dev in ["cuda", "cuda:1"] {
        let o = shoal(d.path(), &["train", "nmt", "--device", dev], None);
        assert_clear_error(&o, &["train.device", "not available in this build"]);
    }
    let o = shoal(
        d.path(),
        &["train", "nmt", "--set", "train.device=tpu"],
        None,
    );
    assert_clear_error(&o, &["tpu", "not a device"]);
}

#[test]
fn corrupt_and_truncated_checkpoints_say_why() {
    let d = tempfile::tempdir().unwrap();
    slice(d.path(), 32);
    let o = train(d.path(), &["--max-steps", "1", "--no-eval"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let ck = d.path().join("run/ckpt-00000001");
    let model = ck.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let o = shoal(
        d.path(),
        &["translate", "--checkpoint", "run"],
        Some("A man.\n"),
    );
    assert_clear_error(&o, &["model.safetensors", "truncated"]);
    std::fs::write(ck.join("meta.json"), "{").unwrap();
    let o = shoal(
        d.path(),
        &["translate", "--checkpoint", "run"],
        Some("A man.\n"),
    );
    assert_clear_error(&o, &["meta.json"]);
    let o = shoal(
        d.path(),
        &["translate", "--checkpoint", "nowhere"],
        Some("A man.\n"),
    );
    assert_clear_error(&o, &["nowhere"]);
}

/// A distributed run (2 workers: allreduce, and sync parameter servers in both
/// placements) stopped and resumed ends with exactly the parameters and optimizer state
/// of an uninterrupted one, and its checkpoint translates.
#[test]
fn distributed_runs_resume_exactly() {
    let d = tempfile::tempdir().unwrap();
    slice(d.path(), 96);
    for mode in [
        &["--workers", "2"][..],
        &["--workers", "2", "--ps", "2"][..],
        &["--workers", "2", "--ps", "1", "--ps-placement", "colocated"][..],
    ] {
        for run in ["a", "b"] {
            let _ = std::fs::remove_dir_all(d.path().join(run));
        }
        let mut args = vec!["train", "nmt", "--data-dir", ".", "--no-eval", "--json"];
        args.extend_from_slice(TINY);
        args.extend_from_slice(mode);
        let go = |extra: &[&str]| {
            let mut a = args.clone();
            a.extend_from_slice(extra);
            let o = shoal(d.path(), &a, None);
            assert!(o.status.success(), "{mode:?}: {}", text(&o.stderr));
            // The job's progress counts the steps that run (96 pairs, batches of 16 per
            // worker: 3 updates an epoch, 24 over the default 8 epochs).
            let steps = extra[extra.iter().position(|x| *x == "--max-steps").unwrap() + 1];
            let total = format!("{steps} steps (max_steps stops it at step {steps} of the 24");
            assert!(
                text(&o.stderr).contains(&total),
                "{mode:?}: {}",
                text(&o.stderr)
            );
            let v: serde_json::Value =
                serde_json::from_str(text(&o.stdout).lines().last().unwrap()).unwrap();
            v
        };
        let whole = go(&["--out", "a", "--max-steps", "8"]);
        assert_eq!(whole["steps"], 8);
        assert_eq!(whole["worker_tokens_per_s"].as_array().unwrap().len(), 2);
        assert_process_logs(&d.path().join("a/job/logs"), 8, mode);
        go(&["--out", "b", "--max-steps", "4"]);
        let o = shoal(
            d.path(),
            &[
                "train",
                "nmt",
                "--resume",
                "b",
                "--max-steps",
                "8",
                "--no-eval",
                "--json",
            ],
            None,
        );
        assert!(o.status.success(), "{mode:?}: {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains("resuming at step 4"),
            "{}",
            text(&o.stderr)
        );
        for f in ["model.safetensors", "optimizer.safetensors"] {
            let a = std::fs::read(d.path().join("a/ckpt-00000008").join(f)).unwrap();
            let b = std::fs::read(d.path().join("b/ckpt-00000008").join(f)).unwrap();
            assert!(a == b, "{mode:?}: {f} differs after resume");
        }
        let o = shoal(
            d.path(),
            &["translate", "--checkpoint", "b"],
            Some("A man.\n"),
        );
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
}

/// Starts shoal in `dir` with `args`, its output captured (or dropped).
fn spawn_shoal(dir: &Path, args: &[&str], capture: bool) -> std::process::Child {
    let out = || {
        if capture {
            Stdio::piped()
        } else {
            Stdio::null()
        }
    };
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .current_dir(dir)
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(out())
        .stderr(out())
        .spawn()
        .unwrap()
}

/// Waits (up to 5 minutes, then fails) for the run's checkpoint of `step`.
fn wait_for_checkpoint(run: &Path, step: u64) {
    let ckpt = run.join(format!("ckpt-{step:08}/meta.json"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !ckpt.is_file() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never came",
            ckpt.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Kills (SIGKILL) the process of job `run` whose log is `RUN/job/logs/NAME.log` once
/// the run has the checkpoint of `step`; returns its pid.
fn kill_when_checkpointed(run: &Path, step: u64, name: &str) -> u32 {
    let log = run.join(format!("job/logs/{name}.log"));
    wait_for_checkpoint(run, step);
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(e.path().join("fd/2")).is_ok_and(|l| l == log) {
            unsafe_kill(pid);
            return pid;
        }
    }
    panic!("no process of {} was running", log.display());
}

/// The flat parameters of a run's checkpoint at `step`.
fn params_at(run: &Path, step: u64) -> Vec<f32> {
    let dir = run.join(format!("ckpt-{step:08}"));
    shoal_nmt::checkpoint::load_resolved(&dir).unwrap().1.params
}

/// ||a - b|| / ||b||.
fn relative_gap(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n).sqrt()
}

/// Elastic jobs (`--workers MIN:MAX --max-restarts N`): a worker killed with SIGKILL
/// mid-run (allreduce) and a killed parameter-server shard end neither job; each goes
/// on from its last checkpoint (the allreduce job with the 2 survivors, then 3 again
/// when the replacement joins at the next checkpoint), records the changes in
/// `RUN/membership.jsonl`, and ends with the parameters of one process trained on the
/// same global batches without a fault (1e-5 relative: the global batch does not
/// change with the job's size). With the launcher killed, the processes stop by
/// themselves and the job resumes to the same model. Without restarts left, the failure
/// stops the job and names the process.
#[test]
fn elastic_jobs_survive_a_killed_worker_or_shard_and_train_the_same_model() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().canonicalize().unwrap();
    slice(&dir, 480);
    // 480 pairs in global batches of 48: 10 updates an epoch, 200 in 20 epochs, a
    // checkpoint every 10; no dropout (its masks are drawn per worker).
    let mut base = vec![
        "train",
        "nmt",
        "--data-dir",
        ".",
        "--no-eval",
        "--dropout",
        "0",
        "--epochs",
        "20",
        "--checkpoint-every",
        "10",
    ];
    // TINY's flags but its batch size.
    for pair in TINY.chunks(2).filter(|p| p[0] != "--batch-size") {
        base.extend_from_slice(pair);
    }
    let mut one = base.clone();
    one.extend_from_slice(&["--batch-size", "48", "--out", "one"]);
    let o = shoal(&dir, &one, None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let reference = params_at(&dir.join("one"), 200);
    for (run, mode, victim) in [
        (
            "allreduce",
            &["--workers", "2:3", "--max-restarts", "2"][..],
            "worker-1",
        ),
        (
            "ps",
            &["--workers", "3", "--ps", "2", "--max-restarts", "1"][..],
            "ps-1",
        ),
    ] {
        let mut a = base.clone();
        let trace = format!("{run}.trace.json");
        a.extend_from_slice(&["--batch-size", "16", "--out", run, "--timeline", &trace]);
        a.extend_from_slice(mode);
        let child = spawn_shoal(&dir, &a, true);
        let pid = kill_when_checkpointed(&dir.join(run), 20, victim);
        let o = child.wait_with_output().unwrap();
        let err = text(&o.stderr);
        assert!(o.status.success(), "{run}: {err}");
        assert!(
            err.contains(&format!(
                "failed: {victim} (pid {pid}) was killed by signal 9"
            )),
            "{run}: {err}"
        );
        let log = std::fs::read_to_string(dir.join(run).join("membership.jsonl")).unwrap();
        let changes: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let failed = &changes[0];
        assert_eq!(failed["change"], "failed", "{log}");
        assert!(failed["who"].as_str().unwrap().starts_with(victim), "{log}");
        // Gone on from a checkpoint, at most one checkpoint interval lost.
        let from = failed["from_step"].as_u64().unwrap();
        assert!(from >= 20 && from.is_multiple_of(10), "{log}");
        assert!(failed["steps_lost"].as_u64().unwrap() <= 10, "{log}");
        assert_eq!(changes[1]["ev"], "recovered", "{log}");
        let sizes: Vec<(u64, u64)> = changes
            .iter()
            .filter(|c| c["ev"] == "membership")
            .map(|c| {
                (
                    c["workers_before"].as_u64().unwrap(),
                    c["workers_after"].as_u64().unwrap(),
                )
            })
            .collect();
        match run {
            // The survivors go on, the replacement joins at the next checkpoint.
            "allreduce" => {
                assert_eq!(sizes, [(3, 2), (2, 3)], "{log}");
                assert_eq!(changes[2]["change"], "joined", "{log}");
                assert_eq!(
                    changes[2]["from_step"].as_u64().unwrap(),
                    from + 10,
                    "{log}"
                );
            }
            // A shard is restarted in place; the workers stay.
            _ => assert_eq!(sizes, [(3, 3)], "{log}"),
        }
        // The job's timeline marks the change and is whole JSON after the restarts.
        let events: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(dir.join(&trace)).unwrap()).unwrap();
        assert!(
            events.iter().any(|e| e["name"]
                .as_str()
                .unwrap()
                .contains(&format!("failed: {victim}"))),
            "{run}: no membership mark in the timeline"
        );
        let gap = relative_gap(&params_at(&dir.join(run), 200), &reference);
        assert!(gap < 1e-5, "{run}: the elastic run ended {gap:e} away");
    }
    // The launcher (and the coordinator in it) killed: every process of the job stops
    // by itself, the checkpoints stay whole, and `--resume` finishes the same model.
    let mut a = base.clone();
    a.extend_from_slice(&["--batch-size", "16", "--out", "orphan", "--workers", "3"]);
    a.extend_from_slice(&["--set", "dist.heartbeat_timeout_s=2"]);
    let mut launcher = spawn_shoal(&dir, &a, false);
    let run = dir.join("orphan");
    wait_for_checkpoint(&run, 20);
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    // The job's processes: those whose environment names its run directory.
    let run_text = run.display().to_string();
    let alive = || -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
            .filter(|&pid| env_of(pid, "SHOAL_RUN_DIR") == run_text)
            .collect()
    };
    // Within the heartbeat timeout and the watchdog's margin (bounded, not timed: the
    // test fails only if they outlive a minute).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !alive().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "processes {:?} outlived their coordinator",
            alive()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = shoal(
        &dir,
        &["train", "nmt", "--resume", "orphan", "--no-eval"],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let gap = relative_gap(&params_at(&run, 200), &reference);
    assert!(gap < 1e-5, "resumed after the launcher died: {gap:e} away");
    // No restarts left: the next failure stops the job, naming the process.
    let mut a = base.clone();
    a.extend_from_slice(&["--batch-size", "16", "--out", "stop", "--workers", "3"]);
    let child = spawn_shoal(&dir, &a, true);
    let pid = kill_when_checkpointed(&dir.join("stop"), 10, "worker-2");
    let o = child.wait_with_output().unwrap();
    assert_clear_error(
        &o,
        &[&format!("worker-2 (pid {pid}) was killed by signal 9")],
    );
    // Shapes an elastic job cannot have are refused before anything starts.
    for (bad, names) in [
        (&["--workers", "3:2"][..], &["--workers", "MIN"][..]),
        (&["--workers", "0:2"][..], &["--workers", "MIN"][..]),
        (
            &["--max-restarts", "1"][..],
            &["dist.max_restarts", "several processes"][..],
        ),
        (
            &[
                "--workers",
                "2",
                "--max-restarts",
                "1",
                "--checkpoint-every",
                "0",
            ][..],
            &["dist.max_restarts", "train.checkpoint_every"][..],
        ),
        (
            &[
                "--workers",
                "1:2",
                "--ps",
                "2",
                "--ps-placement",
                "colocated",
            ][..],
            &["dist.min_workers", "dist.ps"][..],
        ),
    ] {
        let mut a = vec!["train", "nmt", "--data-dir", ".", "--max-steps", "1"];
        a.extend_from_slice(bad);
        assert_clear_error(&shoal(&dir, &a, None), names);
    }
}

/// `shoal run --max-restarts N` (torchrun's): a process that fails stops the others and
/// the job starts again, every process told which start it is (`SHOAL_RESTART_COUNT`,
/// `TORCHELASTIC_RESTART_COUNT`, `TORCHELASTIC_MAX_RESTARTS`); a job that keeps failing
/// stops after N restarts, naming the process; without the flag, the first failure ends
/// it.
#[test]
fn shoal_run_restarts_a_failed_job() {
    let d = tempfile::tempdir().unwrap();
    let run_sh = |restarts: &str, script: &str| {
        let args = [
            "run",
            "-n",
            "2",
            "--max-restarts",
            restarts,
            "--",
            "sh",
            "-c",
            script,
        ];
        shoal(d.path(), &args, None)
    };
    // Rank 1 fails on the first start only; every start leaves a line in a file.
    let script = "echo \"$RANK $SHOAL_RESTART_COUNT $TORCHELASTIC_RESTART_COUNT \
                  $TORCHELASTIC_MAX_RESTARTS\" >> starts; \
                  if [ \"$SHOAL_RESTART_COUNT\" = 0 ] && [ \"$RANK\" = 1 ]; then exit 3; fi";
    let o = run_sh("2", script);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("rank 1 (pid") && text(&o.stderr).contains("restart 1 of 2"),
        "{}",
        text(&o.stderr)
    );
    let mut starts: Vec<String> = std::fs::read_to_string(d.path().join("starts"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    starts.sort();
    assert_eq!(starts, ["0 0 0 2", "0 1 1 2", "1 0 0 2", "1 1 1 2"]);
    // Always failing: N restarts, then the error names the process and the limit.
    let o = run_sh("1", "exit 4");
    assert_clear_error(&o, &["exited with status 4", "restarted 1 time(s)"]);
    let o = shoal(
        d.path(),
        &["run", "-n", "2", "--", "sh", "-c", "exit 4"],
        None,
    );
    assert_clear_error(&o, &["exited with status 4"]);
    assert!(!text(&o.stderr).contains("restart"), "{}", text(&o.stderr));
}

/// `--timeline FILE`: one Chrome trace (Trace Event Format) for the whole job, strict
/// JSON once it ends, each worker a process (`pid` = rank) whose spans cover each step
/// of its window (`train.timeline_steps`) in order: data, forward, backward, exchange,
/// optimizer, parameters in; checkpoints and validation on worker 0. Alone, the
/// process writes the file itself, without an exchange.
#[test]
fn timeline_traces_every_process_step_by_step() {
    let d = tempfile::tempdir().unwrap();
    slice(d.path(), 96);
    for (run, workers, exchange) in [("pair", "2", true), ("alone", "1", false)] {
        let trace = format!("{run}/trace.json");
        let mut a = vec!["train", "nmt", "--data-dir", ".", "--no-eval", "--out", run];
        a.extend_from_slice(TINY);
        a.extend_from_slice(&[
            "--workers",
            workers,
            "--max-steps",
            "12",
            "--checkpoint-every",
            "5",
            "--timeline",
            &trace,
            "--set",
            "train.timeline_steps=8",
        ]);
        let o = shoal(d.path(), &a, None);
        assert!(o.status.success(), "{run}: {}", text(&o.stderr));
        let events: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(d.path().join(&trace)).unwrap()).unwrap();
        let n: usize = workers.parse().unwrap();
        for pid in 0..n {
            let spans: Vec<&serde_json::Value> = events
                .iter()
                .filter(|e| e["ph"] == "X" && e["pid"] == pid)
                .collect();
            let steps: std::collections::BTreeSet<u64> = spans
                .iter()
                .map(|e| e["args"]["step"].as_u64().unwrap())
                .collect();
            // The window: the first 8 of the 12 updates.
            assert_eq!(steps, (1..=8).collect(), "{run} pid {pid}");
            for step in 1..=8u64 {
                let phase = |name: &str| -> Option<(u64, u64)> {
                    spans
                        .iter()
                        .find(|e| e["name"] == name && e["args"]["step"] == step)
                        .map(|e| {
                            let ts = e["ts"].as_u64().unwrap();
                            (ts, ts + e["dur"].as_u64().unwrap())
                        })
                };
                let mut order = vec!["data", "forward", "backward"];
                if exchange {
                    order.push("exchange");
                }
                order.extend(["optimizer", "params in"]);
                let mut at = 0;
                for name in order {
                    let (from, to) = phase(name)
                        .unwrap_or_else(|| panic!("{run} pid {pid} step {step}: no {name}"));
                    assert!(
                        from >= at && to >= from,
                        "{run} pid {pid} step {step}: {name}"
                    );
                    at = to;
                }
                assert_eq!(phase("exchange").is_some(), exchange, "{run}");
            }
            let named = |name: &str| spans.iter().filter(|e| e["name"] == name).count();
            // Checkpoints at steps 5 (in the window) and 10 (past it) on worker 0 only.
            assert_eq!(named("checkpoint"), (pid == 0) as usize, "{run} pid {pid}");
        }
        let label = events
            .iter()
            .find(|e| e["name"] == "process_name" && e["pid"] == 0)
            .map(|e| e["args"]["name"].as_str().unwrap().to_string());
        assert_eq!(
            label.as_deref(),
            Some(if exchange {
                "worker 0"
            } else {
                "shoal train nmt"
            })
        );
    }
}

/// TLS on every plane (`--set dist.tls=true`): a 2-worker TCP allreduce job and a
/// parameter-server job over TCP train the same bits as without it, their logs say the
/// links are TLS, the per-job certificates are gone when the job is; certificates from
/// files work the same, and a bad or missing directory is named before anything starts.
#[test]
fn tls_jobs_train_the_same_model() {
    let d = tempfile::tempdir().unwrap();
    slice(d.path(), 48);
    let certs = d.path().join("certs");
    let pem = shoal_comm::tls::Pem::generate().unwrap();
    pem.write_dir(&certs).unwrap();
    let certs_set = format!("dist.tls_dir={}", certs.display());
    for (name, mode) in [
        ("allreduce", &["--workers", "2"][..]),
        ("ps", &["--workers", "2", "--ps", "1"][..]),
    ] {
        let mut base = vec![
            "train",
            "nmt",
            "--data-dir",
            ".",
            "--no-eval",
            "--max-steps",
            "3",
        ];
        base.extend_from_slice(TINY);
        base.extend_from_slice(mode);
        base.extend_from_slice(&["--set", "dist.transport=tcp"]);
        let go = |out: &str, extra: &[&str]| {
            let mut a = base.clone();
            a.extend_from_slice(&["--out", out]);
            a.extend_from_slice(extra);
            let o = shoal(d.path(), &a, None);
            assert!(o.status.success(), "{name} {extra:?}: {}", text(&o.stderr));
            std::fs::read(d.path().join(out).join("ckpt-00000003/model.safetensors")).unwrap()
        };
        let plain = go(&format!("{name}-plain"), &[]);
        let sealed = go(&format!("{name}-tls"), &["--set", "dist.tls=true"]);
        assert!(plain == sealed, "{name}: TLS changed the trained model");
        let from_files = go(
            &format!("{name}-files"),
            &["--set", "dist.tls=true", "--set", &certs_set],
        );
        assert!(plain == from_files, "{name}: certificates from files");
        let logs = |run: &str| -> String {
            std::fs::read_dir(d.path().join(run).join("job/logs"))
                .unwrap()
                .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
                .collect()
        };
        for run in [format!("{name}-tls"), format!("{name}-files")] {
            let all = logs(&run);
            assert!(all.contains("over TCP with TLS"), "{run}: {all}");
            assert!(
                !d.path().join(&run).join("job/tls").exists(),
                "{run}: the job's certificates outlived it"
            );
        }
        let plain_logs = logs(&format!("{name}-plain"));
        assert!(!plain_logs.contains("TLS"), "{plain_logs}");
    }
    // Files that are not there, or not certificates, are named up front.
    let mut a = vec![
        "train",
        "nmt",
        "--data-dir",
        ".",
        "--workers",
        "2",
        "--max-steps",
        "1",
    ];
    a.extend_from_slice(TINY);
    let missing = format!("dist.tls_dir={}", d.path().join("nowhere").display());
    let mut m = a.clone();
    m.extend_from_slice(&["--set", "dist.tls=true", "--set", &missing]);
    assert_clear_error(&shoal(d.path(), &m, None), &["nowhere", "ca.pem"]);
    std::fs::write(certs.join("key.pem"), "-----BEGIN PRIVATE KEY-----\nAAAA\n").unwrap();
    let mut m = a.clone();
    m.extend_from_slice(&["--set", "dist.tls=true", "--set", &certs_set]);
    assert_clear_error(&shoal(d.path(), &m, None), &["key.pem"]);
    // A directory without TLS on is a mistake, not silently ignored.
    let mut m = a.clone();
    m.extend_from_slice(&["--set", &certs_set]);
    assert_clear_error(&shoal(d.path(), &m, None), &["dist.tls_dir", "dist.tls"]);
}

/// Validation BLEU during training (every 3 updates here): each evaluation is said and
/// recorded (metrics.json, TensorBoard), the best checkpoint is `RUN/best`, survives
/// the pruning of old checkpoints, is what `info` names and what `translate` takes;
/// a distributed job that asks for it is refused before it starts.
#[test]
fn validation_during_training_keeps_the_best() {
    let d = tempfile::tempdir().unwrap();
    slice(d.path(), 64);
    let o = train(
        d.path(),
        &[
            "--max-steps",
            "9",
            "--no-eval",
            "--set",
            "eval.every_steps=3",
            "--set",
            "eval.valid_limit=16",
            "--set",
            "train.keep_checkpoints=1",
            "--checkpoint-every",
            "0",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert_eq!(err.matches("validation BLEU").count(), 3, "{err}");
    assert!(err.contains("the best so far, now RUN/best"), "{err}");
    let best = std::fs::read_to_string(d.path().join("run/best")).unwrap();
    let best_dir = d.path().join("run").join(best.trim());
    assert!(best_dir.join("meta.json").is_file(), "{best}: pruned");
    let scores: Vec<f64> = ["ckpt-00000003", "ckpt-00000006", "ckpt-00000009"]
        .iter()
        .filter_map(|c| {
            let m = std::fs::read(d.path().join("run").join(c).join("metrics.json")).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&m).unwrap();
            v["bleu"].as_f64()
        })
        .collect();
    // The best one's recorded score is the highest of those recorded.
    let b: serde_json::Value =
        serde_json::from_slice(&std::fs::read(best_dir.join("metrics.json")).unwrap()).unwrap();
    let top = b["bleu"].as_f64().unwrap();
    assert!(scores.iter().all(|&s| s <= top), "{scores:?} vs best {top}");
    assert_eq!(event_tags(&d.path().join("run"), "valid/bleu"), 3);
    let info = info_json(d.path(), "run");
    assert!(
        info["made"]["best"]
            .as_str()
            .unwrap()
            .starts_with(best.trim()),
        "{info}"
    );
    let o = shoal(
        d.path(),
        &["translate", "--checkpoint", "run/best"],
        Some("A man.\n"),
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    // Checkpoint averaging (the mean itself: shoal-nmt's checkpoint tests): the best
    // and the latest, or the run's last two, into checkpoints that translate.
    for (args, out) in [
        (vec!["run/best", "run"], "avg"),
        (vec!["--last", "2", "run"], "avg2"),
    ] {
        let mut a = vec!["average", "--out", out];
        a.extend(args);
        let o = shoal(d.path(), &a, None);
        assert!(o.status.success(), "{a:?}: {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains("averaged 2 checkpoints"),
            "{}",
            text(&o.stderr)
        );
        assert_eq!(info_json(d.path(), out)["kind"], "nmt-checkpoint");
        let o = shoal(
            d.path(),
            &["translate", "--checkpoint", out],
            Some("A man.\n"),
        );
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
    assert_clear_error(
        &shoal(d.path(), &["average", "--out", "avg", "run"], None),
        &["--out avg", "already exists"],
    );
    assert_clear_error(
        &shoal(
            d.path(),
            &["average", "--out", "a3", "--last", "5", "run"],
            None,
        ),
        &["2 checkpoints", "--last asks for 5"],
    );
    let mut args = vec![
        "train",
        "nmt",
        "--data-dir",
        ".",
        "--workers",
        "2",
        "--set",
        "eval.every_steps=3",
    ];
    args.extend_from_slice(TINY);
    assert_clear_error(
        &shoal(d.path(), &args, None),
        &["eval.every_steps", "one-process"],
    );
}

/// How often `tag` occurs in the one TensorBoard event file in `dir`.
fn event_tags(dir: &Path, tag: &str) -> usize {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .collect();
    assert_eq!(files.len(), 1, "{}: {files:?}", dir.display());
    let ev = std::fs::read(&files[0]).unwrap();
    ev.windows(tag.len())
        .filter(|w| *w == tag.as_bytes())
        .count()
}

/// `shoal info --json PATH` run in `dir`.
fn info_json(dir: &Path, path: &str) -> serde_json::Value {
    let o = shoal(dir, &["info", path, "--json"], None);
    assert!(o.status.success(), "info {path}: {}", text(&o.stderr));
    serde_json::from_str(text(&o.stdout).trim()).unwrap()
}

/// `shoal info` on what NMT and CTR training leave: the run, its checkpoint, the
/// scores recorded at the end (the numbers the training printed), a distributed run's
/// job directory, a folder of runs; a model handed to the wrong command is named.
#[test]
fn info_describes_runs_and_models() {
    let d = tempfile::tempdir().unwrap();
    slice(d.path(), 64);
    let o = train(d.path(), &["--max-steps", "3", "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let trained: serde_json::Value =
        serde_json::from_str(text(&o.stdout).lines().last().unwrap()).unwrap();
    let run = info_json(d.path(), "run");
    assert_eq!(run["kind"], "nmt-run");
    assert_eq!(run["metrics"]["valid_loss"], trained["valid_loss"], "{run}");
    assert_eq!(run["metrics"]["bleu"], trained["bleu"], "{run}");
    assert!(
        run["made"]["trained"]
            .as_str()
            .unwrap()
            .starts_with("3 updates"),
        "{run}"
    );
    assert_eq!(
        run["usage"][0],
        "shoal translate --checkpoint run < source.txt"
    );
    let ck = info_json(d.path(), "run/ckpt-00000003");
    assert_eq!(ck["kind"], "nmt-checkpoint");
    assert_eq!(ck["metrics"], run["metrics"]);
    let o = shoal(d.path(), &["info", "run"], None);
    let t = text(&o.stdout);
    assert!(t.starts_with("run: an NMT training run"), "{t}");
    assert!(t.contains("gru, 1 layer, embed 16, hidden 16"), "{t}");

    let criteo = Path::new(DATA).join("../ctr/criteo_sample.txt");
    let o = shoal(
        d.path(),
        &[
            "train",
            "ctr",
            "--data",
            criteo.to_str().unwrap(),
            "--out",
            "ctr",
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let trained: serde_json::Value =
        serde_json::from_str(text(&o.stdout).lines().last().unwrap()).unwrap();
    let ctr = info_json(d.path(), "ctr");
    assert_eq!(ctr["kind"], "ctr-model");
    assert_eq!(ctr["metrics"]["auc"], trained["auc"], "{ctr}");
    assert_eq!(ctr["metrics"]["logloss"], trained["logloss"], "{ctr}");
    assert_eq!(event_tags(&d.path().join("ctr"), "valid/auc"), 1);
    let rows = ctr["made"]["rows"].as_str().unwrap();
    assert!(
        rows.contains("sparse rows of 9 values (adagrad rule"),
        "{ctr}"
    );

    // A folder of runs: one line each.
    let o = shoal(d.path(), &["info", "."], None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let t = text(&o.stdout);
    assert!(
        t.contains("an NMT training run") && t.contains("a CTR model"),
        "{t}"
    );
    // The wrong command for a model, and a distributed run's job directory.
    assert_clear_error(
        &shoal(
            d.path(),
            &["translate", "--checkpoint", "ctr"],
            Some("A man.\n"),
        ),
        &["ctr: a CTR model", "not an NMT checkpoint", "shoal predict"],
    );
    assert_clear_error(
        &shoal(
            d.path(),
            &["predict", "--checkpoint", "run", "--data", "train.en"],
            None,
        ),
        &["run: an NMT training run", "not a CTR model"],
    );
    let mut args = vec![
        "train",
        "nmt",
        "--data-dir",
        ".",
        "--no-eval",
        "--out",
        "dist",
        "--max-steps",
        "2",
        "--workers",
        "2",
    ];
    args.extend_from_slice(TINY);
    let o = shoal(d.path(), &args, None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        info_json(d.path(), "dist")["made"]["processes' logs"],
        "dist/job/logs"
    );
    assert_clear_error(
        &shoal(d.path(), &["info", "dist/job"], None),
        &["job directory of a distributed nmt run", "shoal info dist"],
    );
    assert_clear_error(
        &shoal(d.path(), &["info", "train.en"], None),
        &["train.en: not something shoal wrote"],
    );
    assert_clear_error(
        &shoal(d.path(), &["info", "nothing"], None),
        &["nothing: no such file"],
    );
}

/// Each process of a finished job logged what it did: joining, its part, its end
/// (the workers' `steps` updates).
fn assert_process_logs(dir: &Path, steps: u64, what: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let shards = what
        .windows(2)
        .find(|w| w[0] == "--ps")
        .map_or(0, |w| w[1].parse::<usize>().unwrap());
    let colocated = what.contains(&"colocated");
    let expect: Vec<String> = (0..2)
        .map(|i| format!("worker-{i}.log"))
        .chain((0..if colocated { 0 } else { shards }).map(|i| format!("ps-{i}.log")))
        .collect();
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".log")).count(),
        expect.len(),
        "{what:?}: {names:?}"
    );
    let mut serving = 0;
    for name in &expect {
        let log = std::fs::read_to_string(dir.join(name)).unwrap();
        let mut needles = vec![
            "connecting to the coordinator",
            "registered from",
            "left the job: finished",
        ];
        let done = format!("done, {steps} updates");
        if name.starts_with("worker") {
            needles.extend(["exchanging gradients by", &done]);
        }
        for n in needles {
            assert!(log.contains(n), "{what:?}: '{n}' not in {name}:\n{log}");
        }
        serving += log.matches("serving parameter-server shard").count();
    }
    assert_eq!(serving, shards, "{what:?}: shards that logged serving");
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The value of `key` in a process's environment (empty when unset or unreadable).
fn env_of(pid: u32, key: &str) -> String {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let prefix = format!("{key}=");
    env.split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(prefix.as_bytes()).map(text))
        .unwrap_or_default()
}

fn role(pid: u32) -> String {
    env_of(pid, "SHOAL_ROLE")
}

/// Killing one process of a distributed job stops the whole job with an error naming it
/// and the signal (the launcher noticed the death itself; nothing timed out), leaves no
/// process behind, and the last complete checkpoint still loads.
#[test]
fn killed_worker_or_server_stops_the_job() {
    use std::time::{Duration, Instant};
    for victim in ["worker", "ps"] {
        let d = tempfile::tempdir().unwrap();
        slice(d.path(), 96);
        let mut args = vec![
            "train",
            "nmt",
            "--data-dir",
            ".",
            "--out",
            "run",
            "--no-eval",
        ];
        args.extend_from_slice(TINY);
        args.extend_from_slice(&[
            "--workers",
            "2",
            "--ps",
            "1",
            "--epochs",
            "100000",
            "--checkpoint-every",
            "3",
        ]);
        let mut launcher = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .current_dir(d.path())
            .args(&args)
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !d.path().join("run/latest").exists() {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "no checkpoint written"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let kids = children(launcher.id());
        assert_eq!(kids.len(), 3, "expected 2 workers and 1 server: {kids:?}");
        let target = *kids
            .iter()
            .filter(|&&k| role(k) == victim)
            .max()
            .expect("victim process");
        let mut stderr = launcher.stderr.take().unwrap();
        let err = std::thread::spawn(move || {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
            err
        });
        unsafe_kill(target);
        let status = wait_or_kill(launcher, &format!("the job after its {victim} was killed"));
        let err = err.join().unwrap();
        assert!(!status.success(), "the job survived its {victim}");
        assert!(!err.contains("panicked"), "{err}");
        let name = if victim == "ps" { "ps-0" } else { "worker-" };
        assert!(err.contains(name) && err.contains("signal 9"), "{err}");
        for k in kids {
            assert!(
                !Path::new(&format!("/proc/{k}")).exists()
                    || std::fs::read_to_string(format!("/proc/{k}/stat"))
                        .map(|s| s.contains(") Z"))
                        .unwrap_or(true),
                "process {k} ({}) left running",
                role(k)
            );
        }
        let o = shoal(
            d.path(),
            &["translate", "--checkpoint", "run"],
            Some("A man.\n"),
        );
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
}

/// How long the test waits for an event (a process's exit, a line it prints, a
/// connection) before calling it a hang: far beyond any real wait, a guard and not a
/// measure of speed.
const HANG: std::time::Duration = std::time::Duration::from_secs(300);

/// Waits for `child` to exit; one still running after [`HANG`] is killed and fails the
/// test, naming `what`.
fn wait_or_kill(mut child: std::process::Child, what: &str) -> std::process::ExitStatus {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait().unwrap());
    });
    rx.recv_timeout(HANG).unwrap_or_else(|_| {
        unsafe_kill(pid);
        panic!("{what}: still running after {HANG:?}; killed")
    })
}

fn unsafe_kill(pid: u32) {
    let st = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// `shoal train ctr` on the Criteo sample, `shoal predict` on it (one probability per
/// row), and a malformed click log named with its line.
#[test]
fn ctr_train_predict_and_bad_rows() {
    let d = tempfile::tempdir().unwrap();
    let criteo = Path::new(DATA).join("../ctr/criteo_sample.txt");
    let criteo = criteo.to_str().unwrap();
    let o = shoal(
        d.path(),
        &[
            "train", "ctr", "--data", criteo, "--epochs", "2", "--out", "m", "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(text(&o.stdout).lines().last().unwrap()).unwrap();
    assert!(v["auc"].as_f64().unwrap().is_finite());
    let o = shoal(
        d.path(),
        &["predict", "--checkpoint", "m", "--data", criteo],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let probs: Vec<f64> = text(&o.stdout)
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(probs.len(), 200);
    assert!(probs.iter().all(|p| (0.0..=1.0).contains(p)));
    assert!(text(&o.stderr).contains("200 rows: AUC"));
    // Two worker processes and a parameter-server shard; the model saved from the
    // shard scores the file too.
    let o = shoal(
        d.path(),
        &[
            "train",
            "ctr",
            "--data",
            criteo,
            "--workers",
            "2",
            "--ps",
            "1",
            "--out",
            "m2",
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(text(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(v["worker_examples_per_s"].as_array().unwrap().len(), 2);
    // The job's TensorBoard events sit beside the model worker 0 saved (its updates
    // are reported twice a second: this job is over before the first report).
    assert_eq!(event_tags(&d.path().join("m2"), "valid/auc"), 1);
    for w in ["worker-0", "worker-1"] {
        let log =
            std::fs::read_to_string(d.path().join(format!("m2.cluster/job/logs/{w}.log"))).unwrap();
        for n in [
            "registered from",
            "training from step 0",
            "rows/s)",
            "left the job: finished",
        ] {
            assert!(log.contains(n), "'{n}' not in {w}'s log:\n{log}");
        }
    }
    let o = shoal(
        d.path(),
        &["predict", "--checkpoint", "m2", "--data", criteo],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).lines().count(), 200);
    // The job resumes as a job (its saved configuration names the workers and shards).
    let o = shoal(
        d.path(),
        &[
            "train", "ctr", "--resume", "m2", "--epochs", "2", "--out", "m2", "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("parameter-server shards"),
        "{}",
        text(&o.stderr)
    );
    let o = shoal(
        d.path(),
        &["train", "ctr", "--data", criteo, "--workers", "2"],
        None,
    );
    assert_clear_error(&o, &["--ps"]);
    std::fs::write(d.path().join("bad.csv"), "label,I1,C1\n1,2,a\n0,zz,b\n").unwrap();
    let o = shoal(d.path(), &["train", "ctr", "--data", "bad.csv"], None);
    assert_clear_error(&o, &["bad.csv:3", "I1 is 'zz'"]);
    let o = shoal(
        d.path(),
        &["predict", "--checkpoint", "nothing", "--data", "bad.csv"],
        None,
    );
    assert_clear_error(&o, &["nothing"]);
}

/// `shoal plan` on a described cluster (no measurement when everything is given), and
/// bad cluster descriptions named.
#[test]
fn plan_ranks_options_and_refuses_bad_clusters() {
    let d = tempfile::tempdir().unwrap();
    let given = [
        "plan",
        "--nodes",
        "2",
        "--workers-per-node",
        "4",
        "--values",
        "3670000",
        "--compute-ms",
        "67",
        "--opt-ns",
        "2.4",
        "--words-per-step",
        "457",
        "--intra-gbs",
        "5",
        "--stream-gbs",
        "1.5",
        "--cores-per-node",
        "16",
        "--json",
    ];
    let o = shoal(d.path(), &given, None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    let opts = v["options"].as_array().unwrap();
    assert!(opts.len() > 3);
    // Fastest first, and each option's efficiency is its speed-up over 8 workers.
    let steps: Vec<f64> = opts.iter().map(|o| o["step_s"].as_f64().unwrap()).collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]));
    for o in opts {
        let (sp, ef) = (
            o["speedup"].as_f64().unwrap(),
            o["efficiency"].as_f64().unwrap(),
        );
        assert!((sp / 8.0 - ef).abs() < 1e-9);
    }
    let o = shoal(d.path(), &["plan", "--seed"], None);
    assert!(o.status.success() && text(&o.stdout).contains("2 ps / 8 workers"));
    assert_clear_error(
        &shoal(d.path(), &["plan", "--nodes", "0"], None),
        &["--nodes"],
    );
    assert_clear_error(
        &shoal(d.path(), &["plan", "--inter-gbs", "0"], None),
        &["--inter-gbs"],
    );
}

/// A stand-in for the Kubernetes Service in front of the coordinator pod: a fixed
/// loopback port, bound here (port 0) and held for the whole test so that nothing else
/// can take it. Until [`Service::route`] names the coordinator's address nothing listens
/// on it, so connections are refused (as a Service without a ready endpoint refuses
/// them); from then on it accepts and forwards every connection there.
struct Service {
    port: u16,
    /// The bound socket, until it listens.
    socket: Option<std::os::fd::OwnedFd>,
    accept: Option<std::thread::JoinHandle<()>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Service {
    fn start() -> Service {
        use std::os::fd::{AsRawFd, FromRawFd};
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: plain socket calls on a descriptor owned here (closed by the OwnedFd),
        // with fully initialised address structures of the stated sizes.
        let (socket, port) = unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            let mut a: libc::sockaddr_in = std::mem::zeroed();
            a.sin_family = libc::AF_INET as libc::sa_family_t;
            a.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            let sa = &mut a as *mut libc::sockaddr_in as *mut libc::sockaddr;
            let r = libc::bind(fd.as_raw_fd(), sa, len);
            assert!(r == 0, "bind: {}", std::io::Error::last_os_error());
            let mut got = len;
            let r = libc::getsockname(fd.as_raw_fd(), sa, &mut got);
            assert!(r == 0, "getsockname: {}", std::io::Error::last_os_error());
            (fd, u16::from_be(a.sin_port))
        };
        Service {
            port,
            socket: Some(socket),
            accept: None,
            stop: Default::default(),
        }
    }

    /// The address a pod is given for the coordinator.
    fn url(&self) -> String {
        format!("http://localhost:{}", self.port)
    }

    /// Starts listening, and forwards every connection to `to`.
    fn route(&mut self, to: std::net::SocketAddr) {
        use std::os::fd::AsRawFd;
        let socket = self.socket.take().expect("routed once");
        // SAFETY: listen(2) on the bound socket owned here.
        let r = unsafe { libc::listen(socket.as_raw_fd(), 64) };
        assert!(r == 0, "listen: {}", std::io::Error::last_os_error());
        let listener = std::net::TcpListener::from(socket);
        let stop = self.stop.clone();
        self.accept = Some(std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                if let Ok(conn) = conn {
                    forward(conn, to);
                }
            }
        }));
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(a) = self.accept.take() {
            self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            // Wake the accept loop so that it sees it is stopping.
            let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
            let _ = a.join();
        }
    }
}

/// Copies bytes both ways between `a` and a new connection to `to`, each direction
/// closed when its source closes.
fn forward(a: std::net::TcpStream, to: std::net::SocketAddr) {
    let Ok(b) = std::net::TcpStream::connect(to) else {
        return;
    };
    let pipe = |mut from: std::net::TcpStream, mut into: std::net::TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut into);
            let _ = into.shutdown(std::net::Shutdown::Write);
        });
    };
    pipe(a.try_clone().unwrap(), b.try_clone().unwrap());
    pipe(b, a);
}

/// A child's stderr, read as it comes: every line is sent on the returned channel (to
/// wait for one), and the thread returns all of it once the child closes it.
fn watch_stderr(
    c: &mut std::process::Child,
) -> (
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<String>,
) {
    let stderr = c.stderr.take().expect("stderr piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let all = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    (rx, all)
}

/// Waits for a line containing `needle` on a [`watch_stderr`] channel and returns it;
/// fails naming `what` if the child closes its stderr (exits) first, or after [`HANG`].
fn wait_line(lines: &std::sync::mpsc::Receiver<String>, needle: &str, what: &str) -> String {
    let start = std::time::Instant::now();
    loop {
        let left = HANG.saturating_sub(start.elapsed());
        match lines.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return l,
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("{what}: no '{needle}' after {HANG:?}")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                panic!("{what}: exited without printing '{needle}'")
            }
        }
    }
}

/// What `shoal role` prints once its first attempt to reach the coordinator failed.
const NOT_UP: &str = "is not reachable yet";

/// A job as a cluster scheduler runs it (the environment of a Kubernetes pod, the
/// Service a loopback name and port forwarding to the coordinator, see [`Service`]):
/// `shoal coordinator` prepares the job and serves on a port of its choosing, which it
/// reports; `shoal role` in each "pod" finds it through the Service, takes its rank from
/// the pod index, and retries until the coordinator is up (every pod has been turned
/// away at least once before the coordinator starts).
/// An NMT allreduce job over TCP, an NMT parameter-server job whose shard the worker of
/// index 0 hosts (colocated placement, derived from the index), and a CTR job with a
/// separate shard pod all train and save what they should.
#[test]
fn pods_find_the_coordinator_and_take_rank_from_their_index() {
    let d = tempfile::tempdir().unwrap();
    slice(d.path(), 96);
    let criteo = Path::new(DATA).join("../ctr/criteo_sample.txt");
    let certs = d.path().join("certs");
    shoal_comm::tls::Pem::generate()
        .unwrap()
        .write_dir(&certs)
        .unwrap();
    std::fs::write(
        d.path().join("ctr.toml"),
        format!(
            "kind = \"deepfm\"\ndim = 4\nhidden = [8]\ndata = {:?}\nbatch_size = 64\nepochs = 1\n\
             [dist]\nworkers = 2\nps = 1\nmode = \"ps-sync\"\ntransport = \"tcp\"\n",
            criteo.to_str().unwrap()
        ),
    )
    .unwrap();
    for (name, dist) in [
        ("allreduce", &["--set", "dist.mode=allreduce"][..]),
        (
            "ps",
            &[
                "--set",
                "dist.mode=ps-sync",
                "--set",
                "dist.ps=1",
                "--set",
                "dist.placement=colocated",
            ][..],
        ),
        ("ctr", &[][..]),
        // Every pod with the job's certificates (SHOAL_TLS_DIR, as the Secret mounts
        // them) and a configuration that asks for TLS.
        (
            "tls",
            &["--set", "dist.mode=allreduce", "--set", "dist.tls=true"][..],
        ),
    ] {
        let kind = if name == "ctr" { "ctr" } else { "nmt" };
        let cfg = format!("{name}.toml");
        if kind == "nmt" {
            let mut args = vec!["train", "nmt", "--data-dir", ".", "--max-steps", "4"];
            args.extend_from_slice(TINY);
            args.extend_from_slice(&["--set", "dist.workers=2", "--set", "dist.transport=tcp"]);
            args.extend_from_slice(dist);
            args.push("--print-config");
            let o = shoal(d.path(), &args, None);
            assert!(o.status.success(), "{}", text(&o.stderr));
            std::fs::write(d.path().join(&cfg), &o.stdout).unwrap();
        }
        let run = format!("run-{name}");
        let pod = |args: &[&str], envs: &[(&str, String)]| {
            let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
            c.current_dir(d.path())
                .args(args)
                .env("RAYON_NUM_THREADS", "1")
                .env("SHOAL_JOB_TOKEN", "pod-token")
                .env("SHOAL_RUN_DIR", &run)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            for (k, v) in envs {
                c.env(k, v);
            }
            if name == "tls" {
                c.env("SHOAL_TLS_DIR", &certs);
            }
            // As an elastic job's pods are: resume from the run directory, which has no
            // checkpoint on the first start.
            if name == "allreduce" {
                c.env("SHOAL_RESUME", &run);
            }
            c.spawn().unwrap()
        };
        // One Service per pod (any would do; each stays closed until the coordinator
        // is up).
        let role_pod = |role: &str, i: usize| {
            let svc = Service::start();
            let mut p = pod(
                &["role"],
                &[
                    ("SHOAL_ROLE", role.into()),
                    ("SHOAL_COORDINATOR", svc.url()),
                    ("SHOAL_HOST", "127.0.0.1".into()),
                    ("JOB_COMPLETION_INDEX", i.to_string()),
                ],
            );
            let (lines, err) = watch_stderr(&mut p);
            (p, svc, lines, err, format!("{name}: {role} {i}"))
        };
        let mut workers: Vec<_> = [1, 0].iter().map(|&i| role_pod("worker", i)).collect();
        let mut shard = (kind == "ctr").then(|| role_pod("ps", 0));
        // The pods start first: each has been refused and is retrying before the
        // coordinator runs.
        for (_, _, lines, _, what) in workers.iter().chain(shard.as_ref()) {
            wait_line(lines, NOT_UP, what);
        }
        let mut coord = pod(
            &[
                "coordinator",
                "--kind",
                kind,
                "--config",
                &cfg,
                "--listen",
                "127.0.0.1:0",
            ],
            &[],
        );
        // It binds a port of its choosing and says which.
        let (lines, coord_err) = watch_stderr(&mut coord);
        let said = wait_line(&lines, "coordinator listening on ", name);
        let addr: std::net::SocketAddr = said
            .trim_start_matches("coordinator listening on ")
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}: '{said}': {e}"));
        for (_, svc, _, _, _) in workers.iter_mut().chain(shard.as_mut()) {
            svc.route(addr);
        }
        let outs: Vec<(Output, String)> = workers
            .into_iter()
            .map(|(w, _svc, _, err, _)| (w.wait_with_output().unwrap(), err.join().unwrap()))
            .collect();
        let shard = shard.map(|(s, _svc, _, err, _)| (s.wait_with_output().unwrap(), err));
        let shard = shard.map(|(o, err)| (o, err.join().unwrap()));
        // A pod that failed leaves the coordinator waiting for it: stop it.
        if outs.iter().chain(&shard).any(|(o, _)| !o.status.success()) {
            let _ = coord.kill();
        }
        if let Some((o, err)) = &shard {
            assert!(o.status.success(), "{name}: shard: {err}");
        }
        let co = coord.wait_with_output().unwrap();
        let co_err = coord_err.join().unwrap();
        for (i, (o, err)) in [1, 0].iter().zip(&outs) {
            assert!(o.status.success(), "{name}: worker {i}: {err}");
            // Its reports carry the rank its index gave it.
            let done = text(&o.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["ev"] == "done")
                .unwrap_or_else(|| panic!("{name}: worker {i} reported no end"));
            assert_eq!(done["rank"], *i, "{name}");
            if kind == "nmt" {
                assert_eq!(done["steps"], 4, "{name}");
            }
        }
        assert!(co.status.success(), "{name}: {co_err}");
        assert!(co_err.contains("expecting 2 workers"), "{name}: {co_err}");
        if name == "ps" {
            assert!(outs[1].1.contains("hosts parameter-server shard 0"));
        }
        for (_, err) in &outs {
            let fresh = err.contains("no checkpoint there yet, starting from the beginning");
            assert_eq!(fresh, name == "allreduce", "{name}: {err}");
        }
        for (_, err) in &outs {
            let sealed = err.contains("over TCP with TLS");
            assert_eq!(sealed, name == "tls", "{name}: {err}");
        }
        let o = if kind == "nmt" {
            shoal(
                d.path(),
                &["translate", "--checkpoint", &run],
                Some("A man.\n"),
            )
        } else {
            let model = format!("{run}/model");
            shoal(
                d.path(),
                &[
                    "predict",
                    "--checkpoint",
                    &model,
                    "--data",
                    criteo.to_str().unwrap(),
                ],
                None,
            )
        };
        assert!(o.status.success(), "{name}: {}", text(&o.stderr));
    }
    // A coordinator with no token, or a pod that never finds its coordinator: errors.
    let o = shoal(
        d.path(),
        &["coordinator", "--kind", "nmt", "--config", "ps.toml"],
        None,
    );
    assert_clear_error(&o, &["SHOAL_JOB_TOKEN"]);
    // Its Service never gets an endpoint: every attempt is refused.
    let nobody = Service::start();
    let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
    let o = c
        .current_dir(d.path())
        .arg("role")
        .env("SHOAL_COORDINATOR", nobody.url())
        .envs([
            ("SHOAL_ROLE", "worker"),
            ("SHOAL_JOB_TOKEN", "t"),
            ("SHOAL_RUN_DIR", "nowhere"),
            ("SHOAL_CONNECT_TIMEOUT_S", "1"),
        ])
        .output()
        .unwrap();
    assert_clear_error(&o, &[&format!("coordinator at {}", nobody.url()), NOT_UP]);
}

/// `shoal launch --k8s SPEC` run again prints what `first` printed (the kept token and
/// certificates); returns what it prints with `--new-token`.
fn again_then_renewed(dir: &Path, spec: &str, first: &Output) -> Output {
    let again = shoal(dir, &["launch", "--k8s", spec], None);
    assert!(
        again.stdout == first.stdout,
        "{spec}: a second run printed other objects"
    );
    let fresh = shoal(dir, &["launch", "--k8s", spec, "--new-token"], None);
    assert!(fresh.status.success(), "{spec}: {}", text(&fresh.stderr));
    fresh
}

/// `shoal launch --k8s` prints a job's Kubernetes objects (its training configuration
/// inside, [dist] set from the spec, data plane over TCP); flags override the spec; a bad
/// spec is a clear error and prints nothing.
#[test]
fn launch_prints_the_objects_and_refuses_bad_specs() {
    let d = tempfile::tempdir().unwrap();
    let mut args = vec!["train", "nmt", "--data-dir", "/data/multi30k"];
    args.extend_from_slice(TINY);
    args.push("--print-config");
    let o = shoal(d.path(), &args, None);
    std::fs::write(d.path().join("nmt.toml"), &o.stdout).unwrap();
    std::fs::write(
        d.path().join("job.toml"),
        "name = \"nmt-demo\"\nimage = \"shoal:cpu\"\nkind = \"nmt\"\nconfig = \"nmt.toml\"\nworkers = 3\n[data]\nclaim = \"shoal-data\"\n",
    )
    .unwrap();
    let o = shoal(
        d.path(),
        &["launch", "--k8s", "job.toml", "--dry-run"],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let y = text(&o.stdout);
    assert_eq!(y.matches("\n---\n").count(), 4, "5 objects: {y}");
    // The job's token is kept (owner-only) and the same on the next run: re-applied
    // YAML leaves the Secret as it was; --new-token makes another.
    let kept = d.path().join(".tokens/default.nmt-demo");
    let token = std::fs::read_to_string(&kept).unwrap();
    assert_eq!(token.len(), 48);
    assert!(y.contains(&token), "{y}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&kept).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let fresh = again_then_renewed(d.path(), "job.toml", &o);
    assert!(!text(&fresh.stdout).contains(&token));
    assert_ne!(std::fs::read_to_string(&kept).unwrap(), token);
    std::fs::write(&kept, "garbage").unwrap();
    assert_clear_error(
        &shoal(d.path(), &["launch", "--k8s", "job.toml"], None),
        &["default.nmt-demo", "not a job token", "--new-token"],
    );
    std::fs::remove_file(&kept).unwrap();
    // An elastic configuration: Volcano restarts every pod together and the pods resume
    // from the run directory; the other schedulers cannot, and a shrinking job is refused.
    let mut elastic_cfg = std::fs::read_to_string(d.path().join("nmt.toml")).unwrap();
    elastic_cfg = elastic_cfg
        .replace("[dist]\nworkers = 1", "[dist]\nworkers = 2")
        .replace("max_restarts = 0", "max_restarts = 2");
    std::fs::write(d.path().join("elastic.toml"), &elastic_cfg).unwrap();
    for (scheduler, ok) in [("volcano", true), ("kubernetes", false)] {
        std::fs::write(
            d.path().join("el.toml"),
            format!(
                "name = \"nmt-el\"\nimage = \"shoal:cpu\"\nkind = \"nmt\"\nconfig = \"elastic.toml\"\n\
                 workers = 2\nscheduler = \"{scheduler}\"\n[data]\nclaim = \"shoal-data\"\n"
            ),
        )
        .unwrap();
        let e = shoal(d.path(), &["launch", "--k8s", "el.toml"], None);
        if ok {
            assert!(e.status.success(), "{}", text(&e.stderr));
            let ey = text(&e.stdout);
            for want in ["action: RestartJob", "maxRetry: 2", "name: SHOAL_RESUME"] {
                assert!(ey.contains(want), "'{want}' not in:\n{ey}");
            }
        } else {
            assert_clear_error(&e, &["dist.max_restarts", "volcano"]);
        }
    }
    std::fs::write(
        d.path().join("elastic.toml"),
        elastic_cfg.replace("min_workers = 0", "min_workers = 1"),
    )
    .unwrap();
    std::fs::write(
        d.path().join("el.toml"),
        "name = \"nmt-el\"\nimage = \"shoal:cpu\"\nkind = \"nmt\"\nconfig = \"elastic.toml\"\n\
         workers = 2\nscheduler = \"volcano\"\n[data]\nclaim = \"shoal-data\"\n",
    )
    .unwrap();
    assert_clear_error(
        &shoal(d.path(), &["launch", "--k8s", "el.toml"], None),
        &["dist.min_workers", "fixed number"],
    );
    // `tls = true`: the certificates of a per-job CA go in the Secret, are mounted in
    // every pod, are kept beside the token (the same on the next run) and are renewed
    // with it; the configuration the pods get says dist.tls.
    std::fs::write(
        d.path().join("tls.toml"),
        "name = \"nmt-tls\"\nimage = \"shoal:cpu\"\nkind = \"nmt\"\nconfig = \"nmt.toml\"\nworkers = 2\ntls = true\n[data]\nclaim = \"shoal-data\"\n",
    )
    .unwrap();
    let t = shoal(d.path(), &["launch", "--k8s", "tls.toml"], None);
    assert!(t.status.success(), "{}", text(&t.stderr));
    let ty = text(&t.stdout);
    let certs = d.path().join(".tokens/default.nmt-tls.tls");
    let cert = std::fs::read_to_string(certs.join("cert.pem")).unwrap();
    let body = cert.lines().nth(1).unwrap();
    assert!(
        ty.contains(body),
        "the kept certificate is not in the Secret:\n{ty}"
    );
    for want in [
        "ca.pem",
        "key.pem",
        "SHOAL_TLS_DIR",
        "/etc/shoal-tls",
        "tls = true",
    ] {
        assert!(ty.contains(want), "'{want}' not in:\n{ty}");
    }
    // Both pod templates (coordinator, workers) mount it; the plain job's have none.
    assert_eq!(ty.matches("mountPath: /etc/shoal-tls").count(), 2, "{ty}");
    assert!(!y.contains("SHOAL_TLS_DIR"), "{y}");
    let fresh = again_then_renewed(d.path(), "tls.toml", &t);
    assert!(
        !text(&fresh.stdout).contains(body),
        "--new-token kept the certificates"
    );
    for want in [
        "kind: Secret",
        "kind: ConfigMap",
        "clusterIP: None",
        "name: nmt-demo-worker",
        "completions: 3",
        "value: http://nmt-demo-coordinator-0.nmt-demo:7070",
        "workers = 3",
        "transport = \"tcp\"",
        "mode = \"allreduce\"",
    ] {
        assert!(y.contains(want), "'{want}' not in:\n{y}");
    }
    let o = shoal(
        d.path(),
        &[
            "launch",
            "--k8s",
            "job.toml",
            "--scheduler",
            "volcano",
            "--workers",
            "2",
            "--ps",
            "1",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let y = text(&o.stdout);
    for want in [
        "apiVersion: batch.volcano.sh/v1alpha1",
        "minAvailable: 4",
        "mode = \"ps-sync\"",
    ] {
        assert!(y.contains(want), "'{want}' not in:\n{y}");
    }
    for (flags, needle) in [
        (&["--workers", "0"][..], "at least one worker"),
        (&["--name", "Bad_Name"][..], "not a DNS label"),
        (&["--scheduler", "slurm"][..], "slurm"),
        (&["--ps=-2"][..], "ps = -2"),
    ] {
        let mut a = vec!["launch", "--k8s", "job.toml"];
        a.extend_from_slice(flags);
        let o = shoal(d.path(), &a, None);
        assert_clear_error(&o, &[needle]);
        assert!(o.stdout.is_empty(), "{flags:?} printed objects");
    }
    std::fs::write(
        d.path().join("nocfg.toml"),
        "name = \"x\"\nimage = \"i\"\nkind = \"nmt\"\nconfig = \"missing.toml\"\n[data]\nclaim = \"c\"\n",
    )
    .unwrap();
    assert_clear_error(
        &shoal(d.path(), &["launch", "--k8s", "nocfg.toml"], None),
        &["missing.toml"],
    );
    if !cfg!(feature = "k8s") {
        assert_clear_error(
            &shoal(d.path(), &["launch", "--k8s", "job.toml", "--apply"], None),
            &["--features k8s"],
        );
        assert_clear_error(
            &shoal(d.path(), &["launch", "status", "nmt-demo"], None),
            &["--features k8s", "shoal.dev/job=nmt-demo"],
        );
    }
}

/// `shoal train cnn` then `shoal compress` on Fashion-MNIST (a slice of it; `.ci/run`
/// installs Debian's dataset-fashion-mnist): one configuration with its file and JSON
/// report, a schedule of two, the sensitivity table, and bad settings refused with
/// nothing written.
#[test]
fn train_cnn_and_compress_it() {
    if !require(
        Path::new(shoal_data_dir()).exists(),
        &format!(
            "Fashion-MNIST ({}, Debian's dataset-fashion-mnist)",
            shoal_data_dir()
        ),
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let o = shoal(
        d.path(),
        &[
            "train",
            "cnn",
            "--train-limit",
            "2000",
            "--test-limit",
            "500",
            "--epochs",
            "1",
            "--blocks",
            "8/16",
            "--fc",
            "64",
            "--out",
            "m",
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(text(&o.stdout).lines().last().unwrap()).unwrap();
    assert!(v["top1"].as_f64().unwrap() > 0.5, "{v}");
    let o = shoal(
        d.path(),
        &[
            "compress",
            "--model",
            "m",
            "--prune-fc",
            "0.9",
            "--quant",
            "4",
            "--fine-tune-steps",
            "20",
            "--test-limit",
            "500",
            "--train-limit",
            "2000",
            "--out",
            "m.shoalz",
            "--report",
            "r.json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("prune fc 90% conv 0% + 4-bit codebook"),
        "{}",
        text(&o.stdout)
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("r.json")).unwrap()).unwrap();
    let res = &r["results"][0];
    assert_eq!(
        res["bytes"].as_u64().unwrap(),
        std::fs::metadata(d.path().join("m.shoalz")).unwrap().len()
    );
    assert!(res["ratio"].as_f64().unwrap() > 5.0, "{res}");
    // `shoal info` on the model, the compressed file and the folder; the compressed
    // file goes back into `compress` (scored as stored: the report's top-1 again).
    assert_eq!(event_tags(&d.path().join("m"), "test/top1"), 1, "one epoch");
    let info = info_json(d.path(), "m");
    assert_eq!(info["kind"], "cnn-model");
    assert_eq!(info["metrics"]["top1"], v["top1"], "{info}");
    assert!(info["made"]["network"]
        .as_str()
        .unwrap()
        .contains("conv blocks 8/16"));
    let info = info_json(d.path(), "m.shoalz");
    assert_eq!(info["kind"], "shoalz");
    assert_eq!(
        info["made"]["compression"],
        "prune fc 90% conv 0% + 4-bit codebook"
    );
    let o = shoal(
        d.path(),
        &[
            "compress",
            "--model",
            "m.shoalz",
            "--onnx",
            "z.onnx",
            "--test-limit",
            "500",
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let again: serde_json::Value =
        serde_json::from_str(text(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(again["dense"]["top1"], res["top1"], "{again}");
    assert_eq!(
        info_json(d.path(), "z.onnx")["made"]["input_range"],
        "[0, 1]"
    );
    let o = shoal(d.path(), &["info", "."], None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    for line in ["a CNN model", "a compressed CNN model", "an ONNX model"] {
        assert!(text(&o.stdout).contains(line), "{}", text(&o.stdout));
    }
    assert_clear_error(
        &shoal(
            d.path(),
            &["translate", "--checkpoint", "m"],
            Some("A man.\n"),
        ),
        &["m: a CNN model", "not an NMT checkpoint"],
    );
    // Output paths are checked before the work, and no technique is refused.
    let o = shoal(
        d.path(),
        &[
            "compress",
            "--model",
            "m",
            "--quant",
            "int8",
            "--out",
            "nowhere/m.shoalz",
        ],
        None,
    );
    assert_clear_error(&o, &["--out", "nowhere", "does not exist"]);
    let o = shoal(d.path(), &["compress", "--model", "m"], None);
    assert_clear_error(&o, &["no compression technique"]);
    std::fs::write(
        d.path().join("s.toml"),
        // The flags' spelling (quant = "int8", quant = BITS with rate) and the reports'
        // (a tagged table) both work.
        "[[config]]\nquant = \"int8\"\n\n[[config]]\nquant = 3\nrate = 0.1\n\n\
         [[config]]\nquant = { kind = \"codebook\", bits = 4 }\n\n\
         [[config]]\nsvd_ratio = 4.0\nfine_tune_steps = 10\n",
    )
    .unwrap();
    let o = shoal(
        d.path(),
        &[
            "compress",
            "--model",
            "m",
            "--schedule",
            "s.toml",
            "--test-limit",
            "200",
            "--train-limit",
            "500",
            "--plot",
            "s.png",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    for label in [
        "int8",
        "3-bit codebook",
        "4-bit codebook",
        "svd x4",
        "key: bytes",
    ] {
        assert!(out.contains(label), "'{label}' not in {out}");
    }
    // The chart (its title, axes and legend: shoal-cnn's plot tests): a PNG one legend
    // line taller per row than the plot area and axes (44 + 330 + 54 + 8 pixels).
    let png = std::fs::read(d.path().join("s.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!(height, 44 + 330 + 54 + 8 + 5 * 14, "dense + 4 rows");
    // ONNX out (int8 as QDQ) and back in: the re-imported model compresses the same.
    let o = shoal(
        d.path(),
        &[
            "compress",
            "--model",
            "m",
            "--quant",
            "int8",
            "--test-limit",
            "300",
            "--onnx",
            "m8.onnx",
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let first: serde_json::Value =
        serde_json::from_str(text(&o.stdout).lines().last().unwrap()).unwrap();
    let o = shoal(
        d.path(),
        &[
            "compress",
            "--model",
            "m8.onnx",
            "--quant",
            "int8",
            "--test-limit",
            "300",
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let again: serde_json::Value =
        serde_json::from_str(text(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(first["results"][0]["top1"], again["results"][0]["top1"]);
    let o = shoal(
        d.path(),
        &[
            "compress",
            "--model",
            "m",
            "--sensitivity",
            "--test-limit",
            "200",
        ],
        None,
    );
    assert!(
        o.status.success() && text(&o.stdout).contains("fc1.weight"),
        "{}",
        text(&o.stderr)
    );
    for (args, needle) in [
        (&["--prune-fc", "1.2"][..], "sparsity"),
        (&["--quant", "0"][..], "bits"),
        (&["--quant", "eight"][..], "--quant"),
        (&["--svd-ratio", "0.5"][..], "ratio"),
    ] {
        let mut a = vec!["compress", "--model", "m", "--out", "bad.shoalz"];
        a.extend_from_slice(args);
        assert_clear_error(&shoal(d.path(), &a, None), &[needle]);
        assert!(!d.path().join("bad.shoalz").exists());
    }
    std::fs::write(d.path().join("bad.toml"), "[[config]]\nprune = 0.5\n").unwrap();
    assert_clear_error(
        &shoal(
            d.path(),
            &["compress", "--model", "m", "--schedule", "bad.toml"],
            None,
        ),
        &["bad.toml", "prune"],
    );
    assert_clear_error(
        &shoal(
            d.path(),
            &["compress", "--model", "nowhere", "--quant", "int8"],
            None,
        ),
        &["nowhere"],
    );
}

/// `available`, for the checks that need `what`: where it is missing, a CI run (`CI`
/// set to anything but empty, `false` or `0`) fails naming it, and any other run prints
/// a notice that those checks did not run.
fn require(available: bool, what: &str) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    if !available {
        assert!(!ci, "{what} is not available, and CI requires it");
        eprintln!("NOTICE: {what} is not available here; the checks that need it did not run");
    }
    available
}

fn shoal_data_dir() -> &'static str {
    "/usr/share/datasets/fashion-mnist"
}

#[test]
fn generated_click_logs_go_into_a_folder_that_does_not_exist_yet() {
    let dir = tempfile::tempdir().unwrap();
    let o = shoal(
        dir.path(),
        &[
            "data",
            "gen-ctr",
            "--rows",
            "500",
            "--fields",
            "3",
            "--ids-per-field",
            "10",
            "--out",
            "runs/new/clicks.csv",
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let csv = std::fs::read_to_string(dir.path().join("runs/new/clicks.csv")).unwrap();
    let probs = std::fs::read_to_string(dir.path().join("runs/new/clicks.csv.p")).unwrap();
    assert_eq!(csv.lines().next(), Some("label,C1,C2,C3"));
    assert_eq!((csv.lines().count(), probs.lines().count()), (501, 500));
}

/// Hosts made of network namespaces: each has its own address on a bridge in the root
/// namespace (`ip netns`, veth pairs); removed on drop.
struct Hosts {
    bridge: String,
    names: Vec<String>,
    /// The root side of each host's link (cutting it cuts the host off).
    links: Vec<String>,
    net: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Hosts {
    /// `n` hosts at `10.N.0.2...`, the bridge (this namespace) at `10.N.0.1`; None where
    /// namespaces cannot be made (not root, no iproute2).
    fn make(n: usize) -> Option<Hosts> {
        let id = std::process::id() % 100_000;
        let net = format!("10.{}.{}", 100 + id % 150, id % 250);
        let h = Hosts {
            bridge: format!("shb{id}"),
            names: (0..n).map(|i| format!("shoal-{id}-h{i}")).collect(),
            links: (0..n).map(|i| format!("shv{id}x{i}")).collect(),
            net,
        };
        let b = h.bridge.as_str();
        let mut ok = ip(&["link", "add", b, "type", "bridge"])
            && ip(&["addr", "add", &format!("{}.1/24", h.net), "dev", b])
            && ip(&["link", "set", b, "up"]);
        for (i, (ns, l)) in h.names.iter().zip(&h.links).enumerate() {
            let peer = format!("{l}p");
            ok = ok
                && ip(&["netns", "add", ns])
                && ip(&["link", "add", l, "type", "veth", "peer", "name", &peer])
                && ip(&["link", "set", &peer, "netns", ns])
                && ip(&["link", "set", l, "master", b])
                && ip(&["link", "set", l, "up"])
                && ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{}/24", h.addr(i)),
                    "dev",
                    &peer,
                ])
                && ip(&["-n", ns, "link", "set", &peer, "up"])
                && ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ok.then_some(h)
    }

    fn addr(&self, i: usize) -> String {
        format!("{}.{}", self.net, i + 2)
    }

    /// `shoal ARGS` run inside host `i`.
    fn shoal(&self, i: usize, dir: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.names[i], env!("CARGO_BIN_EXE_shoal")])
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.names {
            ip(&["netns", "del", ns]);
        }
        ip(&["link", "del", &self.bridge]);
    }
}

/// Two hosts (network namespaces, each its own address, linked through a bridge): a
/// 2-worker NMT job over TCP, the coordinator on the bridge's address and one worker on
/// each host, trains the same bits as the local launcher's 2-worker TCP job; then a job
/// whose second host is cut off mid-run stops within the heartbeat timeout, naming that
/// host.
#[test]
fn two_hosts_train_like_one_and_a_cut_link_names_the_host() {
    let Some(hosts) = Hosts::make(2) else {
        require(false, "network namespaces (root and iproute2)");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    slice(d.path(), 48);
    let mut args = vec!["train", "nmt", "--data-dir", ".", "--no-eval"];
    args.extend_from_slice(TINY);
    args.extend_from_slice(&["--workers", "2", "--set", "dist.transport=tcp"]);
    args.extend_from_slice(&["--set", "dist.heartbeat_timeout_s=3"]);
    // The local launcher's job: the reference.
    let mut local = args.clone();
    local.extend_from_slice(&["--max-steps", "3", "--out", "local"]);
    let o = shoal(d.path(), &local, None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let job = |name: &str, steps: &str, cut: bool| -> (Output, Vec<Output>) {
        let mut a = args.clone();
        a.extend_from_slice(&["--max-steps", steps, "--print-config"]);
        let o = shoal(d.path(), &a, None);
        assert!(o.status.success(), "{}", text(&o.stderr));
        let cfg = format!("{name}.toml");
        std::fs::write(d.path().join(&cfg), &o.stdout).unwrap();
        let env = |c: &mut Command| {
            c.env("SHOAL_JOB_TOKEN", "hosts-token")
                .env("SHOAL_RUN_DIR", name)
                .env("RAYON_NUM_THREADS", "1");
        };
        let mut coord = Command::new(env!("CARGO_BIN_EXE_shoal"));
        coord
            .current_dir(d.path())
            .args(["coordinator", "--kind", "nmt", "--config", &cfg, "--listen"])
            .arg(format!("{}.1:0", hosts.net))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        env(&mut coord);
        let mut coord = coord.spawn().unwrap();
        let (lines, coord_err) = watch_stderr(&mut coord);
        let said = wait_line(&lines, "coordinator listening on ", name);
        let addr = said
            .trim_start_matches("coordinator listening on ")
            .trim()
            .to_string();
        let mut workers = Vec::new();
        for i in 0..2 {
            let mut c = hosts.shoal(i, d.path(), &["role"]);
            env(&mut c);
            c.env("SHOAL_ROLE", "worker")
                .env("SHOAL_COORDINATOR", format!("http://{addr}"))
                .env("SHOAL_HOST", hosts.addr(i))
                .env("JOB_COMPLETION_INDEX", i.to_string());
            let mut w = c.spawn().unwrap();
            let (wl, we) = watch_stderr(&mut w);
            workers.push((w, wl, we));
        }
        if cut {
            // Once both train, host 1 loses its link.
            for (_, wl, _) in &workers {
                wait_line(wl, "exchanging gradients by ring allreduce over TCP", name);
            }
            assert!(ip(&["link", "set", &hosts.links[1], "down"]));
        }
        let outs: Vec<Output> = workers
            .into_iter()
            .map(|(w, _, we)| {
                let mut o = wait_or_kill_output(w, name);
                o.stderr = we.join().unwrap().into_bytes();
                o
            })
            .collect();
        let mut co = wait_or_kill_output(coord, name);
        co.stderr = coord_err.join().unwrap().into_bytes();
        (co, outs)
    };
    let (co, outs) = job("hosts", "3", false);
    for o in &outs {
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
    assert!(co.status.success(), "{}", text(&co.stderr));
    assert!(text(&outs[1].stderr).contains(&format!("registered from {}", hosts.addr(1))));
    let f = "ckpt-00000003/model.safetensors";
    let a = std::fs::read(d.path().join("local").join(f)).unwrap();
    let b = std::fs::read(d.path().join("hosts").join(f)).unwrap();
    assert!(
        a == b,
        "two hosts trained other bits than one host's two workers"
    );
    // The cut: the coordinator fails the job naming host 1 (its heartbeats stop), and
    // no process is left running.
    let (co, _outs) = job("cut", "100000", true);
    assert!(!co.status.success(), "the job survived a cut link");
    let e = text(&co.stderr);
    assert!(e.contains(&format!("host {}", hosts.addr(1))), "{e}");
    assert!(e.contains("no heartbeat"), "{e}");
}

/// Waits for `child` (bounded by [`HANG`]); kills it and fails naming `what` past that.
fn wait_or_kill_output(mut child: std::process::Child, what: &str) -> Output {
    let start = std::time::Instant::now();
    loop {
        if let Some(_s) = child.try_wait().unwrap() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > HANG {
            let _ = child.kill();
            panic!("{what}: a process hung");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
