"""Bad calls raise Python exceptions with clear text; a process that dies stops the
job with its name."""

import os
import subprocess
import sys


def run_alone(code):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_") and k not in ("RANK", "WORLD_SIZE")}
    # Run from elsewhere: python/ itself holds the package's sources without its native part.
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, cwd=os.path.dirname(sys.executable)
    )


def test_use_before_init_raises_and_a_single_process_is_a_job_of_one():
    r = run_alone(
        """
import torch, shoal.torch as sh
try:
    sh.allreduce_(torch.ones(3))
except RuntimeError as e:
    print("before:", e)
sh.init()
t = torch.ones(3) * 5
sh.allreduce_(t)
print("alone:", sh.rank(), sh.size(), t.tolist())
"""
    )
    assert r.returncode == 0, r.stderr
    assert "before: shoal: init() has not been called" in r.stdout
    assert "alone: 0 1 [5.0, 5.0, 5.0]" in r.stdout


def test_wrong_dtype_non_contiguous_and_bad_arguments_raise_with_what_is_wrong():
    r = run_alone(
        """
import torch, shoal.torch as sh
sh.init()
cases = [
    lambda: sh.allreduce_(torch.ones(3, dtype=torch.float64)),
    lambda: sh.allreduce_(torch.ones(4, 4).t()),
    lambda: sh.allreduce_([1.0, 2.0]),
    lambda: sh.allreduce_(torch.ones(3), op="max"),
    lambda: sh.broadcast_(torch.ones(3), root_rank=5),
    lambda: sh.DistributedOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.ones(2, dtype=torch.float64))], lr=1)),
]
for c in cases:
    try:
        c()
        print("no error")
    except (TypeError, ValueError, RuntimeError) as e:
        print(type(e).__name__, e)
"""
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 6, r.stdout
    assert lines[0].startswith("TypeError") and "float32 tensors only" in lines[0] and "float64" in lines[0]
    assert lines[1].startswith("ValueError") and "not contiguous" in lines[1]
    assert lines[2].startswith("TypeError") and "expected a torch.Tensor, got list" in lines[2]
    assert lines[3].startswith("ValueError") and "'max'" in lines[3]
    assert lines[4].startswith("ValueError") and "rank 5 in a job of 1" in lines[4]
    assert lines[5].startswith("TypeError") and "float32 parameters only" in lines[5]


def test_mismatched_shapes_across_ranks_raise_on_every_rank_and_the_job_goes_on(job):
    r = job.run(
        2,
        """
        import os, torch
        import shoal.torch as sh
        sh.init()
        r = sh.rank()
        def say(line):  # one write: the ranks share stdout
            os.write(1, (line + "\\n").encode())
        try:
            sh.allreduce_(torch.ones(10 + r), name="grads")
        except sh.ShoalError as e:
            say(f"rank {r}: {e}")
        try:
            sh.allgather(torch.ones(2, 3) if r == 0 else torch.ones(2, 4))
        except sh.ShoalError as e:
            say(f"rank {r}: {e}")
        t = torch.ones(4)
        sh.allreduce_(t, op=sh.Sum)
        say(f"rank {r} after: {t.tolist()}")
        """,
    )
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):
        assert (
            f"rank {rank}: shoal: operation 1 ('grads'): every rank must submit the same collectives "
            "in the same order; rank 0 submitted a allreduce (average) of 10 values, rank 1 a allreduce "
            "(average) of 11 values" in r.stdout
        ), r.stdout
        assert f"rank {rank}: shoal: allgather of (" in r.stdout
        assert "rank 0 has (2, 3), rank 1 (2, 4)" in r.stdout
        assert f"rank {rank} after: [2.0, 2.0, 2.0, 2.0]" in r.stdout


def test_a_killed_process_stops_the_job_and_is_named(job):
    r = job.run(
        2,
        """
        import os, signal, torch
        import shoal.torch as sh
        sh.init()
        t = torch.ones(1000)
        sh.allreduce_(t)
        if sh.rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        for _ in range(1_000_000):
            sh.allreduce_(t)
        """,
    )
    assert r.returncode != 0
    assert "rank 1 (pid" in r.stderr and "killed by signal 9" in r.stderr, r.stderr


def test_a_failing_script_fails_the_job_with_its_status(job):
    r = job.run(2, "import sys, os\nsys.exit(7 if os.environ['RANK'] == '0' else 0)\n")
    assert r.returncode != 0
    assert "rank 0 (pid" in r.stderr and "exited with status 7" in r.stderr, r.stderr


def test_torchrun_variables_are_honoured(tmp_path):
    script = tmp_path / "tr.py"
    script.write_text(
        """
import os, torch, shoal.torch as sh
sh.init()
t = torch.full((5,), float(sh.rank() + 1))
sh.allreduce_(t, op=sh.Sum)
os.write(1, f"torchrun {sh.rank()} {sh.size()} {sh.local_rank()} {t.tolist()}\\n".encode())
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(port), str(script)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "torchrun 0 2 0 [3.0, 3.0, 3.0, 3.0, 3.0]" in r.stdout, r.stdout
    assert "torchrun 1 2 1 [3.0, 3.0, 3.0, 3.0, 3.0]" in r.stdout, r.stdout
