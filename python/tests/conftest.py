"""Helpers for the package's tests: run a script as the processes of a `shoal run`
job (the binary from SHOAL_BIN, default target/release/shoal of this checkout)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHOAL = os.environ.get("SHOAL_BIN", str(REPO / "target" / "release" / "shoal"))


class Job:
    def __init__(self, tmp):
        self.tmp = tmp

    def script(self, body):
        path = self.tmp / f"script_{abs(hash(body))}.py"
        path.write_text(textwrap.dedent(body))
        return path

    def run(self, n, body, *args, launcher_args=(), timeout=600, env=None):
        """Runs `body` as `shoal run -n N -- python SCRIPT ARGS`; returns the completed
        process (stdout and stderr as text)."""
        path = self.script(body)
        cmd = [SHOAL, "run", "-n", str(n), *launcher_args, "--", sys.executable, str(path), *map(str, args)]
        e = dict(os.environ)
        e.update(env or {})
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=self.tmp)


@pytest.fixture
def job(tmp_path):
    if not Path(SHOAL).exists():
        pytest.fail(f"{SHOAL} is missing: build it with `cargo build --release -p shoal` (or set SHOAL_BIN)")
    return Job(tmp_path)
