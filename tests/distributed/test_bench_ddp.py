"""scripts/bench_ddp.py stays runnable: a few steps of each loop on CPU and real MNIST."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ddp_helpers import REPO, cli_env


def test_bench_script_times_fltool_and_textbook_loops_on_cpu(tmp_path):
    data = Path(os.environ.get("FLTOOL_DATA") or REPO.parent / "shared" / "data")
    cmd = [sys.executable, str(REPO / "scripts" / "bench_ddp.py"), "--steps", "3", "--warmup", "1", "--rounds", "1",
           "--no-tuned", "--device", "cpu"]
    done = subprocess.run(
        cmd, cwd=tmp_path, env=cli_env(FLTOOL_DATA=str(data), FLTOOL_CACHE=str(tmp_path / "cache")),
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    rates = {line.split(":")[0].strip(): float(line.split()[1]) for line in done.stdout.splitlines() if "images/s" in line}
    assert set(rates) == {"fltool", "textbook"} and all(r > 0 for r in rates.values())
    assert "fltool/textbook: " in done.stdout
