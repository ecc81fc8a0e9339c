#!/usr/bin/env python3
"""DeepFM in PyTorch on a click log, data-parallel over the processes of a `shoal run`
job (or one process alone), with its embedding rows either on shoal's parameter-server
shards (`--embedding shoal`: shoal.torch.SparseEmbedding keyed by hashed (field, value)
ids, no vocabulary; the MLP through shoal.torch.DistributedOptimizer) or in every
process (`--embedding torch`: nn.Embedding(sparse=True) over a vocabulary numbered on
the training file, under DistributedDataParallel over gloo).

Each process trains on its share of every global batch (rank r of n takes rows r, r+n,
... of a seeded shuffle); rank 0 then scores the held-out file and prints one JSON line:
the job's training examples/s, held-out AUC and log loss.

Model (as bench/ctr_train.py): logit = bias + sum w + FM(v) + MLP(concat v), MLP
128-64-1 with ReLU; rows [w, v_1..v_dim] Adagrad (lr 0.02, eps 1e-8, init +-0.01); bias
and MLP Adam (lr 1e-3).

Usage: shoal run -n 2 [--ps 2] -- python deepfm.py (--data FILE | --train FILE --test FILE)
       [--embedding shoal|torch] [--epochs E] [--batch B (global)] [--dim D]
(--data: its last 20% of rows held out.)
"""

import argparse
import csv
import json
import os
import time

import numpy as np
import torch
from torch import nn


def read(path):
    """Labels (float32) and the raw field values (hex strings) of a click log."""
    with open(path) as f:
        r = csv.reader(f)
        header = next(r)
        li = header.index("label")
        fields = [i for i in range(len(header)) if i != li]
        labels, vals = [], []
        for row in r:
            labels.append(float(row[li]))
            vals.append([row[c] for c in fields])
    return np.asarray(labels, dtype=np.float32), vals


def hashed_keys(vals):
    """(field, value) as one 64-bit key: the field in the top byte, the value's hash
    below (values are hex ids here; any string would do)."""
    out = np.empty((len(vals), len(vals[0])), dtype=np.int64)
    for i, row in enumerate(vals):
        for j, v in enumerate(row):
            out[i, j] = (j << 56) | (int(v, 16) & ((1 << 56) - 1))
    return out


def numbered(vals, vocab=None):
    """Each field's values numbered on the training file (0: unseen), offset per field."""
    build = vocab is None
    if build:
        vocab = [dict() for _ in vals[0]]
    out = np.empty((len(vals), len(vals[0])), dtype=np.int64)
    for i, row in enumerate(vals):
        for j, v in enumerate(row):
            k = vocab[j].get(v)
            if k is None:
                k = len(vocab[j]) + 1 if build else 0
                if build:
                    vocab[j][v] = k
            out[i, j] = k
    return out, vocab


def auc(scores, labels):
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    pos = labels > 0.5
    p, n = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - p * (p + 1) / 2.0) / (p * n))


class DeepFM(nn.Module):
    def __init__(self, rows, fields, dim, hidden=(128, 64)):
        super().__init__()
        self.rows = rows  # keys [B, F] -> [B, F, 1 + dim]
        self.bias = nn.Parameter(torch.zeros(1))
        layers, inp = [], fields * dim
        for h in hidden:
            layers += [nn.Linear(inp, h), nn.ReLU()]
            inp = h
        layers.append(nn.Linear(inp, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, keys):
        r = self.rows(keys)
        w, v = r[..., 0], r[..., 1:]
        s = v.sum(1)
        fm = 0.5 * (s * s - (v * v).sum(1)).sum(1)
        deep = self.mlp(v.reshape(v.shape[0], -1)).squeeze(1)
        return self.bias + w.sum(1) + fm + deep


class Offsets(nn.Module):
    """nn.Embedding over per-field numbered ids."""

    def __init__(self, sizes, width):
        super().__init__()
        offsets = np.cumsum([0] + [s + 1 for s in sizes[:-1]])
        self.register_buffer("offsets", torch.as_tensor(offsets, dtype=torch.int64))
        self.table = nn.Embedding(int(sum(s + 1 for s in sizes)), width, sparse=True)
        nn.init.uniform_(self.table.weight, -0.01, 0.01)

    def forward(self, ids):
        return self.table(ids + self.offsets)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="one click log: the last 20%% of its rows are held out")
    p.add_argument("--train")
    p.add_argument("--test")
    p.add_argument("--embedding", choices=["shoal", "torch"], default="shoal")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=256, help="global batch (split over the processes)")
    p.add_argument("--dim", type=int, default=8)
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(1)
    if a.data:
        y, vals = read(a.data)
        cut = len(y) * 8 // 10
        y, ty, vals, tvals = y[:cut], y[cut:], vals[:cut], vals[cut:]
    elif a.train and a.test:
        y, vals = read(a.train)
        ty, tvals = read(a.test)
    else:
        p.error("give --data FILE, or --train FILE and --test FILE")
    fields = len(vals[0])
    if a.embedding == "shoal":
        import shoal.torch as sh

        sh.init()
        rank, world = sh.rank(), sh.size()
        x, tx = hashed_keys(vals), hashed_keys(tvals)
        rows = sh.SparseEmbedding(fields, 1 + a.dim, optimizer="adagrad", lr=0.02, eps=1e-8, init_scale=0.01)
        model = DeepFM(rows, fields, a.dim)
        net = model
        dense = sh.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3),
                                        named_parameters=model.named_parameters())
        sparse = None
        barrier = sh.barrier
    else:
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            dist.init_process_group("gloo")
        rank = dist.get_rank() if world > 1 else 0
        x, vocab = numbered(vals)
        tx, _ = numbered(tvals, vocab)
        model = DeepFM(Offsets([len(v) for v in vocab], 1 + a.dim), fields, a.dim)
        net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
        sparse = torch.optim.Adagrad(model.rows.parameters(), lr=0.02, eps=1e-8)
        dense = torch.optim.Adam([model.bias] + list(model.mlp.parameters()), lr=1e-3)
        barrier = dist.barrier if world > 1 else (lambda: None)
    loss_fn = nn.BCEWithLogitsLoss()
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    g = torch.Generator().manual_seed(5)
    seen, seconds = 0, 0.0
    for _ in range(a.epochs):
        perm = torch.randperm(len(yt), generator=g)
        steps = len(perm) // a.batch
        barrier()
        t0 = time.perf_counter()
        for s in range(steps):
            idx = perm[s * a.batch:(s + 1) * a.batch][rank::world]
            loss = loss_fn(net(xt[idx]), yt[idx])
            dense.zero_grad()
            if sparse is not None:
                sparse.zero_grad()
            loss.backward()
            dense.step()
            if sparse is not None:
                sparse.step()
            seen += a.batch
        barrier()
        seconds += time.perf_counter() - t0
    if rank == 0:
        model.eval()
        with torch.no_grad():
            probs = torch.sigmoid(model(torch.as_tensor(tx))).numpy().astype(np.float64)
        pc = np.clip(probs, 1e-7, 1 - 1e-7)
        ll = float(-np.mean(ty * np.log(pc) + (1 - ty) * np.log(1 - pc)))
        print(json.dumps({
            "embedding": a.embedding,
            "world": world,
            "examples_per_s": seen / seconds,
            "train_seconds": seconds,
            "auc": auc(probs, ty),
            "logloss": ll,
            "torch": torch.__version__,
        }), flush=True)
    if a.embedding == "torch" and world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
