"""SIGKILL at 20 random moments of a short run, before its first checkpoint included:
every killed run is finished by one documented command (`fltool train --resume RUN_DIR`,
or the same `fltool train` again when the kill came before the run directory existed),
and every finished run's final model is bitwise the uninterrupted run's."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fltool.cli import app
from fltool.config import dump_config
from fltool.run.checkpoint import load_checkpoint
from fltool.run.metrics import read_metrics

KILLS = 20

# A process with torch and fltool imported once forks each run to be killed: the child is
# a real process killed by a real SIGKILL mid-write, without paying the 3-8 s import of a
# fresh interpreter 20 times. The parent never runs a tensor op, so no thread pool exists
# to be forked half-held.
FORK_SERVER = """
import json, os, sys
import torch, fltool.cli, fltool.trainers.federated, fltool.run.checkpoint  # noqa: F401
for line in sys.stdin:
    cwd, argv = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(cwd)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1), os.dup2(null, 2)
        try:
            fltool.cli.main(argv)
        except SystemExit as exc:
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        os._exit(0)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


class ForkedRun:
    """`poll()` and `kill()` for a run forked by the fork server, like a Popen's."""

    def __init__(self, server: subprocess.Popen, cwd: Path, argv: list[str]) -> None:
        import json

        self.server = server
        server.stdin.write(json.dumps([str(cwd), argv]) + "\n")
        server.stdin.flush()
        self.pid = int(server.stdout.readline())
        self.reaped = False

    def poll(self) -> int | None:
        try:  # a zombie still "exists": read its state rather than signal it
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return 0
        return 0 if state in ("Z", "X") else None

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:  # finished and reaped already
            pass
        assert self.server.stdout.readline().strip() == "reaped"


def written_rows(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def wait_for(proc: "ForkedRun", ready, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.timeout(900)
def test_sigkill_anywhere_then_one_command_finishes_the_same_run(make_config, tmp_path: Path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(dump_config(make_config(federated={"rounds": 6}, eval={"every": 2})))
    runner = CliRunner()
    ref = runner.invoke(app, ["train", str(cfg_path), f"output.run_dir={tmp_path / 'ref'}"])
    assert ref.exit_code == 0, ref.output
    expected = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt").model

    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        kill_runs_and_finish_them(server, cfg_path, expected, tmp_path)
    finally:
        server.stdin.close()
        server.wait(timeout=60)


def kill_runs_and_finish_them(server: subprocess.Popen, cfg_path: Path, expected: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    rng = random.Random(0)
    stages = {"no directory": 0, "no checkpoint": 0, "mid-run": 0, "finished": 0}
    for i in range(KILLS):
        run_dir = tmp_path / f"killed{i}"
        command = ["train", str(cfg_path), f"output.run_dir={run_dir}"]
        proc = ForkedRun(server, tmp_path, command)
        # a random moment, placed by what the run has written (wall-clock spans vary with
        # the machine's load): at start-up, once the directory exists, or after round k
        rows = rng.randint(-1, 5)
        wait_for(proc, lambda: rows < 0 or (run_dir / "config.yaml").exists() and written_rows(run_dir) >= rows)
        time.sleep(rng.uniform(0, 0.1) if rows > 0 else 0.0)  # (rows 0: just after config.yaml, before round 1)
        proc.kill()
        if not (run_dir / "config.yaml").exists():
            stages["no directory"] += 1
            finish = runner.invoke(app, command)  # nothing was written: the same command again
        else:
            done = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
            has_ckpt = (run_dir / "checkpoints" / "last.pt").exists()
            stages["finished" if len(done) == 6 else "mid-run" if has_ckpt else "no checkpoint"] += 1
            finish = runner.invoke(app, ["train", "--resume", str(run_dir)])
        assert finish.exit_code == 0, (i, finish.output)
        assert [r["round"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
        got = load_checkpoint(run_dir / "checkpoints" / "last.pt").model
        assert all(torch.equal(got[k], expected[k]) for k in expected), i
    # the kills landed everywhere: before the directory, before the first checkpoint, mid-run
    assert stages["no directory"] and stages["no checkpoint"] and stages["mid-run"] >= 3, stages


def test_a_kill_after_the_last_checkpoint_before_its_metrics_is_repaired_by_resume(
    make_config, interrupt_checkpoint_write, monkeypatch, tmp_path: Path
):
    """The last round's checkpoint is written, the metrics files are not: `--resume` has
    nothing left to train, and still writes the rows the checkpoint carries."""
    from fltool.trainers import federated

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(dump_config(make_config(federated={"rounds": 3})))
    run_dir = tmp_path / "run"
    interrupt_checkpoint_write(federated, 3, "after")
    stopped = CliRunner().invoke(app, ["train", str(cfg_path), f"output.run_dir={run_dir}"])
    assert stopped.exit_code == 130
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2]  # a round behind its checkpoint
    monkeypatch.undo()
    done = CliRunner().invoke(app, ["train", "--resume", str(run_dir)])
    assert done.exit_code == 0 and "nothing left to train" in done.stdout
    assert [r["round"] for r in read_metrics(run_dir)] == [1, 2, 3]
