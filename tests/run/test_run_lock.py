"""Two processes never write one run directory: `train`, `train --resume` and `launch`
hold an flock on the run's `.lock`; the second gets one line naming the holder's pid
and exit 2. The OS drops the lock with its holder, so a killed run stays resumable."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fltool.cli import app
from fltool.config import dump_config
from fltool.errors import FltoolError
from fltool.run.checkpoint import load_checkpoint
from fltool.run.metrics import read_metrics
from fltool.run.rundir import run_lock


def fltool(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fltool", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_round_run(make_config, tmp_path: Path, **sections) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(dump_config(make_config(output={"run_dir": str(tmp_path / "run")}, **sections)))
    done = CliRunner().invoke(app, ["train", str(path), "federated.rounds=1"])
    assert done.exit_code == 0, done.output
    return tmp_path / "run"


def test_a_held_run_is_refused_with_the_holders_pid(make_config, tmp_path: Path):
    run_dir = one_round_run(make_config, tmp_path)
    with run_lock(run_dir):
        result = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "federated.rounds=2"])
        with pytest.raises(FltoolError, match=f"pid {os.getpid()}"):
            with run_lock(run_dir):
                pass
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {run_dir}: another fltool process (pid {os.getpid()}) is writing this run; wait for it to end, or stop it"
    )
    assert [r["round"] for r in read_metrics(run_dir)] == [1]  # untouched
    again = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "federated.rounds=2"])  # released
    assert again.exit_code == 0, again.output


def test_two_resumes_started_at_once_one_runs_one_is_refused(make_config, tmp_path: Path):
    # rounds long in compute, few in writes (each round's files are fsynced), so that the
    # winner holds the run for seconds whatever the two start-ups' jitter
    run_dir = one_round_run(make_config, tmp_path, federated={"local_epochs": 60})
    more = ["federated.rounds=5", "eval.every=5"]
    procs = [fltool("train", "--resume", str(run_dir), *more, cwd=tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = next(i for i, p in enumerate(procs) if p.returncode == 2)
    winner = procs[1 - loser]
    line = outs[loser][1].strip()
    assert re.fullmatch(rf"error: {re.escape(str(run_dir))}: another fltool process \(pid {winner.pid}\) is writing this run; .*", line)
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]


def test_a_killed_holder_leaves_no_stale_lock(make_config, tmp_path: Path):
    run_dir = one_round_run(make_config, tmp_path)
    proc = fltool("train", "--resume", str(run_dir), "federated.rounds=100000", "eval.every=100000", cwd=tmp_path)
    deadline = time.monotonic() + 120
    while len(read_metrics(run_dir)) < 3 and time.monotonic() < deadline:  # it holds the lock and trains
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    # however far it got before the kill (rounds are fast: often past 3), two rounds more
    trained = load_checkpoint(run_dir / "checkpoints" / "last.pt").round
    done = CliRunner().invoke(app, ["train", "--resume", str(run_dir), f"federated.rounds={trained + 2}"])
    assert done.exit_code == 0, done.output
    assert [r["round"] for r in read_metrics(run_dir)] == list(range(1, trained + 3))
