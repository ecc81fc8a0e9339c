#!/usr/bin/env python3
"""Prints the table and the final JSON line of `bench/run nmt-scaling`.

Also checks `shoal plan`'s cost model against the runs: calibrated from the
single-threaded run (compute and optimizer per step, words per step, parameters) and
its own link measurements, it predicts each 2-worker configuration's step time.

Usage: nmt_scaling_table.py SHOAL PEER_JSON BUSY_PCT STEPS NAME=SHOAL_JSON...
"""
import json
import subprocess
import sys

shoal = sys.argv[1]
peer = json.loads(sys.argv[2])
busy = int(sys.argv[3])
steps = int(sys.argv[4])
runs = {}
for a in sys.argv[5:]:
    name, js = a.split("=", 1)
    runs[name] = json.loads(js)
base = runs["1-process"]["tokens_per_s"]

# The cost model, calibrated from the single-threaded run.
one = runs["1-process"]
t1 = one["timing"][0]
n_steps = one["steps"]
plan = json.loads(subprocess.run(
    [shoal, "plan", "--json", "--nodes", "1", "--workers-per-node", "2", "--cores-per-node", "2",
     "--values", str(one["params"]),
     "--compute-ms", str(1e3 * (t1["forward"] + t1["backward"] + t1["grads_out"] + t1["params_in"]) / n_steps),
     "--opt-ns", str(1e9 * t1["optimizer"] / n_steps / one["params"]),
     "--words-per-step", str(one["tokens_per_s"] * one["seconds"] / n_steps)],
    check=True, capture_output=True, text=True).stdout)
def predicted(name):
    """Predicted step seconds; on this one host every shard shares the workers' host."""
    for o in plan["options"]:
        s = o["strategy"]
        if name.startswith("allreduce") and s["kind"] == "allreduce":
            return o["step_s"]
        if name.startswith("ps") and s["kind"] == "ps" and s["colocated"] and \
                s["shards"] == int(name[2]):
            return o["step_s"]
    return None
print()
print(f"{'configuration':<24} {'words/s':>8} {'per worker':>13} {'speed-up':>8} {'effic.':>6} "
      f"{'compute ms':>10} {'comm ms':>8} {'step ms':>7} {'model ms':>8} {'error':>6} {'val loss':>8}")
rows = []
for name, r in runs.items():
    w = r.get("worker_tokens_per_s", [r["tokens_per_s"]])
    n = len(w)
    sp = r["tokens_per_s"] / base
    t = r.get("timing")
    if t:
        # Per step, averaged over workers: compute = forward + backward + gradients out +
        # optimizer (local Adam, or none with ps) + parameters in; comm = allreduce, or
        # push + pull (waiting for the other worker and the shards included).
        comp = sum(x["forward"] + x["backward"] + x["grads_out"] + x["optimizer"] + x["params_in"]
                   for x in t) / n
        comm = sum(x["comm"] for x in t) / n
        comp, comm = comp / steps * 1e3, comm / steps * 1e3
    else:
        comp, comm = 1e3 * r["seconds"] / steps, 0.0
    eff = sp / n
    per = " + ".join(f"{x:.0f}" for x in w) if n > 1 else ""
    step_ms = 1e3 * r["seconds"] / r["steps"]
    pred = predicted(name) if n > 1 and not name.startswith("async") else None
    pred_ms = 1e3 * pred if pred else float("nan")
    err = (pred_ms - step_ms) / step_ms if pred else float("nan")
    print(f"{name:<24} {r['tokens_per_s']:>8.0f} {per:>13} {sp:>8.2f} {eff:>6.2f} {comp:>10.1f} "
          f"{comm:>8.1f} {step_ms:>7.1f} {pred_ms:>8.1f} {err:>+6.0%} {r.get('valid_loss', float('nan')):>8.3f}")
    rows.append({"config": name, "words_per_s": r["tokens_per_s"], "per_worker": w, "speedup": sp,
                 "efficiency": eff, "compute_ms_per_step": comp, "comm_ms_per_step": comm,
                 "step_ms": step_ms, "predicted_step_ms": pred_ms if pred else None,
                 "prediction_error": err if pred else None, "valid_loss": r.get("valid_loss")})
two = [x for x in rows if x["config"].endswith("-2w") and not x["config"].startswith("async")]
best = max(two, key=lambda x: x["speedup"])
worst_err = max(abs(x["prediction_error"]) for x in rows if x["prediction_error"] is not None)
print(f"\nshoal plan (calibrated on the 1-process run and its own link timings) predicts the "
      f"2-worker step times within {worst_err:.0%} (goal: 20%)")
print(f"\nbest synchronous 2-worker configuration: {best['config']}, speed-up {best['speedup']:.2f} "
      f"(ideal 2.0); PyTorch DDP (gloo, 2 x 1 thread): {peer['speedup']:.2f} "
      f"({peer['single_words_per_s']:.0f} -> {peer['ddp_words_per_s']:.0f} words/s on fixed-length batches)")
print(json.dumps({
    "name": "nmt-scaling",
    "unit": "speed-up of target words/s: best synchronous 2-worker job over 1 single-threaded process",
    "shoal": best["speedup"],
    "peer": "pytorch-" + peer["torch"].split("+")[0] + " DDP gloo",
    "peer_value": peer["speedup"],
    "ratio": best["speedup"],
    "ratio_note": "ratio is shoal's speed-up (issue 4's definition: ideal 2.0, goal >= 1.7); "
                  "shoal_vs_peer compares the two speed-ups",
    "shoal_vs_peer": best["speedup"] / peer["speedup"],
    "best_config": best["config"],
    "configs": rows,
    "steps_per_run": steps,
    "plan_worst_error": worst_err,
    "cpu_busy_pct_before": busy,
}))
