#!/usr/bin/env python3
"""bench/run faults: short elastic NMT jobs, each with one fault at a random time.

Each run trains a tiny NMT model (480 pairs of the shared Multi30k data, 200 updates of
a global batch of 48, a checkpoint every 10) as one of two jobs:

  allreduce   --workers 2:3 --max-restarts 3       (3 workers, ring allreduce)
  ps          --workers 1:2 --ps 2 --max-restarts 3 (2 workers, 2 shards)

and injects one fault once a randomly chosen checkpoint exists (plus a random delay):
SIGKILL of a random worker, of a random shard (ps jobs), or of the launcher itself (it
hosts the coordinator: its processes must then stop by themselves, and the job is
resumed with `shoal train nmt --resume RUN`). Afterwards it checks the run: the job
completed all 200 updates; its final parameters equal those of one uninterrupted
process on the same global batches (1e-5 relative); every checkpoint left loads
(`shoal info`); no process of the job outlives it; no shared-memory file is left.

Standard library only. The last line is the benchmark contract's JSON object.
"""

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from array import array

STEPS = 200
EVERY = 10
HEARTBEAT_S = 3.0

BASE = [
    "train", "nmt", "--data-dir", ".", "--no-eval", "--dropout", "0",
    "--epochs", "20", "--checkpoint-every", str(EVERY),
    "--set", "data.src_vocab=200", "--set", "data.tgt_vocab=200",
    "--set", "model.embed=16", "--set", "model.hidden=16", "--set", "model.layers=1",
    "--set", "eval.samples=1", "--set", f"dist.heartbeat_timeout_s={HEARTBEAT_S}",
]
JOBS = {
    "allreduce": (["--batch-size", "16", "--workers", "2:3", "--max-restarts", "3"], 3, 0),
    "ps": (["--batch-size", "24", "--workers", "1:2", "--ps", "2", "--max-restarts", "3"], 2, 2),
}


def params(ckpt):
    """The flat float32 parameters of a checkpoint's model.safetensors, by name order."""
    with open(os.path.join(ckpt, "model.safetensors"), "rb") as f:
        b = f.read()
    (n,) = struct.unpack("<Q", b[:8])
    header = json.loads(b[8 : 8 + n])
    data = b[8 + n :]
    out = array("f")
    for name in sorted(k for k in header if k != "__metadata__"):
        s, e = header[name]["data_offsets"]
        out.frombytes(data[s:e])
    return out


def gap(a, b):
    d = sum((x - y) ** 2 for x, y in zip(a, b))
    n = sum(y * y for y in b)
    return (d / n) ** 0.5 if len(a) == len(b) else float("inf")


def shm_files():
    try:
        return {f for f in os.listdir("/dev/shm") if f.startswith("shoal-")}
    except OSError:
        return set()


def job_pids(run):
    """Processes whose environment names `run` as their run directory."""
    want = f"SHOAL_RUN_DIR={run}".encode()
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                if want in f.read().split(b"\0"):
                    pids.append(int(p))
        except OSError:
            pass
    return pids


def pid_of(run, name):
    """The process whose stderr is RUN/job/logs/NAME.log."""
    log = os.path.join(run, "job", "logs", f"{name}.log")
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.readlink(f"/proc/{p}/fd/2") == log:
                    return int(p)
            except OSError:
                pass
    return None


def wait_for(path, proc, limit_s):
    t = time.monotonic() + limit_s
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > t:
            return False
        time.sleep(0.01)
    return True


def one_run(shoal, work, i, rng, reference):
    job = rng.choice(sorted(JOBS))
    flags, workers, shards = JOBS[job]
    faults = ["worker"] * 3 + (["shard"] * 2 if shards else []) + ["coordinator"]
    fault = rng.choice(faults)
    at = rng.randrange(EVERY, STEPS - 3 * EVERY, EVERY)
    delay = rng.uniform(0.0, 0.15)
    run = os.path.join(work, f"run-{i:03d}")
    shm_before = shm_files()
    r = {"run": i, "job": job, "fault": fault, "after_checkpoint": at}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [shoal] + BASE + flags + ["--out", run], cwd=work,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    victim = None
    if wait_for(os.path.join(run, f"ckpt-{at:08d}", "meta.json"), proc, 300):
        time.sleep(delay)
        if fault == "coordinator":
            victim = ("launcher", proc.pid)
        else:
            # The job's size now: the most a membership change left it with.
            name = f"worker-{rng.randrange(workers)}" if fault == "worker" else f"ps-{rng.randrange(shards)}"
            pid = pid_of(run, name)
            if pid is None and fault == "worker":
                name, pid = "worker-0", pid_of(run, "worker-0")
            victim = (name, pid) if pid else None
        if victim:
            try:
                os.kill(victim[1], signal.SIGKILL)
            except ProcessLookupError:
                victim = None
    r["victim"] = victim[0] if victim else None
    _, err = proc.communicate()
    err = err.decode(errors="replace")
    r["exit"] = proc.returncode
    if victim and victim[0] == "launcher":
        # Its processes stop by themselves (the coordinator is gone) within the
        # heartbeat timeout (and the watchdog's own margin); then the job is resumed.
        t_kill = time.monotonic()
        while job_pids(run) and time.monotonic() - t_kill < HEARTBEAT_S + 30:
            time.sleep(0.05)
        r["stop_s"] = round(time.monotonic() - t_kill, 2)
        left = job_pids(run)
        r["orphans"] = len(left)
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        res = subprocess.run(
            [shoal, "train", "nmt", "--resume", run, "--no-eval"], cwd=work,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        r["exit"] = res.returncode
        err += res.stderr.decode(errors="replace")
        r["recovery_s"] = None
    else:
        left = job_pids(run)
        r["orphans"] = len(left)
    r["seconds"] = round(time.monotonic() - t0, 2)
    final = os.path.join(run, f"ckpt-{STEPS:08d}")
    r["completed"] = r["exit"] == 0 and os.path.isfile(os.path.join(final, "meta.json"))
    r["param_gap"] = gap(params(final), reference[job]) if r["completed"] else None
    # Membership changes the launcher recorded.
    lost, rec = [], []
    try:
        with open(os.path.join(run, "membership.jsonl")) as f:
            for line in f:
                e = json.loads(line)
                if e["ev"] == "membership" and e["change"] == "failed":
                    lost.append(e["steps_lost"])
                elif e["ev"] == "recovered":
                    rec.append(e["seconds"])
    except OSError:
        pass
    r["steps_lost"] = max(lost) if lost else 0
    if victim and victim[0] != "launcher":
        # From the fault to the first update after it (the launcher sees the death at
        # once; its record counts from its restart decision).
        r["recovery_s"] = rec[0] if rec else None
    corrupt = 0
    for d in sorted(os.listdir(run)):
        if d.startswith("ckpt-") and not d.endswith((".tmp", ".old")):
            info = subprocess.run([shoal, "info", os.path.join(run, d)], capture_output=True)
            corrupt += info.returncode != 0
    r["corrupt_checkpoints"] = corrupt
    r["shm_left"] = len(shm_files() - shm_before)
    if not r["completed"]:
        r["error"] = err.strip().splitlines()[-3:]
    shutil.rmtree(run, ignore_errors=True)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shoal", required=True)
    ap.add_argument("--data", required=True, help="the Multi30k folder")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    a = ap.parse_args()
    if a.runs < 1:
        sys.exit("--runs must be at least 1")
    shoal = os.path.abspath(a.shoal)
    rng = random.Random(a.seed)
    work = tempfile.mkdtemp(prefix="shoal-faults-")
    try:
        for f in ["train.en", "train.de", "val.en", "val.de"]:
            with open(os.path.join(a.data, f)) as src, open(os.path.join(work, f), "w") as dst:
                dst.writelines(src.readlines()[:480])
        print(f"==> seed {a.seed}; {a.runs} runs in {work}", flush=True)
        # The fault-free reference of each job: one process on the same global batches.
        reference = {}
        for job, (flags, workers, _) in JOBS.items():
            global_batch = workers * int(flags[flags.index("--batch-size") + 1])
            out = os.path.join(work, f"ref-{job}")
            subprocess.run(
                [shoal] + BASE + ["--batch-size", str(global_batch), "--out", out],
                cwd=work, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            reference[job] = params(os.path.join(out, f"ckpt-{STEPS:08d}"))
        runs = []
        for i in range(a.runs):
            r = one_run(shoal, work, i, rng, reference)
            runs.append(r)
            print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rec = [r["recovery_s"] for r in runs if r.get("recovery_s") is not None]
    stops = [r["stop_s"] for r in runs if "stop_s" in r]
    completed = sum(r["completed"] for r in runs)
    wrong = sum(1 for r in runs if r["completed"] and not r["param_gap"] < 1e-5)
    out = {
        "name": "faults",
        "unit": "completed runs / runs",
        "shoal": completed / len(runs),
        "peer": "goal: every run completes",
        "peer_value": 1.0,
        "ratio": completed / len(runs),
        "runs": len(runs),
        "completed": completed,
        "faults": {f: sum(r["victim"] is not None and r["fault"] == f for r in runs)
                   for f in ["worker", "shard", "coordinator"]},
        "no_fault_injected": sum(r["victim"] is None for r in runs),
        "wrong_results": wrong,
        "param_gap_max": max((r["param_gap"] for r in runs if r["param_gap"] is not None), default=None),
        "steps_lost_max": max(r["steps_lost"] for r in runs),
        "recovery_s_median": statistics.median(rec) if rec else None,
        "recovery_s_max": max(rec) if rec else None,
        "coordinator_stop_s_max": max(stops) if stops else None,
        "corrupt_checkpoints": sum(r["corrupt_checkpoints"] for r in runs),
        "orphans": sum(r["orphans"] for r in runs),
        "shm_left": sum(r["shm_left"] for r in runs),
        "seed": a.seed,
    }
    print(json.dumps(out))
    bad = completed < len(runs) or wrong or out["corrupt_checkpoints"] or out["orphans"] or out["shm_left"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
