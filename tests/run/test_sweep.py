"""fltool sweep: the grid from Hydra's comma syntax, the summary's mean ± std, a rerun
that skips finished runs and resumes the rest, and bad specs refused before anything
runs. Runs go through the real `fltool train` command lines, in-process (a subprocess
per run costs seconds of imports)."""

from __future__ import annotations

import csv
import json
import io
import math
import os
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fltool.cli import app
from fltool.config import dump_config
from fltool.errors import FltoolError
from fltool.run import sweep as sw
from fltool.run import sweep_spec as spec
from fltool.run.rundir import run_lock
from fltool.run.runs_table import read_rows, run_info


def test_values_split_at_top_level_commas_and_ranges_expand():
    assert spec.split_values("a,[1,2],'x,y',range(3)") == ["a", "[1,2]", "'x,y'", "range(3)"]
    axes = spec.parse_axes(["seed=range(3)", "lr=0.1,0.2", "shape=[1,8,8]", "k=range(1, 7, 2),9"])
    assert [(a.key, a.values) for a in axes] == [
        ("seed", ["0", "1", "2"]),
        ("lr", ["0.1", "0.2"]),
        ("shape", ["[1,8,8]"]),
        ("k", ["1", "3", "5", "9"]),
    ]


def test_the_grid_is_the_cross_product_last_axis_fastest():
    axes = spec.parse_axes(["federated.lr=0.1,0.2", "seed=0,1,2"])
    points = spec.grid(axes)
    assert points == [[f"federated.lr={lr}", f"seed={s}"] for lr in ("0.1", "0.2") for s in "012"]
    names = spec.run_names(axes, points)
    assert names[0] == "000-lr=0.1-seed=0" and names[5] == "005-lr=0.2-seed=2" and len(set(names)) == 6


def test_mean_and_sample_std():
    mean, std = sw.mean_std([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and std == pytest.approx(0.2)  # sample std (n - 1)
    assert sw.mean_std([0.3]) == (0.3, 0.0)
    assert sw.mean_std([]) is None and sw.mean_std([float("nan"), 1.0]) == (1.0, 0.0)
    values = [0.61, 0.64, 0.70, 0.52]
    assert sw.mean_std(values)[1] == pytest.approx(math.sqrt(sum((v - statistics.fmean(values)) ** 2 for v in values) / 3))


def test_the_summary_groups_by_all_but_the_seed(tmp_path):
    axes = spec.parse_axes(["federated.lr=0.1,0.2", "seed=0,1"])
    points = spec.grid(axes)
    plan = spec.SweepPlan(tmp_path / "c.yaml", axes, points, spec.run_names(axes, points), tmp_path)
    finals = [0.5, 0.7, 0.8, 0.8]
    results = [
        sw.RunResult(n, p, "finished", f, f, 3 if f > 0.6 else None, 2.0, values=dict(x.split("=") for x in p))
        for n, p, f in zip(plan.names, points, finals)
    ]
    groups = sw.group_by_setting(plan, results)
    assert [g.setting for g in groups] == [{"federated.lr": "0.1"}, {"federated.lr": "0.2"}]
    assert groups[0].stat("final_accuracy") == pytest.approx((0.6, statistics.stdev([0.5, 0.7])))
    assert groups[1].stat("final_accuracy") == (0.8, 0.0)
    text = sw.format_summary(plan, results)
    assert "0.6000 ± 0.1414" in text and "0.8000 ± 0.0000" in text and "3.0 ± 0.0 (1/2)" in text
    rows = list(csv.DictReader(io.StringIO(sw.summary_csv(plan, results))))
    assert [r["federated.lr"] for r in rows] == ["0.1", "0.1", "0.2", "0.2"] and rows[2]["final_accuracy"] == "0.8"


class InProcess:
    """A Popen stand-in that runs the command's `fltool ...` part through the CLI, now."""

    def __init__(self, cmd: list[str], log, env) -> None:
        assert cmd[1:3] == ["-m", "fltool"]
        result = CliRunner().invoke(app, cmd[3:])
        log.write(result.output)
        self.code = result.exit_code

    def poll(self) -> int:
        return self.code


@pytest.fixture
def config(tmp_path: Path, make_config) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(dump_config(make_config(federated={"rounds": 3, "local_epochs": 1})))
    return path


def test_a_rerun_skips_finished_runs_and_resumes_the_others(tmp_path, monkeypatch, config):
    import fltool.trainers.federated as fed

    tokens = ["federated.lr=0.05,0.1", "seed=range(2)"]
    plan = spec.plan_sweep(config, tokens, tmp_path / "sweep")
    real_save = fed.save_checkpoint
    calls = []

    def interrupt_second_run(cmd, log, env):  # Ctrl-C after run 001's round-2 checkpoint
        calls.append(cmd)

        def save(state, path):
            real_save(state, path)
            if state.round == 2:
                raise KeyboardInterrupt

        with monkeypatch.context() as m:
            if len(calls) == 2:
                m.setattr(fed, "save_checkpoint", save)
            return InProcess(cmd, log, env)

    lines: list[str] = []
    results = sw.run_sweep(plan, 1, lines.append, spawn=interrupt_second_run)
    assert [r.status for r in results] == ["finished", "interrupted", "finished", "finished"]
    assert "--resume" not in calls[1] and f"output.run_dir={plan.run_dir(1)}" in calls[1]
    assert [r["round"] for r in read_rows(plan.run_dir(1))] == [1]  # (round 2 is in its checkpoint)
    # and run 002 killed before its first checkpoint: its directory and config.yaml only
    killed = plan.run_dir(2)
    for extra in ("metrics.jsonl", "metrics.csv", "checkpoints/last.pt", "checkpoints/best.pt"):
        (killed / extra).unlink()
    assert run_info(killed).status == "failed"
    summary = list(csv.DictReader(io.StringIO((plan.dir / "summary.csv").read_text())))
    assert [r["status"] for r in summary] == ["finished", "interrupted", "finished", "finished"]

    again = spec.plan_sweep(config, tokens, tmp_path / "sweep")
    calls.clear()
    lines.clear()
    results = sw.run_sweep(again, 1, lines.append, spawn=lambda cmd, log, env: calls.append(cmd) or InProcess(cmd, log, env))
    assert [r.status for r in results] == ["finished"] * 4
    assert [c[c.index("--resume") + 1] for c in calls] == [str(plan.run_dir(1)), str(plan.run_dir(2))]
    assert sum("finished already, skipped" in line for line in lines) == 2
    for i in range(4):
        assert [r["round"] for r in read_rows(plan.run_dir(i))] == [1, 2, 3]
    summary = list(csv.DictReader(io.StringIO((plan.dir / "summary.csv").read_text())))
    assert summary[1]["final_accuracy"] == str(results[1].final_accuracy) != ""
    assert set(summary[0]) >= {"run", "federated.lr", "seed", "final_accuracy", "best_accuracy", "target_round", "wall_s"}


def test_a_sweep_already_running_in_the_dir_is_refused_before_any_run_starts(tmp_path, config):
    """Two sweeps of one directory would start the same runs (one failing at the run's
    lock) and write into the same logs: the second is one line naming the first's pid."""
    plan = spec.plan_sweep(config, ["seed=0,1"], tmp_path / "sweep")
    spec.prepare_dir(plan)
    started = []
    with run_lock(plan.dir, what="sweep"):  # as the first sweep holds it
        with pytest.raises(FltoolError, match=rf"another fltool process \(pid {os.getpid()}\) is writing this sweep"):
            sw.run_sweep(plan, 1, print, spawn=lambda *a: started.append(a))
        result = CliRunner().invoke(app, ["sweep", str(config), "seed=0,1", "--dir", str(plan.dir)])
    assert started == [] and result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: {plan.dir}: another fltool process (pid {os.getpid()}) is writing this sweep; wait for it to end, or stop it"]
    assert not plan.run_dir(0).exists() and not (plan.dir / "summary.csv").exists()


def test_another_sweep_in_the_same_dir_is_refused(tmp_path, config):
    spec.prepare_dir(spec.plan_sweep(config, ["seed=0,1"], tmp_path / "sweep"))
    with pytest.raises(FltoolError, match="holds another sweep"):
        spec.prepare_dir(spec.plan_sweep(config, ["seed=0,1,2"], tmp_path / "sweep"))


@pytest.mark.parametrize(
    "spec, message",
    [
        (["seed="], "sweep: seed=: no values"),
        (["federated.lrr=0.1,0.2"], "federated.lrr: unknown key"),
        (["seed=range(0)"], "an empty list"),
        (["seed=0,,1"], "an empty value"),
        (["seed=[]"], "seed: expected an integer"),
        (["seed"], "expected key=value"),
        ([], "no axes"),
        (["output.run_dir=x,y"], "the sweep sets it"),
        # counted before the grid is built or any point validated: no memory blow-up, no hang
        (["seed=range(100000000)"], "seed=range(100000000): 100,000,000 values; a sweep runs at most 10,000"),
        (["seed=range(0, 1000000, 2)"], "500,000 values; a sweep runs at most 10,000"),
        (["federated.lr=" + ",".join(str(i) for i in range(101)), "seed=range(100)"], "101 x 100 = 10,100 runs"),
        (["seed=range(" + "9" * 5000 + ")"], "(5,012 characters): a range's numbers must have at most 18 digits"),
        (["seed=" + ",".join(["1"] * 3000)], "... (6,004 characters): a value repeats"),
    ],
)
def test_a_bad_spec_is_one_line_and_exit_2_before_anything_runs(tmp_path, spec, message, config):
    result = CliRunner().invoke(app, ["sweep", str(config), *spec, "--dir", str(tmp_path / "sweep")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert len(lines[0]) < 300  # a huge token is cut, not echoed
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "runs").exists()


def test_jobs_runs_that_many_processes_at_once(tmp_path, config, monkeypatch):
    plan = spec.plan_sweep(config, ["seed=range(5)"], tmp_path / "sweep")
    live: list[object] = []
    peak = []

    class Slow:  # running for three polls, then exit 0
        def __init__(self, cmd, log, env):
            self.polls = 0
            live.append(self)
            peak.append(len(live))
            assert env["OMP_NUM_THREADS"] == "1"

        def poll(self):
            self.polls += 1
            if self.polls < 3:
                return None
            live.remove(self)
            return 0

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(sw.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(sw.time, "sleep", lambda s: None)
    results = sw.run_sweep(plan, 2, lambda line: None, spawn=Slow)
    assert len(peak) == 5 and max(peak) == 2
    assert [r.status for r in results] == ["not started"] * 5  # (the stand-in wrote no run)
    with pytest.raises(FltoolError, match="--jobs must be at least 1"):
        sw.run_sweep(plan, 0, lambda line: None, spawn=Slow)
    with pytest.raises(FltoolError, match="--jobs must be at most 1024 \\(processes on this machine\\), got 100000"):
        sw.run_sweep(plan, 100_000, lambda line: None, spawn=Slow)


def test_sigterm_stops_a_background_sweep_and_its_runs_cleanly(tmp_path, make_config):
    """A sweep started in the background of a script inherits SIGINT ignored, so Ctrl-C
    cannot reach it; SIGTERM stops it as Ctrl-C would: its run gets SIGINT (restored for
    it), stops at a round boundary with its checkpoint intact, and nothing trains on."""
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "long.yaml"
    path.write_text(dump_config(make_config(federated={"rounds": 100000, "local_epochs": 1})))
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fltool", "sweep", str(path), "seed=0", "--dir", str(sweep_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as `fltool sweep ... &` in a script
    )
    plan = spec.plan_sweep(path, ["seed=0"], sweep_dir)
    last = plan.run_dir(0) / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), proc.communicate()[0] if proc.poll() is not None else "no checkpoint in 120 s"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 130, out
    assert "interrupted; continue with `fltool sweep" in out
    log = (sweep_dir / "logs" / f"{plan.names[0]}.log").read_text()
    assert "interrupted: the last checkpoint is intact" in log  # the run stopped on its SIGINT, not killed
    rows = read_rows(plan.run_dir(0))
    time.sleep(1.0)
    assert read_rows(plan.run_dir(0)) == rows  # nothing trains on
    assert [r["status"] for r in csv.DictReader(io.StringIO((sweep_dir / "summary.csv").read_text()))] == ["interrupted"]


def test_a_diverged_grid_point_is_stopped_counted_as_ended_and_not_resumed(tmp_path, make_config):
    """A learning-rate grid's diverging point is a result, not a failure: it shows as
    stopped (with its reason in `fltool runs --json`), the sweep exits 0, and a rerun
    skips it rather than resuming it."""
    path = tmp_path / "grid.yaml"
    path.write_text(dump_config(make_config(federated={"rounds": 4, "local_epochs": 1})))
    grid = ["server_optimizer.lr=1.0,1e6", "--dir", str(tmp_path / "sweep")]
    result = CliRunner().invoke(app, ["sweep", str(path), *grid])
    assert result.exit_code == 0, result.output
    summary = list(csv.DictReader(io.StringIO((tmp_path / "sweep" / "summary.csv").read_text())))
    assert [r["status"] for r in summary] == ["finished", "stopped"]
    assert [r["round"] for r in read_rows(Path(summary[1]["run_dir"]))] == [1, 2]  # stopped at its NaN round
    runs = CliRunner().invoke(app, ["runs", str(tmp_path / "sweep"), "--json"])
    stopped = {r["status"]: r["stopped"] for r in json.loads(runs.stdout)["runs"]}
    assert stopped["finished"] is None and stopped["stopped"].startswith("diverged: ")
    again = CliRunner().invoke(app, ["sweep", str(path), *grid])
    assert again.exit_code == 0 and "stopped already, skipped" in again.output and "resuming" not in again.output
