"""onnxruntime's inference latency on an ONNX model (the peer of `bench/run
compress-latency`): median milliseconds per batch at batch 1 and 64, with the thread
count shoal uses, on the same Fashion-MNIST-shaped inputs. Prints one JSON line.

    python bench/onnx_latency.py MODEL.onnx [--threads 2]
"""
import argparse
import json
import time

import numpy as np
import onnxruntime as ort

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
opts = ort.SessionOptions()
opts.intra_op_num_threads = a.threads
opts.inter_op_num_threads = 1
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
sess = ort.InferenceSession(a.model, opts, providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
rng = np.random.default_rng(1)
out = {"onnxruntime": ort.__version__, "threads": a.threads}
for batch, reps in [(1, 200), (64, 20)]:
    x = rng.standard_normal((batch, 1, 28, 28), dtype=np.float32)
    sess.run(None, {name: x})
    t = []
    for _ in range(reps):
        s = time.perf_counter()
        sess.run(None, {name: x})
        t.append((time.perf_counter() - s) * 1e3)
    out[f"b{batch}_ms"] = float(np.median(t))
print(json.dumps(out))
