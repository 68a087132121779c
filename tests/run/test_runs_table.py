"""fltool runs: finished, interrupted and failed runs (the status rule of
fltool.run.runs_table), foreign directories skipped without a traceback, --json."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fltool.cli import app
from fltool.run.runner import start_run
from fltool.run.runs_table import collect
from fltool.ui import PlainReporter

from .run_dirs import fake_run


def make_tree(root: Path, make_config) -> None:
    cfg = make_config(federated={"rounds": 3})
    fake_run(root / "done", cfg, [0.5, 0.6, 0.7])
    fake_run(root / "sweep" / "interrupted", cfg, [0.5], checkpoint=True)
    fake_run(root / "sweep" / "killed", cfg, [0.5], checkpoint=False)
    fake_run(root / "target", make_config(federated={"rounds": 9}, eval={"target_accuracy": 0.6}), [0.5, 0.65])
    fake_run(root / "ddp", make_config(mode="ddp", ddp={"epochs": 4}), [])
    diverged = fake_run(root / "diverged", cfg, [0.5, 0.0])
    rows = [json.loads(line) for line in (diverged / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["stopped"] = "diverged: the global model has non-finite parameters after round 2"
    (diverged / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "foreign" / "hydra").mkdir(parents=True)
    (root / "foreign" / "hydra" / "config.yaml").write_text("defaults: [db: mysql]\n")
    (root / "foreign" / "broken").mkdir()
    (root / "foreign" / "broken" / "config.yaml").write_text("a: [unclosed\n")
    (root / "foreign" / "binary").mkdir()
    (root / "foreign" / "binary" / "config.yaml").write_bytes(b"\xff\xfe\x00garbage")
    (root / "foreign" / "list").mkdir()
    (root / "foreign" / "list" / "config.yaml").write_text("- 1\n- 2\n")
    (root / "notes.txt").write_text("not a run")


def test_statuses_and_foreign_directories(tmp_path, make_config):
    make_tree(tmp_path, make_config)
    infos, foreign = collect(tmp_path)
    by_path = {i.path: i for i in infos}
    assert {p: i.status for p, i in by_path.items()} == {
        "ddp": "failed",
        "diverged": "stopped",  # before its planned rounds, by a rule its last row names
        "done": "finished",
        "sweep/interrupted": "interrupted",
        "sweep/killed": "failed",
        "target": "finished",  # stopped at its target, before its planned rounds
    }
    done = by_path["done"]
    assert (done.done, done.planned, done.best_accuracy, done.final_accuracy, done.wall_s) == (3, 3, 0.7, 0.7, 1.5)
    assert (done.mode, done.algorithm, done.name) == ("federated", "fedavg", "tiny")
    assert by_path["target"].target_round == 2 and by_path["ddp"].planned == 4
    assert by_path["diverged"].stopped.startswith("diverged: ") and done.stopped is None
    assert sorted(p.name for p, _ in foreign) == ["binary", "broken", "hydra", "list"]


def test_a_real_run_and_the_command(tmp_path, make_config):
    run_dir = start_run(make_config(output={"dir": str(tmp_path / "runs")}), PlainReporter()).run_dir
    make_tree(tmp_path / "more", make_config)
    result = CliRunner().invoke(app, ["runs", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "name", "mode/algorithm"]
    real = next(line for line in lines if str(run_dir.relative_to(tmp_path)) in line)
    assert "3/3" in real and real.rstrip().endswith("finished")
    assert "Traceback" not in result.output and result.stderr.count("skipped") == 4

    result = CliRunner().invoke(app, ["runs", str(tmp_path), "--json"])
    data = json.loads(result.stdout)
    assert len(data["runs"]) == 7 and len(data["skipped"]) == 4
    assert {"path", "name", "mode", "algorithm", "done", "planned", "best_accuracy", "target_round", "wall_s", "status", "stopped"} <= set(data["runs"][0])


def test_not_a_directory_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["runs", str(tmp_path / "nope")])
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {tmp_path / 'nope'}: not a directory"
