"""scripts/bench_engines.py stays runnable: one round of each engine on a small workload,
and the two bounds."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fltool.engines.vectorized import batched_nets

REPO = Path(__file__).resolve().parents[2]


ROWS = ("textbook", "sequential", "vectorized", "vectorized/scaffold", "vectorized/fedadam", "grad-only", "flop-bound")


def run_bench(tmp_path, *args: str) -> str:
    cmd = [sys.executable, str(REPO / "scripts" / "bench_engines.py"), "--workload", "2nn", "--device", "cpu", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr
    return done.stdout


def algorithm_ratios(stdout: str) -> dict[str, list[str]]:
    """The lines under "against the same engine's FedAvg": algorithm -> the rest."""
    lines = stdout.splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.startswith("client-steps/s against the same engine's FedAvg")]
    return {line.split()[0]: line.split()[1:] for line in lines[at + 1 :] if line.startswith("  ")}


def test_bench_script_times_textbook_sequential_and_vectorized(tmp_path):
    """On CPU the engines' timed rounds are interleaved by default, and each row after
    the textbook loop's gives the range of its rounds' ratios; SCAFFOLD and FedAdam on
    the vectorized engine get rows of their own and a ratio against its FedAvg."""
    stdout = run_bench(tmp_path, "--rounds", "2", "--engines", "textbook", "sequential", "vectorized", "grad-only",
                       "flop-bound", "--algorithms", "scaffold", "fedadam")
    rows = {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.split() and line.split()[0] in ROWS}
    assert set(rows) == set(ROWS)
    for name, (steps_per_s, s_per_round, peak_mib, ratio, *rest) in rows.items():
        assert float(steps_per_s.replace(",", "")) > 0 and float(s_per_round) > 0 and float(ratio) > 0
        assert peak_mib == "-" if name in ("grad-only", "flop-bound") else float(peak_mib) >= 0
    assert rows["textbook"][3] == "1.00"
    assert "engines interleaved round by round" in stdout and "rounds' ratios" in stdout
    for name in ("sequential", "vectorized", "vectorized/scaffold", "vectorized/fedadam"):
        low, high = map(float, rows[name][4].split("-"))
        assert 0 < low <= float(rows[name][3]) <= high
    ratios = algorithm_ratios(stdout)
    assert set(ratios) == {"scaffold", "fedadam"}
    for algorithm, (ratio, *rest) in ratios.items():
        engine_rate = float(rows["vectorized"][0].replace(",", ""))
        own_rate = float(rows[f"vectorized/{algorithm}"][0].replace(",", ""))
        assert float(ratio.rstrip("x")) == pytest.approx(own_rate / engine_rate, rel=0.05)  # rates print rounded
        assert rest[:2] == ["vectorized", "FedAvg"] and rest[-1] in ("ok", "BELOW")
    assert "fastest:" in " ".join(rows["grad-only"])
    # the 2NN at B=10: forward and weight gradients 2*10*199,200 FLOPs each, input
    # gradients of the two upper layers 2*10*42,000 (the first layer's input needs none)
    assert "8.8 MFLOP a client-step" in " ".join(rows["flop-bound"])


def test_bench_variants_and_profile_run_and_say_so(tmp_path):
    """--variant swaps the hand-batched step's kernels (their equality is tested in
    test_batched_nets); --profile prints one profiled round's op table per engine;
    --no-interleave times one engine after the other."""
    stdout = run_bench(tmp_path, "--rounds", "1", "--engines", "vectorized", "--variant", "batched-linear",
                       "channels-last", "--profile", "5", "--no-interleave", "--algorithms", "fedadam")
    assert "variants: batched-linear channels-last" in stdout
    assert "-- vectorized: one round profiled, top 5 ops" in stdout
    assert "-- vectorized/fedadam: one round profiled, top 5 ops" in stdout
    assert "Self CPU time total" in stdout
    assert "interleaved" not in stdout
    (ratio, *rest) = algorithm_ratios(stdout)["fedadam"]  # timed one after the other: no rounds' range
    assert float(ratio.rstrip("x")) > 0 and "(rounds" not in " ".join(rest)


def test_variants_switch_the_per_device_choices(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_engines", REPO / "scripts" / "bench_engines.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_engines", bench)  # its dataclasses look themselves up there
    spec.loader.exec_module(bench)
    for name in ("uses_batched_linear", "conv_layout"):  # restored after the test
        monkeypatch.setattr(batched_nets, name, getattr(batched_nets, name))
    small, cuda = (torch.zeros(2, 3, 4), torch.zeros(2, 5, 4)), torch.device("cuda")
    assert not batched_nets.uses_batched_linear(*small)
    assert batched_nets.conv_layout(cuda) == torch.contiguous_format
    bench.use_variants(["batched-linear", "channels-last"])
    assert batched_nets.uses_batched_linear(*small)
    assert batched_nets.conv_layout(cuda) == torch.channels_last
