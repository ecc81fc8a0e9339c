#!/usr/bin/env python3
"""PyTorch side of `bench/run gru-layer`: one nn.GRU (or nn.LSTM) layer, forward and
backward of sum(out * c) with gradients of the input and all weights, on random input.
Prints one JSON line: ms per iteration and matrix-product GFLOP/s (forward + backward,
counted as 3x the forward's products, as shoal counts them)."""

import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cell", default="gru", choices=["gru", "lstm"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--input", type=int, default=None)
    ap.add_argument("--len", type=int, default=20)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    inp = a.input or a.hidden
    layer = (torch.nn.GRU if a.cell == "gru" else torch.nn.LSTM)(inp, a.hidden, batch_first=True)
    x = torch.randn(a.batch, a.len, inp, requires_grad=True)
    c = torch.randn(a.batch, a.len, a.hidden)
    for i in range(a.warmup + a.iters):
        if i == a.warmup:
            start = time.perf_counter()
        x.grad = None
        layer.zero_grad(set_to_none=True)
        out, _ = layer(x)
        (out * c).sum().backward()
    secs = (time.perf_counter() - start) / a.iters
    g = (3 if a.cell == "gru" else 4) * a.hidden
    flops = 3 * 2.0 * a.batch * a.len * (inp * g + a.hidden * g)
    print(json.dumps({"ms_per_iter": secs * 1000, "gflops": flops / secs / 1e9,
                      "torch": torch.__version__, "threads": a.threads}))


if __name__ == "__main__":
    main()
