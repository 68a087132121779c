"""Helpers for the distributed tests: tiny synthetic configs and a subprocess CLI runner.

Imported as `from ddp_helpers import ...`; conftest.py registers the module.

Every launch uses gloo on CPU, a 30 s process-group timeout (a stuck collective fails
instead of hanging) and a subprocess timeout on top of that.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]

# 250 examples of 1x8x8 in 4 classes: an epoch is 8 global batches of 32, the last one
# padded by wrapping around (as DistributedSampler pads).
TINY_DATA = {
    "dataset": "synthetic",
    "synthetic": {"train_size": 250, "test_size": 64, "shape": [1, 8, 8], "num_classes": 4},
}


def ddp_config(**ddp: Any) -> dict[str, Any]:
    base = {
        "epochs": 3,
        "batch_size": 16,
        "lr": 0.05,
        "optimizer": "momentum",
        "schedule": "cosine",
        "warmup_steps": 2,
        "backend": "gloo",
        "timeout_s": 30,
    }
    return {
        "name": "tiny_ddp",
        "mode": "ddp",
        "seed": 3,
        "device": "cpu",
        "data": TINY_DATA,
        "model": {"name": "cnn_small"},
        "ddp": {**base, **ddp},
    }


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_env(**extra: str | None) -> dict[str, str]:
    """The test process's environment for a CLI subprocess; an `extra` of None removes the variable."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: v for k, v in extra.items() if v is not None})
    return {k: v for k, v in env.items() if extra.get(k, "") is not None}


def fltool_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fltool", *args]


def run_cli(*args: str, cwd: Path, timeout: float = 180, **env: str | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        fltool_cmd(*args), cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=timeout
    )


def load_model(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    return state["model"]


def assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=1e-4), f"{key}: max diff {(a[key] - b[key]).abs().max()}"

