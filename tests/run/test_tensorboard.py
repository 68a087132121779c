"""output.tensorboard: the events read back with TensorBoard's own reader hold the
numbers metrics.csv holds, per round, with the config as hyperparameters; a resumed
run's events are those of its rows, not duplicates."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from fltool.run.runner import resume_run, start_run
from fltool.ui import PlainReporter

from tensorboard.backend.event_processing import event_accumulator  # the tensorboard extra: CI installs it


def read_events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_csv_columns(run_dir: Path, step: str = "round") -> dict[str, list[tuple[int, float]]]:
    rows = list(csv.DictReader(io.StringIO((run_dir / "metrics.csv").read_text())))
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, cell in row.items():
            if key == step or cell in ("", None) or " " in cell:
                continue
            try:
                value = float(cell)
            except ValueError:
                continue
            out.setdefault(key, []).append((int(row[step]), value))
    return out


def assert_same(events: dict, columns: dict) -> None:
    assert set(events) == set(columns) - {"client_ids"}
    for tag, points in columns.items():
        got = events[tag]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-6), tag


def test_events_hold_the_numbers_of_metrics_csv(make_config):
    cfg = make_config(output={"tensorboard": True}, eval={"every": 1})
    summary = start_run(cfg, PlainReporter())
    run_dir = summary.run_dir
    events = read_events(run_dir)
    columns = read_csv_columns(run_dir)
    assert {"test_accuracy", "train_loss", "bytes_up"} <= set(events)
    assert_same(events, columns)
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    hparams = acc.summary_metadata.get("_hparams_/session_start_info")
    assert hparams is not None and b"federated.lr" in hparams.plugin_data.content


def test_a_resumed_run_rewrites_no_step_twice(make_config):
    cfg = make_config(output={"tensorboard": True}, federated={"rounds": 2})
    run_dir = start_run(cfg, PlainReporter()).run_dir
    resume_run(run_dir, ["federated.rounds=4"], PlainReporter())
    events = read_events(run_dir)
    assert [s for s, _ in events["test_accuracy"]] == [1, 2, 3, 4]
    assert_same(events, read_csv_columns(run_dir))


def test_ddp_runs_write_events_per_epoch(make_config):
    cfg = make_config(mode="ddp", ddp={"epochs": 2, "batch_size": 32}, output={"tensorboard": True})
    run_dir = start_run(cfg, PlainReporter()).run_dir
    events = read_events(run_dir)
    assert [s for s, _ in events["test_accuracy"]] == [1, 2]
    assert_same(events, read_csv_columns(run_dir, "epoch"))


def test_off_by_default_writes_nothing(make_config):
    run_dir = start_run(make_config(), PlainReporter()).run_dir
    assert not (run_dir / "tensorboard").exists()


def test_missing_package_is_one_line(monkeypatch):
    import builtins

    from fltool.errors import FltoolError
    from fltool.run import tensorboard

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(FltoolError) as info:
        tensorboard.check_installed()
    assert len(info.value.lines) == 1 and "pip install 'fltool[tensorboard]'" in info.value.lines[0]
