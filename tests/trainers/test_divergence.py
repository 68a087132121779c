"""A federated run whose global model goes NaN or inf stops after that round, says why,
and a resume of it stops again without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fltool.cli import app
from fltool.run.checkpoint import load_checkpoint
from fltool.run.metrics import read_metrics
from fltool.run.rundir import create_run_dir, last_checkpoint
from fltool.run.runner import resume_run
from fltool.run.runs_table import run_info
from fltool.trainers.federated import train_federated
from fltool.trainers.progress import all_finite
from fltool.ui import PlainReporter

REPO = Path(__file__).resolve().parents[2]
STOP_2 = "diverged: the global model has non-finite parameters after round 2"


def diverging(make_config, engine: str = "sequential", **federated):
    """Round 1 trains as usual; the server's step of 1e6 x the mean update leaves a
    finite but huge model, whose round-2 training overflows to NaN (both engines)."""
    return make_config(
        federated={"rounds": 6, "engine": engine, **federated},
        server_optimizer={"name": "sgd", "lr": 1e6},
        eval={"every": 4},
        output={"checkpoint_every": 4},
    )


def finite_model(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_checkpoint(path).model.values())


@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_a_diverged_run_stops_after_its_first_non_finite_round(make_config, engine):
    cfg = diverging(make_config, engine)
    run_dir = create_run_dir(cfg)
    reported: list[int] = []
    summary = train_federated(cfg, run_dir, on_round=lambda row: reported.append(row["round"]))
    assert summary.stopped == STOP_2
    assert reported == [1, 2]  # nothing trained after it
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2] and summary.rounds_completed == 2
    assert rows[0]["train_loss"] > 0 and rows[1]["train_loss"] is None  # NaN, null in the JSON
    # the stop round is evaluated and checkpointed as a last round is (eval.every and
    # output.checkpoint_every are 4): the metrics and last.pt show where it diverged
    assert rows[0]["test_accuracy"] is None and rows[1]["test_accuracy"] == 0.0 and summary.final_accuracy == 0.0
    assert load_checkpoint(last_checkpoint(run_dir)).round == 2 and not finite_model(last_checkpoint(run_dir))
    # the reason is in the stop round's row (and so in last.pt's rows): `fltool runs` and
    # `fltool sweep` show the run as stopped, which a sweep does not resume
    assert rows[1]["stopped"] == STOP_2 and "stopped" not in rows[0]
    assert load_checkpoint(last_checkpoint(run_dir)).metrics[-1]["stopped"] == STOP_2
    assert (run_info(run_dir).status, run_info(run_dir).stopped) == ("stopped", STOP_2)


def test_both_engines_stop_at_the_same_round_with_the_same_rows(make_config):
    a, b = (diverging(make_config, engine) for engine in ("sequential", "vectorized"))
    ra, rb = (create_run_dir(c) for c in (a, b))
    sa, sb = train_federated(a, ra), train_federated(b, rb)
    assert sa.stopped == sb.stopped == STOP_2
    la, lb = read_metrics(ra), read_metrics(rb)
    assert [r["round"] for r in la] == [r["round"] for r in lb] == [1, 2]
    assert la[0]["train_loss"] == pytest.approx(lb[0]["train_loss"], rel=1e-5)
    assert [(r["train_loss"] is None, r["test_accuracy"]) for r in la] == [(r["train_loss"] is None, r["test_accuracy"]) for r in lb]


def test_a_resume_of_a_diverged_run_stops_again_without_training(make_config, capsys):
    cfg = diverging(make_config)
    run_dir = create_run_dir(cfg)
    first = train_federated(cfg, run_dir)
    rows, before = read_metrics(run_dir), last_checkpoint(run_dir).read_bytes()
    capsys.readouterr()
    # a longer cap changes nothing: no NaN round is trained, the reason is the same
    again = resume_run(run_dir, ["federated.rounds=9"], PlainReporter("round", json_summary=True))
    out = capsys.readouterr()
    assert again.stopped == first.stopped == STOP_2 and again.rounds_completed == 2
    assert read_metrics(run_dir) == rows and last_checkpoint(run_dir).read_bytes() == before
    assert "round 3/9" not in out.err
    summary = json.loads(out.out)  # `--json`'s summary carries the reason
    assert summary["stopped"] == STOP_2 and summary["rounds"] == 2


def test_a_run_that_stays_finite_has_no_stop(make_config):
    summary = train_federated(cfg := make_config(), create_run_dir(cfg))
    assert summary.stopped is None and summary.rounds_completed == 3


def test_all_finite_sees_a_nan_or_an_inf_in_any_parameter():
    params = [torch.zeros(3), torch.ones(2, 2)]
    assert all_finite(params).item()
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = [p.clone() for p in params]
        broken[1][1, 0] = bad
        assert not all_finite(broken).item()


def test_the_cli_stops_a_2nn_on_mnist_with_a_huge_learning_rate(mnist_root: Path, tmp_path: Path):
    """McMahan's 2NN on MNIST at lr 1e6 goes NaN in round 1: `fltool train --json` says
    so and trains no more of its 20 rounds."""
    done = CliRunner().invoke(app, [
        "train", str(REPO / "configs/fedavg_mnist.yaml"), "federated.lr=1e6", "federated.fraction=0.02",
        f"output.dir={tmp_path}", "--json",
    ])  # fmt: skip
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["stopped"] == "diverged: the global model has non-finite parameters after round 1"
    assert summary["rounds"] == 1 and summary["final_accuracy"] == 0.0
    (run_dir,) = [p for p in tmp_path.glob("*/*") if p.is_dir()]
    assert [r["round"] for r in read_metrics(run_dir)] == [1]
