"""Every shipped config runs for real: one round (or epoch) with small overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fltool.cli import app
from fltool.config import load_config
from fltool.run.metrics import read_metrics

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))

# Keep each run to seconds on 2 CPU cores while exercising the file's own mode,
# dataset, partition and model.
FAST = {
    "federated": ["federated.rounds=1", "federated.fraction=0.03"],
    "ddp": ["ddp.epochs=1", "data.dataset=synthetic", "data.synthetic.train_size=512"],
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_runs_one_round(path: Path, tmp_path: Path, mnist_root: Path):
    cfg = load_config(path)
    overrides = FAST["ddp" if cfg.mode == "ddp" else "federated"] + [f"output.dir={tmp_path}"]
    result = CliRunner().invoke(app, ["train", str(path), *overrides])
    assert result.exit_code == 0, result.output
    (run_dir,) = list(tmp_path.glob("*/*"))
    rows = read_metrics(run_dir)
    assert len(rows) == 1 and rows[0]["test_accuracy"] is not None
    assert (run_dir / "checkpoints" / "last.pt").is_file()
