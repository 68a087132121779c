"""A full disk mid-run is one line and exit 2, never a traceback; the last complete
checkpoint stays loadable, and the documented resume ends where an undisturbed run does."""

from __future__ import annotations

import errno
from pathlib import Path

import torch
from typer.testing import CliRunner

from fltool.cli import app
from fltool.config import dump_config
from fltool.run import atomic
from fltool.run.checkpoint import load_checkpoint
from fltool.run.metrics import read_metrics


def test_enospc_while_checkpointing_leaves_a_resumable_run(make_config, monkeypatch, tmp_path: Path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(dump_config(make_config()))
    runner = CliRunner()
    straight = runner.invoke(app, ["train", str(cfg_path), "federated.rounds=3", f"output.run_dir={tmp_path / 'straight'}"])
    assert straight.exit_code == 0, straight.output

    real_write = atomic._write
    written = {"last.pt": 0}

    def full_disk(path: Path, data: bytes) -> None:
        if path.name == "last.pt":
            written["last.pt"] += 1
            if written["last.pt"] == 2:  # round 2's checkpoint: the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(atomic, "_write", full_disk)
    run_dir = tmp_path / "full"
    failed = runner.invoke(app, ["train", str(cfg_path), "federated.rounds=3", f"output.run_dir={run_dir}"])
    assert failed.exit_code == 2
    lines = failed.stderr.strip().splitlines()
    assert lines[-1] == (
        f"error: {run_dir / 'checkpoints' / 'last.pt'}: cannot write: No space left on device; the file on disk is the "
        f"last complete one; once fixed, continue with `fltool train --resume {run_dir}`"
    )
    assert "Traceback" not in failed.output
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt").round == 1
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # no half-written file left

    monkeypatch.setattr(atomic, "_write", real_write)  # space freed
    resumed = runner.invoke(app, ["train", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2, 3]
    a = load_checkpoint(run_dir / "checkpoints" / "last.pt").model
    b = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt").model
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_enospc_on_the_metrics_is_one_line(make_config, monkeypatch, tmp_path: Path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(dump_config(make_config()))
    real_write = atomic._write

    def full_disk(path: Path, data: bytes) -> None:
        if path.name == "metrics.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(atomic, "_write", full_disk)
    failed = CliRunner().invoke(app, ["train", str(cfg_path), f"output.run_dir={tmp_path / 'run'}"])
    assert failed.exit_code == 2 and "Traceback" not in failed.output
    line = failed.stderr.strip().splitlines()[-1]
    # round 1's checkpoint went first (it carries its own rows), so the run resumes
    assert "metrics.jsonl: cannot write: No space left on device; the file on disk is the last complete one" in line
    assert line.endswith(f"continue with `fltool train --resume {tmp_path / 'run'}`")
