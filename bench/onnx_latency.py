"""onnxruntime's side of `bench/run compress-latency`: the dense ONNX export as it is, and
onnxruntime's own int8 quantization of it (`onnxruntime.quantization.quantize_static`, QDQ
format, int8 weights per channel, calibrated on training images), each timed at batch 1 and
64 (median milliseconds per batch, the thread count shoal uses) and scored on the first
test images. Prints one JSON line.

    python bench/onnx_latency.py MODEL.onnx [--threads 2] [--data DIR] [--test-limit N]
        [--calibration N] [--int8-out PATH]
"""
import argparse
import gzip
import json
import os
import time

import numpy as np
import onnxruntime as ort

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
ap.add_argument("--test-limit", type=int, default=1000)
ap.add_argument("--calibration", type=int, default=256, help="training images for calibration")
ap.add_argument("--int8-out", default=None, help="where the int8 model is written (default beside MODEL)")
a = ap.parse_args()


def idx(name):
    """An IDX file of Fashion-MNIST (gzip'd), as a numpy array."""
    with gzip.open(os.path.join(a.data, name), "rb") as f:
        b = f.read()
    dims = b[3]
    shape = [int.from_bytes(b[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(b, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def pixels(images):
    # What the export takes: float32 [N, 1, 28, 28], pixels / 255 (it normalises inside).
    return (images.astype(np.float32) / 255.0)[:, None, :, :]


train_x = pixels(idx("train-images-idx3-ubyte.gz")[: a.calibration])
test_x = pixels(idx("t10k-images-idx3-ubyte.gz")[: a.test_limit])
test_y = idx("t10k-labels-idx1-ubyte.gz")[: a.test_limit]

from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,  # noqa: E402
                                      QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: E402


class Calibration(CalibrationDataReader):
    def __init__(self, name):
        self.batches = iter([{name: train_x[i:i + 32]} for i in range(0, len(train_x), 32)])

    def get_next(self):
        return next(self.batches, None)


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


int8 = a.int8_out or os.path.splitext(a.model)[0] + ".ort-int8.onnx"
pre = os.path.splitext(a.model)[0] + ".ort-pre.onnx"
quant_pre_process(a.model, pre)
name = session(a.model).get_inputs()[0].name
quantize_static(pre, int8, Calibration(name), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax)

rng = np.random.default_rng(1)
out = {"onnxruntime": ort.__version__, "threads": a.threads, "test_images": int(len(test_y)),
       "calibration_images": int(len(train_x))}
for tag, path in [("dense", a.model), ("int8", int8)]:
    sess = session(path)
    logits = np.concatenate([sess.run(None, {name: test_x[i:i + 100]})[0] for i in range(0, len(test_x), 100)])
    out[f"{tag}_top1"] = float((logits.argmax(1) == test_y).mean())
    for batch, reps in [(1, 300), (64, 30)]:
        x = rng.standard_normal((batch, 1, 28, 28), dtype=np.float32)
        sess.run(None, {name: x})
        t = []
        for _ in range(reps):
            s = time.perf_counter()
            sess.run(None, {name: x})
            t.append((time.perf_counter() - s) * 1e3)
        out[f"{tag}_b{batch}_ms"] = float(np.median(t))
# The dense figures under their old names too.
out["b1_ms"], out["b64_ms"] = out["dense_b1_ms"], out["dense_b64_ms"]
print(json.dumps(out))
