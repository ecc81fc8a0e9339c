"""A python job as a cluster runs it (`shoal launch --k8s` with kind = "python"): a
coordinator without a workload, and processes that find it and their index through the
variables the pods get, each on its own address, so they meet over TCP."""

import os
import re
import subprocess
import sys

from conftest import SHOAL

SCRIPT = """
import os, torch, shoal.torch as sh
sh.init()
t = torch.arange(50_000, dtype=torch.float32) * (sh.rank() + 1)
sh.allreduce_(t, op=sh.Sum)
assert torch.equal(t, torch.arange(50_000, dtype=torch.float32) * 3)
os.write(1, f"rank {sh.rank()} of {sh.size()}, local {sh.local_rank()} of {sh.local_size()}\\n".encode())
"""


def run_pods(tmp_path, script, extra_env=None):
    """`script` as two pods of a python job: a `shoal coordinator --kind python`, and two
    processes on 127.0.0.1 and 127.0.0.2 whose scheduler indexes are 1 and 0; returns
    their (stdout, stderr)."""
    (tmp_path / "train.py").write_text(script)
    token = "cluster-test-token-0123456789"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_") and k not in ("RANK", "WORLD_SIZE")}
    env["SHOAL_JOB_TOKEN"] = token
    coord = subprocess.Popen(
        [SHOAL, "coordinator", "--kind", "python", "--workers", "2", "--listen", "127.0.0.1:0",
         "--rendezvous-timeout-s", "600"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        addr = None
        for line in coord.stderr:
            m = re.match(r"coordinator listening on (\S+)", line)
            if m:
                addr = m.group(1)
                break
        assert addr, "the coordinator did not say where it listens"
        pods = []
        for i, host in enumerate(["127.0.0.1", "127.0.0.2"]):
            e = dict(env, SHOAL_ROLE="worker", SHOAL_COORDINATOR=f"http://{addr}", SHOAL_HOST=host,
                     JOB_COMPLETION_INDEX=str(1 - i), **(extra_env or {}))
            pods.append(subprocess.Popen([sys.executable, str(tmp_path / "train.py")], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, env=e, cwd=tmp_path))
        outs = []
        for p in pods:
            try:
                # Generous: a cold start imports PyTorch from disk.
                outs.append(p.communicate(timeout=600))
            except subprocess.TimeoutExpired:
                p.kill()
                raise AssertionError(f"a pod hung: {p.communicate()}")
        for p, (out, err) in zip(pods, outs):
            assert p.returncode == 0, err
        assert coord.wait(timeout=120) == 0
        return outs
    finally:
        coord.kill()


def test_pods_with_a_python_coordinator_meet_over_tcp(tmp_path):
    outs = run_pods(tmp_path, SCRIPT)
    # The scheduler's index is the rank; each pod is alone on its host.
    assert outs[0][0].strip() == "rank 1 of 2, local 0 of 1", outs[0]
    assert outs[1][0].strip() == "rank 0 of 2, local 0 of 1", outs[1]


def test_sparse_embedding_shards_on_two_hosts_meet_their_workers_over_tcp(tmp_path):
    import test_sparse

    run_pods(tmp_path, test_sparse.script("adagrad"), {"SHOAL_PS_SHARDS": "2"})
    test_sparse.verify(tmp_path, "adagrad")
