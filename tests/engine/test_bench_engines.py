"""scripts/bench_engines.py stays runnable: one round of each engine on a small workload,
and the two bounds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_script_times_textbook_sequential_and_vectorized(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "bench_engines.py"), "--workload", "2nn", "--rounds", "1",
           "--device", "cpu", "--engines", "textbook", "sequential", "vectorized", "grad-only", "flop-bound"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()
            if line.split() and line.split()[0] in ("textbook", "sequential", "vectorized", "grad-only", "flop-bound")}
    assert set(rows) == {"textbook", "sequential", "vectorized", "grad-only", "flop-bound"}
    for name, (steps_per_s, s_per_round, peak_mib, ratio, *rest) in rows.items():
        assert float(steps_per_s.replace(",", "")) > 0 and float(s_per_round) > 0 and float(ratio) > 0
        assert peak_mib == "-" if name in ("grad-only", "flop-bound") else float(peak_mib) >= 0
    assert rows["textbook"][3] == "1.00"
    assert "fastest:" in " ".join(rows["grad-only"])
    # the 2NN at B=10: forward and weight gradients 2*10*199,200 FLOPs each, input
    # gradients of the two upper layers 2*10*42,000 (the first layer's input needs none)
    assert "8.8 MFLOP a client-step" in " ".join(rows["flop-bound"])
