"""A DDP run whose model goes NaN or inf stops after that epoch, says why, and a resume
of it stops again without training (as a diverged federated run does, see
test_divergence.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fltool.cli import app
from fltool.config import config_from_dict
from fltool.run.checkpoint import load_checkpoint
from fltool.run.metrics import read_metrics
from fltool.run.rundir import best_checkpoint, create_run_dir, last_checkpoint
from fltool.run.runner import resume_run
from fltool.run.runs_table import run_info
from fltool.trainers import ddp as trainer
from fltool.trainers.ddp import train_ddp
from fltool.ui import PlainReporter

# as in test_ddp.py: ddp_helpers is registered by tests/distributed/conftest.py only
# when that folder is collected
if "ddp_helpers" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("ddp_helpers", Path(__file__).parents[1] / "distributed" / "ddp_helpers.py")
    sys.modules["ddp_helpers"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["ddp_helpers"])

from ddp_helpers import ddp_config, run_cli, write_config  # noqa: E402


def stop(epoch: int) -> str:
    return f"diverged: the model has non-finite parameters after epoch {epoch}"


def raw_config(tmp_path: Path, name: str, **ddp) -> dict:
    """The tiny synthetic DDP run of ddp_helpers, 6 epochs, evaluated and checkpointed
    every 4th: a stop's evaluation and last.pt come from the divergence alone."""
    raw = ddp_config(**{"epochs": 6, **ddp})
    raw["eval"] = {"every": 4}
    raw["output"] = {"run_dir": str(tmp_path / name), "checkpoint_every": 4}
    return raw


def diverging(tmp_path: Path, name: str = "run", **ddp):
    """SGD with momentum at lr 1e6 overflows to NaN within epoch 1 (16 steps)."""
    return config_from_dict(raw_config(tmp_path, name, lr=1e6, **ddp))


def finite_model(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_checkpoint(path).model.values())


def test_a_huge_learning_rate_stops_the_run_after_its_first_epoch(tmp_path):
    cfg = diverging(tmp_path)
    run_dir = create_run_dir(cfg)
    reported: list[int] = []
    summary = train_ddp(cfg, run_dir, on_row=lambda row: reported.append(row["epoch"]))
    assert summary.stopped == stop(1)
    assert reported == [1] and summary.rounds_completed == 1  # nothing trained after it
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1] and rows[0]["train_loss"] is None  # NaN, null in the JSON
    # evaluated and checkpointed as a last epoch (eval.every and checkpoint_every are 4)
    assert rows[0]["test_accuracy"] == 0.0 and summary.final_accuracy == 0.0
    assert load_checkpoint(last_checkpoint(run_dir)).round == 1 and not finite_model(last_checkpoint(run_dir))
    assert rows[0]["stopped"] == stop(1) and (run_info(run_dir).status, run_info(run_dir).stopped) == ("stopped", stop(1))


def nan_at_the_start_of(epoch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model blows up in `epoch`: a NaN in its first parameter as the epoch begins
    (a learning rate that leaves epoch 1 finite and epoch 2 not would depend on the
    CPU's float rounding: this tiny CNN's blow-ups recover or overflow within 16 steps)."""
    real = trainer.train_steps
    calls = {"n": 0}

    def train_steps(model, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == epoch:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_steps", train_steps)


def test_a_run_stops_at_its_first_non_finite_epoch_after_finite_ones(tmp_path, monkeypatch):
    nan_at_the_start_of(2, monkeypatch)
    cfg = config_from_dict(raw_config(tmp_path, "run"))
    run_dir = create_run_dir(cfg)
    summary = train_ddp(cfg, run_dir)
    assert summary.stopped == stop(2) and summary.rounds_completed == 2
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["train_loss"] > 0 and rows[1]["train_loss"] is None
    assert rows[0]["test_accuracy"] is None and rows[1]["test_accuracy"] == 0.0
    assert load_checkpoint(last_checkpoint(run_dir)).round == 2 and not finite_model(last_checkpoint(run_dir))


def test_a_resume_of_a_diverged_run_stops_again_without_training(tmp_path, capsys):
    cfg = diverging(tmp_path)
    run_dir = create_run_dir(cfg)
    first = train_ddp(cfg, run_dir)
    rows, before = read_metrics(run_dir), last_checkpoint(run_dir).read_bytes()
    best = best_checkpoint(run_dir).read_bytes()
    capsys.readouterr()
    # a longer cap changes nothing: no NaN epoch is trained, the reason is the same
    again = resume_run(run_dir, ["ddp.epochs=9"], PlainReporter("epoch", json_summary=True))
    out = capsys.readouterr()
    assert again.stopped == first.stopped == stop(1) and again.rounds_completed == 1
    assert read_metrics(run_dir) == rows and last_checkpoint(run_dir).read_bytes() == before
    assert best_checkpoint(run_dir).read_bytes() == best
    assert "epoch 2/9" not in out.err
    summary = json.loads(out.out)  # `--json`'s summary carries the reason
    assert summary["stopped"] == stop(1) and summary["epochs"] == 1


def test_a_run_that_stays_finite_has_no_stop(tmp_path):
    cfg = config_from_dict(raw_config(tmp_path, "run", epochs=2))
    summary = train_ddp(cfg, create_run_dir(cfg))
    assert summary.stopped is None and summary.rounds_completed == 2


def test_the_cli_says_so_in_its_json_summary(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", raw_config(tmp_path, "cli"))
    done = CliRunner().invoke(app, ["train", str(cfg), "ddp.lr=1e6", "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["stopped"] == stop(1) and summary["epochs"] == 1 and summary["final_accuracy"] == 0.0


@pytest.mark.timeout(120)
def test_two_launched_ranks_stop_at_the_same_epoch(tmp_path):
    """Every rank holds the same (NaN) model and breaks after epoch 1: a rank that went
    on would wait in epoch 2's all-reduce for a peer that left, and the launch would
    fail after ddp.timeout_s instead of exiting 0."""
    raw = raw_config(tmp_path, "two", lr=1e6, timeout_s=20)
    cfg = write_config(tmp_path / "two.yaml", raw)
    done = run_cli("launch", "--nproc", "2", str(cfg), cwd=tmp_path, timeout=100)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "two"
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1]
    assert load_checkpoint(last_checkpoint(run_dir)).round == 1
    (rank0,) = (run_dir / "torchrun").rglob("0/stdout.log")  # rank 0's summary
    assert f"stopped: {stop(1)}" in rank0.read_text().splitlines()
