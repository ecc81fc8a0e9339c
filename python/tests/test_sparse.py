"""SparseEmbedding: rows on two parameter-server shards, two processes on half batches
each, end where one process does with torch's own sparse embedding and optimizer on the
global batch, from the same initial rows."""

import os

import torch
from torch import nn

KEYS, FIELDS, DIM, STEPS, BATCH = 50, 3, 4, 5, 16


def data():
    g = torch.Generator().manual_seed(3)
    keys = torch.randint(0, KEYS, (STEPS, BATCH, FIELDS), generator=g)
    y = torch.rand(STEPS, BATCH, generator=g)
    return keys, y


TRAIN = """
import sys, torch
import shoal.torch as sh
sys.path.insert(0, {here!r})
from test_sparse import KEYS, FIELDS, DIM, STEPS, BATCH, data
sh.init()
r, n = sh.rank(), sh.size()
emb = sh.SparseEmbedding(FIELDS, DIM, optimizer={rule!r}, lr=0.1, init_scale=0.5, seed=11)
emb.eval()
with torch.no_grad():
    init = emb(torch.arange(KEYS).repeat_interleave(FIELDS).view(KEYS, FIELDS))[:, 0]
emb.train()
w = torch.nn.Parameter(torch.linspace(-1, 1, DIM))
opt = sh.DistributedOptimizer(torch.optim.SGD([w], lr=0.2))
keys, y = data()
per = BATCH // n
for s in range(STEPS):
    kb, yb = keys[s, r * per:(r + 1) * per], y[s, r * per:(r + 1) * per]
    opt.zero_grad()
    pred = (emb(kb).sum(1) * w).sum(1)
    ((pred - yb) ** 2).mean().backward()
    opt.step()
emb.eval()
with torch.no_grad():
    final = emb(torch.arange(KEYS).repeat_interleave(FIELDS).view(KEYS, FIELDS))[:, 0]
torch.save({{"init": init, "final": final, "w": w.detach(), "local_rows": emb.local_rows(),
            "shards": emb.shards}}, f"sparse{{r}}.pt")
"""


def reference(init, rule):
    emb = nn.Embedding(KEYS, DIM, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(init)
    w = nn.Parameter(torch.linspace(-1, 1, DIM))
    sparse_opt = {
        "adagrad": lambda: torch.optim.Adagrad(emb.parameters(), lr=0.1, eps=1e-10),
        "sgd": lambda: torch.optim.SGD(emb.parameters(), lr=0.1),
    }[rule]()
    opt = torch.optim.SGD([w], lr=0.2)
    keys, y = data()
    for s in range(STEPS):
        opt.zero_grad()
        sparse_opt.zero_grad()
        pred = (emb(keys[s]).sum(1) * w).sum(1)
        ((pred - y[s]) ** 2).mean().backward()
        opt.step()
        sparse_opt.step()
    return emb.weight.detach(), w.detach()


def script(rule):
    """The training script of two processes, for `rule`."""
    return TRAIN.format(here=os.path.dirname(os.path.abspath(__file__)), rule=rule)


def check(job, rule):
    r = job.run(2, script(rule), launcher_args=("--ps", "2"))
    assert r.returncode == 0, r.stderr
    verify(job.tmp, rule)


def verify(tmp, rule):
    """What the two processes wrote in `tmp` against torch on the global batch."""
    a = torch.load(tmp / "sparse0.pt")
    b = torch.load(tmp / "sparse1.pt")
    assert a["shards"] == b["shards"] == 2
    # The rows are spread over both shards; together they hold every key touched.
    touched = data()[0].unique().numel()
    assert a["local_rows"] > 0 and b["local_rows"] > 0 and a["local_rows"] + b["local_rows"] == touched
    assert torch.equal(a["init"], b["init"]) and torch.equal(a["final"], b["final"])
    assert a["init"].abs().max() <= 0.5 and a["init"].std() > 0.1
    want_rows, want_w = reference(a["init"], rule)
    assert (a["final"] - a["init"]).abs().max() > 1e-2, "training moved no row"
    assert torch.allclose(a["final"], want_rows, rtol=1e-5, atol=1e-6), (a["final"] - want_rows).abs().max()
    assert torch.allclose(a["w"], want_w, rtol=1e-5, atol=1e-6)
    assert torch.equal(a["w"], b["w"])


def test_sparse_embedding_on_two_shards_equals_torch_adagrad_on_the_global_batch(job):
    check(job, "adagrad")


def test_sparse_embedding_on_two_shards_equals_torch_sgd_on_the_global_batch(job):
    check(job, "sgd")


def test_bad_sparse_embedding_arguments_raise(job):
    r = job.run(
        1,
        """
        import os, torch
        import shoal.torch as sh
        sh.init()
        for make in (lambda: sh.SparseEmbedding(3, 4, optimizer="lion"), lambda: sh.SparseEmbedding(0, 4),
                     lambda: sh.SparseEmbedding(3, 0)):
            try:
                make()
                print("no error")
            except (ValueError, TypeError) as e:
                print(type(e).__name__, e)
        emb = sh.SparseEmbedding(3, 4)
        for keys in (torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.int64)):
            try:
                emb(keys)
                print("no error")
            except (ValueError, TypeError) as e:
                print(type(e).__name__, e)
        """,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 5, r.stdout
    assert "unknown rule 'lion'" in lines[0]
    assert "num_fields must be a positive integer" in lines[1]
    assert "rows of 0 values" in lines[2]
    assert lines[3].startswith("TypeError") and "int64" in lines[3]
    assert lines[4].startswith("ValueError") and "expected (batch, 3)" in lines[4]
