"""Run directories written directly (a config.yaml and metrics rows), for the tests of
the commands that read them: no training."""

from __future__ import annotations

import json
from pathlib import Path

from fltool.config import dump_config


def fake_run(run_dir: Path, cfg, accuracies: list[float | None], checkpoint: bool = True) -> Path:
    """A run of `cfg` that logged one round per accuracy."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    rows = [
        {"round": r, "train_loss": 1.0 / r, "test_accuracy": acc, "elapsed_s": 0.5 * r, "bytes_up": 1000, "client_ids": [0, 1]}
        for r, acc in enumerate(accuracies, 1)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run_dir / "checkpoints").mkdir()
    if checkpoint and rows:
        (run_dir / "checkpoints" / "last.pt").write_bytes(b"stand-in")
    return run_dir
