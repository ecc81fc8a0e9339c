"""shoal.torch's collectives across processes: results checked against what the same
arithmetic gives in one process."""

import os
import json


def test_sum_average_broadcast_allgather_and_barrier_across_three_processes(job):
    r = job.run(
        3,
        """
        import json, sys, torch
        import shoal.torch as sh
        sh.init()
        r, n = sh.rank(), sh.size()
        out = {"rank": r, "size": n, "local": [sh.local_rank(), sh.local_size()]}
        t = torch.full((1000,), float(r + 1))
        out["sum"] = sh.allreduce(t, op=sh.Sum)[:2].tolist()
        out["avg"] = sh.allreduce_(t)[:2].tolist()
        b = torch.arange(7, dtype=torch.int64) * (r + 1)
        sh.broadcast_(b, root_rank=2)
        out["bcast"] = b.tolist()
        g = sh.allgather(torch.tensor([[r, r + 0.5]]))
        out["gather"] = g.tolist()
        out["gather_scalar"] = sh.allgather(torch.tensor(float(r))).tolist()
        # Horovod's rule: the first dimension may differ (rank r has r rows).
        out["gather_ragged"] = sh.allgather(torch.full((r, 2), float(r))).tolist()
        sh.barrier()
        with open(f"out{r}.json", "w") as f:
            json.dump(out, f)
        """,
    )
    assert r.returncode == 0, r.stderr
    for rank in range(3):
        out = json.loads((job.tmp / f"out{rank}.json").read_text())
        assert out["rank"] == rank and out["size"] == 3 and out["local"] == [rank, 3]
        assert out["sum"] == [6.0, 6.0]
        assert out["avg"] == [2.0, 2.0]
        assert out["bcast"] == [0, 3, 6, 9, 12, 15, 18]
        assert out["gather"] == [[0, 0.5], [1, 1.5], [2, 2.5]]
        assert out["gather_scalar"] == [0.0, 1.0, 2.0]
        assert out["gather_ragged"] == [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]


def test_async_handles_complete_in_any_wait_order(job):
    r = job.run(
        2,
        """
        import os, torch
        import shoal.torch as sh
        sh.init()
        r = sh.rank()
        ts = [torch.full((n,), float(r)) for n in (1, 1000, 300_000, 5)]
        hs = [sh.allreduce_async_(t, op=sh.Sum) for t in ts]
        # Waited last first; polling the first until it is done.
        for h in reversed(hs):
            assert sh.synchronize(h) is not None
        while not sh.poll(hs[0]):
            pass
        assert all(float(t[0]) == 1.0 and float(t[-1]) == 1.0 for t in ts), [t[:2] for t in ts]
        os.write(1, f"ok {r}\\n".encode())  # one write: the ranks share stdout
        """,
    )
    assert r.returncode == 0, r.stderr
    assert "ok 0" in r.stdout and "ok 1" in r.stdout


def test_tcp_plane_gives_the_same_sums(job):
    r = job.run(
        2,
        """
        import torch
        import shoal.torch as sh
        sh.init()
        t = torch.arange(100_000, dtype=torch.float32) * (sh.rank() + 1)
        sh.allreduce_(t, op=sh.Sum)
        assert torch.equal(t, torch.arange(100_000, dtype=torch.float32) * 3), t[:4]
        print("ok")
        """,
        launcher_args=("--transport", "tcp"),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok") == 2


def test_tls_on_every_plane_gives_the_same_sums(job):
    # `shoal run --tls`: a per-job CA, the control plane and the TCP ring over TLS.
    r = job.run(
        2,
        """
        import os
        import torch
        import shoal.torch as sh
        assert os.path.isfile(os.path.join(os.environ["SHOAL_TLS_DIR"], "cert.pem"))
        sh.init()
        t = torch.arange(100_000, dtype=torch.float32) * (sh.rank() + 1)
        sh.allreduce_(t, op=sh.Sum)
        assert torch.equal(t, torch.arange(100_000, dtype=torch.float32) * 3), t[:4]
        os.write(1, f"ok {os.environ['SHOAL_TLS_DIR']}\\n".encode())
        """,
        launcher_args=("--transport", "tcp", "--tls"),
    )
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("ok ")]
    assert len(lines) == 2, r.stdout
    # The per-job certificates are gone with the job.
    assert not os.path.exists(lines[0][3:]), lines
