"""DistributedOptimizer and broadcast_parameters: two processes, each on half of the
global batch, end where one process on the whole batch does."""

import torch
from torch import nn

STEPS = 6


def model():
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


def data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(STEPS, 16, 12, generator=g)
    y = torch.randint(0, 3, (STEPS, 16), generator=g)
    return x, y


TRAIN = """
import sys, torch
from torch import nn
import shoal.torch as sh
sys.path.insert(0, {here!r})
from test_training import model, data, STEPS
sh.init()
r, n = sh.rank(), sh.size()
# Different initial weights on each process: the broadcast makes them rank 0's.
torch.manual_seed(100 + r)
m = model()
torch.manual_seed(0)
ref = model()
if r == 0:
    m.load_state_dict(ref.state_dict())
sh.broadcast_parameters(m.state_dict(), root_rank=0)
opt = torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=0.01)
# Tiny buckets: several reductions launched during each backward pass.
opt = sh.DistributedOptimizer(opt, named_parameters=m.named_parameters(), bucket_cap_mb={cap})
x, y = data()
per = x.shape[1] // n
for s in range(STEPS):
    xb, yb = x[s, r * per:(r + 1) * per], y[s, r * per:(r + 1) * per]
    opt.zero_grad()
    nn.functional.cross_entropy(m(xb), yb).backward()
    {clip}
    opt.step()
torch.save(m.state_dict(), f"params{{r}}.pt")
"""


def reference(clip):
    torch.manual_seed(0)
    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=0.01)
    x, y = data()
    for s in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x[s]), y[s]).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
        opt.step()
    return m.state_dict()


def check(job, clip, cap):
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    clip_line = "opt.synchronize(); torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)" if clip else "pass"
    r = job.run(2, TRAIN.format(here=here, cap=cap, clip=clip_line))
    assert r.returncode == 0, r.stderr
    p0 = torch.load(job.tmp / "params0.pt")
    p1 = torch.load(job.tmp / "params1.pt")
    want = reference(clip)
    for k in want:
        # The replicas are the same bits; both are the one-process run's.
        assert torch.equal(p0[k], p1[k]), k
        rel = ((p0[k] - want[k]).abs().max() / want[k].abs().max()).item()
        assert rel < 1e-5, (k, rel)
    # Training moved the weights: the comparison is not of the initial ones.
    torch.manual_seed(0)
    start = model().state_dict()
    assert any((p0[k] - start[k]).abs().max() > 1e-3 for k in start)


def test_two_processes_on_half_batches_equal_one_process_on_the_global_batch(job):
    check(job, clip=False, cap=0.002)


def test_gradients_synchronized_before_clipping_equal_clipping_the_global_gradient(job):
    check(job, clip=True, cap=25)


def test_broadcast_makes_every_tensor_of_a_state_dict_bit_identical(job):
    r = job.run(
        2,
        """
        import torch
        from torch import nn
        import shoal.torch as sh
        sh.init()
        r = sh.rank()
        torch.manual_seed(r)
        m = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5, 2))
        m(torch.randn(4, 3, 3, 3))  # running statistics and an int64 counter differ
        extra = {"flags": torch.rand(7) > 0.5, "bytes": torch.randint(0, 255, (5,), dtype=torch.uint8),
                 "half": torch.randn(3).half(), "double": torch.randn(3, dtype=torch.float64)}
        state = dict(m.state_dict(), **extra)
        sh.broadcast_parameters(state, root_rank=1)
        torch.save(state, f"state{r}.pt")
        """,
    )
    assert r.returncode == 0, r.stderr
    s0 = torch.load(job.tmp / "state0.pt")
    s1 = torch.load(job.tmp / "state1.pt")
    assert s0.keys() == s1.keys() and len(s0) == 13
    for k in s0:
        assert s0[k].dtype == s1[k].dtype and torch.equal(s0[k], s1[k]), k
    # Rank 1's values, not rank 0's, and not zeros.
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3)
    assert torch.equal(s0["0.weight"], conv.weight.detach())


def test_optimizer_state_is_broadcast_from_the_root(job):
    r = job.run(
        2,
        """
        import torch
        import shoal.torch as sh
        sh.init()
        r = sh.rank()
        w = torch.nn.Parameter(torch.ones(4))
        opt = torch.optim.Adam([w], lr=0.1 * (r + 1))
        if r == 0:  # only the root has taken steps
            for _ in range(3):
                opt.zero_grad(); (w * torch.arange(4.0)).sum().backward(); opt.step()
        sh.broadcast_parameters([w], root_rank=0)
        sh.broadcast_optimizer_state(opt, root_rank=0)
        st = opt.state[w]
        torch.save({"m": st["exp_avg"], "v": st["exp_avg_sq"], "step": st["step"],
                    "lr": opt.param_groups[0]["lr"], "w": w.detach()}, f"opt{r}.pt")
        """,
    )
    assert r.returncode == 0, r.stderr
    a = torch.load(job.tmp / "opt0.pt")
    b = torch.load(job.tmp / "opt1.pt")
    assert a["lr"] == b["lr"] == 0.1
    assert float(b["step"]) == 3.0
    for k in ("m", "v", "w"):
        assert torch.equal(a[k], b[k]), k
    assert a["m"].abs().sum() > 0
