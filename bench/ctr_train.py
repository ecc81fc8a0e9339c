#!/usr/bin/env python3
"""PyTorch peer for `bench/run ctr-train`: DeepFM trained on the same click log as shoal.

Each field's ids (hex strings) are numbered on the training file (0 = unseen); every id
owns one row [w, v_1..v_dim] of a single embedding table (per-field offsets), like
shoal's sparse rows. Logit = bias + sum w + FM(v) + MLP(concat v), MLP 128-64-1 with
ReLU. Rows: Adagrad with sparse gradients (lr 0.02); bias and MLP: Adam (lr 1e-3);
batch 256; init of rows uniform +-0.01. Prints one JSON line: training examples/s
(training loop only), held-out AUC and log loss.

Usage: ctr_train.py --train FILE --test FILE [--epochs E] [--threads T] [--dim D]
"""

import argparse
import csv
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn

# The held-out AUC as the PyTorch example computes it (ties share their mean rank).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "torch"))
from deepfm import auc  # noqa: E402


def read(path, vocab=None):
    """Returns labels (float32), ids (int64 [rows, fields]) and the vocabularies."""
    with open(path) as f:
        r = csv.reader(f)
        header = next(r)
        li = header.index("label")
        fields = [i for i in range(len(header)) if i != li]
        build = vocab is None
        if build:
            vocab = [dict() for _ in fields]
        labels, ids = [], []
        for row in r:
            labels.append(float(row[li]))
            out = []
            for j, c in enumerate(fields):
                d = vocab[j]
                v = row[c]
                k = d.get(v)
                if k is None:
                    if build:
                        k = len(d) + 1
                        d[v] = k
                    else:
                        k = 0
                out.append(k)
            ids.append(out)
    return np.asarray(labels, dtype=np.float32), np.asarray(ids, dtype=np.int64), vocab


class DeepFM(nn.Module):
    def __init__(self, sizes, dim, hidden):
        super().__init__()
        self.dim = dim
        offsets = np.cumsum([0] + [s + 1 for s in sizes[:-1]])
        self.register_buffer("offsets", torch.as_tensor(offsets, dtype=torch.int64))
        self.rows = nn.Embedding(int(sum(s + 1 for s in sizes)), 1 + dim, sparse=True)
        nn.init.uniform_(self.rows.weight, -0.01, 0.01)
        self.bias = nn.Parameter(torch.zeros(1))
        layers, inp = [], len(sizes) * dim
        for h in hidden:
            layers += [nn.Linear(inp, h), nn.ReLU()]
            inp = h
        layers.append(nn.Linear(inp, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, ids):
        r = self.rows(ids + self.offsets)  # [B, F, 1 + dim]
        w, v = r[..., 0], r[..., 1:]
        s = v.sum(1)
        fm = 0.5 * (s * s - (v * v).sum(1)).sum(1)
        deep = self.mlp(v.reshape(v.shape[0], -1)).squeeze(1)
        return self.bias + w.sum(1) + fm + deep


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--batch", type=int, default=256)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    y, x, vocab = read(a.train)
    ty, tx, _ = read(a.test, vocab)
    model = DeepFM([len(v) for v in vocab], a.dim, [128, 64])
    sparse_opt = torch.optim.Adagrad([model.rows.weight], lr=0.02, eps=1e-8)
    dense_opt = torch.optim.Adam([model.bias] + list(model.mlp.parameters()), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    seen, seconds = 0, 0.0
    for epoch in range(a.epochs):
        perm = torch.randperm(len(yt))
        t0 = time.perf_counter()
        for i in range(0, len(perm), a.batch):
            idx = perm[i : i + a.batch]
            loss = loss_fn(model(xt[idx]), yt[idx])
            sparse_opt.zero_grad()
            dense_opt.zero_grad()
            loss.backward()
            sparse_opt.step()
            dense_opt.step()
            seen += len(idx)
        seconds += time.perf_counter() - t0
    with torch.no_grad():
        probs = torch.sigmoid(model(torch.as_tensor(tx))).numpy().astype(np.float64)
    eps = 1e-7
    pc = np.clip(probs, eps, 1 - eps)
    ll = float(-np.mean(ty * np.log(pc) + (1 - ty) * np.log(1 - pc)))
    print(json.dumps({
        "examples_per_s": seen / seconds,
        "train_seconds": seconds,
        "auc": auc(probs, ty),
        "logloss": ll,
        "rows": int(model.rows.weight.shape[0]),
        "torch": torch.__version__,
        "threads": a.threads,
    }))


if __name__ == "__main__":
    main()
