"""A federated run under `launch` that diverges stops on every rank at the same round:
each rank holds the same global model, so each decides without a collective, and the
launch exits 0 instead of leaving a rank waiting for peers that stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
from ddp_helpers import run_cli, write_config

from fltool.run.checkpoint import load_checkpoint
from fltool.run.metrics import read_metrics
from fltool.run.rundir import last_checkpoint

STOP_2 = "diverged: the global model has non-finite parameters after round 2"


@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_two_ranks_stop_at_the_same_round(engine: str, tmp_path: Path):
    run_dir = tmp_path / "run"
    raw = {
        "name": "fed", "mode": "federated", "seed": 0, "device": "cpu",
        "data": {"dataset": "synthetic", "synthetic": {"train_size": 400, "test_size": 200, "shape": [1, 8, 8]}},
        "model": {"name": "mlp"},
        "federated": {"num_clients": 8, "fraction": 0.5, "rounds": 6, "local_epochs": 2, "batch_size": 16, "lr": 0.1, "engine": engine},
        # round 1 trains as usual; the server's 1e6 x step leaves a huge model that round 2 overflows
        "server_optimizer": {"name": "sgd", "lr": 1e6},
        "eval": {"every": 4},
        "output": {"run_dir": str(run_dir), "checkpoint_every": 4},
        "ddp": {"timeout_s": 20},
    }  # fmt: skip
    cfg = write_config(tmp_path / "fed.yaml", raw)
    done = run_cli("launch", "--nproc", "2", str(cfg), cwd=tmp_path, timeout=100)
    assert done.returncode == 0, done.stderr
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["stopped"] == STOP_2
    assert load_checkpoint(last_checkpoint(run_dir)).round == 2
    (rank0,) = (run_dir / "torchrun").rglob("0/stdout.log")
    assert f"stopped: {STOP_2}" in rank0.read_text().splitlines()
