"""End to end through the real command line, on real MNIST."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from fltool.cli import app
from fltool.engine.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def fltool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fltool", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def only_run_dir(root: Path) -> Path:
    (run_dir,) = [p for p in root.glob("*/*") if p.is_dir()]
    return run_dir


def test_fedavg_2nn_reaches_real_accuracy_on_mnist_and_eval_reproduces_it(mnist_root: Path, tmp_path: Path):
    # McMahan 2NN, IID, C=0.1, E=1, B=10, lr 0.1: observed 0.8312, 0.8969, 0.9110, 0.9149, 0.9270
    # test accuracy over rounds 1-5 (seed 0, CPU, torch 2.14.1).
    out = fltool("train", str(REPO / "configs/fedavg_mnist.yaml"), "federated.rounds=5", f"output.dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "round 5/5" in out.stdout  # plain lines when stdout is not a TTY
    run_dir = only_run_dir(tmp_path)
    rows = read_metrics(run_dir)
    assert len(rows) == 5
    assert rows[-1]["test_accuracy"] >= 0.92
    assert rows[0]["test_accuracy"] < rows[-1]["test_accuracy"]

    ev = fltool("eval", str(run_dir / "checkpoints/last.pt"), "--json", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    report = json.loads(ev.stdout)
    assert report["accuracy"] == rows[-1]["test_accuracy"]
    assert abs(report["loss"] - rows[-1]["test_loss"]) < 1e-6
    assert report["round"] == 5 and len(report["per_class_accuracy"]) == 10
    assert all(0.5 < a <= 1 for a in report["per_class_accuracy"])

    text = fltool("eval", str(run_dir / "checkpoints/best.pt"), cwd=tmp_path)
    assert text.returncode == 0 and "accuracy 0.92" in text.stdout


def test_eval_rejects_corrupt_and_foreign_files(tmp_path: Path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a zip")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    truncated = tmp_path / "truncated.pt"
    torch.save({"format": "fltool.checkpoint", "model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    runner = CliRunner()
    for path, fragment in [
        (corrupt, "not a readable checkpoint"),
        (truncated, "not a readable checkpoint"),
        (foreign, "not an fltool checkpoint"),
        (tmp_path / "missing.pt", "no such checkpoint file"),
    ]:
        result = runner.invoke(app, ["eval", str(path)])
        assert result.exit_code == 2, (path, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0] and str(path) in lines[0]


def test_resume_from_the_command_line_continues_the_run(make_config, tmp_path: Path):
    from fltool.config import dump_config

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(dump_config(make_config()))
    runner = CliRunner()
    first = runner.invoke(app, ["train", str(cfg_path), "federated.rounds=2"])
    assert first.exit_code == 0, first.output
    run_dir = only_run_dir(tmp_path / "runs")
    more = runner.invoke(app, ["train", "--resume", str(run_dir), "federated.rounds=4"])
    assert more.exit_code == 0, more.output
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert "rounds: 4" in (run_dir / "config.yaml").read_text()
    missing = runner.invoke(app, ["train", "--resume", str(tmp_path)])
    assert missing.exit_code == 2 and "not a run directory" in missing.stderr


def test_ctrl_c_says_how_to_continue_or_that_there_is_nothing_to_resume(
    make_config, interrupt_checkpoint_write, monkeypatch, tmp_path
):
    import fltool.engine.federated as federated
    from fltool.config import dump_config

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(dump_config(make_config()))
    runner = CliRunner()

    interrupt_checkpoint_write(federated, 1, "before")  # Ctrl-C before any checkpoint
    early = runner.invoke(app, ["train", str(cfg_path), "output.dir=" + str(tmp_path / "early")])
    early_dir = only_run_dir(tmp_path / "early")
    assert early.exit_code == 130
    assert early.stderr.strip() == f"interrupted before the first checkpoint: nothing to resume in {early_dir}"

    interrupt_checkpoint_write(federated, 2, "after")
    late = runner.invoke(app, ["train", str(cfg_path), "output.dir=" + str(tmp_path / "late")])
    late_dir = only_run_dir(tmp_path / "late")
    assert late.exit_code == 130
    hint = f"interrupted: the last checkpoint is intact; continue with `fltool train --resume {late_dir}`"
    assert late.stderr.strip() == hint
    monkeypatch.undo()
    done = runner.invoke(app, ["train", "--resume", str(late_dir)])
    assert done.exit_code == 0, done.output
    assert [r["round"] for r in read_metrics(late_dir)] == [1, 2, 3]
