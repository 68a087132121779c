"""`fltool sweep CONFIG.yaml key=a,b,c seed=range(3) [--jobs N] [--dir D]`: a grid of runs.

Each `key=values` argument is an axis, in Hydra's comma syntax: `lr=0.01,0.1`, with
`range(stop)`, `range(start, stop[, step])` as an item and brackets, braces, parentheses
and quotes protecting their commas (`data.synthetic.shape=[1,8,8]` is one value). The
grid is the cross product of the axes, in the order given (the last axis fastest).

The sweep directory (default <output.dir>/<name>-sweep/<timestamp>) holds sweep.yaml
(the config, the axes, and each run's overrides and directory), one normal run directory
per grid point (its `output.run_dir`), logs/<run>.log with each run's output, and
summary.csv. Run again with the same --dir, a sweep skips its finished runs, resumes the
unfinished ones (`fltool train --resume`) and starts the rest. Each run is its own
`python -m fltool train` process, --jobs of them at once."""

from __future__ import annotations

import csv
import io
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fltool.errors import FltoolError
from fltool.run.rundir import run_lock
from fltool.run.signals import sigterm_as_interrupt
from fltool.run.sweep_spec import SEED, SweepPlan, prepare_dir

SUMMARY_FILE = "summary.csv"
MAX_JOBS = 1024  # as launch's --nproc: each run is a process holding torch, and all would start at once
# a run at its end: trained as planned or to its target, or stopped by a rule (it
# diverged, or its privacy budget is spent), which a resume would not train further
ENDED = ("finished", "stopped")


@dataclass
class RunResult:
    name: str
    overrides: list[str]
    status: str  # finished, stopped, interrupted, failed, not started
    final_accuracy: float | None = None
    best_accuracy: float | None = None
    target_round: int | None = None
    wall_s: float | None = None
    note: str = ""
    values: dict[str, str] = field(default_factory=dict)


# ---- running -----------------------------------------------------------------------


def run_command(plan: SweepPlan, i: int) -> list[str] | None:
    """The command that brings run i to its end; None when it is at its end already."""
    from fltool.run.runs_table import run_info

    run_dir = plan.run_dir(i)
    train = [sys.executable, "-m", "fltool", "train"]
    if (run_dir / "config.yaml").is_file():
        if run_info(run_dir).status in ENDED:
            return None
        return [*train, "--resume", str(run_dir)]
    return [*train, str(plan.config), *plan.points[i], f"output.run_dir={run_dir}"]


def child_env(jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:  # N processes share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def spawn_process(cmd: list[str], log: Any, env: dict[str, str]) -> subprocess.Popen:
    # its own session: a Ctrl-C reaches the sweep alone, which passes one SIGINT on to each run.
    # A sweep started in the background of a script ignores SIGINT, and exec would pass that
    # on: the runs get it back, so the SIGINT the sweep sends them still stops them cleanly.
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        preexec_fn=_default_sigint if ignored else None,  # (the sweep starts no threads: preexec_fn is safe)
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_sweep(
    plan: SweepPlan, jobs: int = 1, echo: Callable[[str], None] = print, spawn: Callable[..., Any] = spawn_process
) -> list[RunResult]:
    with sigterm_as_interrupt():
        return _run_sweep(plan, jobs, echo, spawn)


def _run_sweep(plan: SweepPlan, jobs: int, echo: Callable[[str], None], spawn: Callable[..., Any]) -> list[RunResult]:
    """Run every unfinished grid point, `jobs` processes at once; returns each point's
    result (read back from its run directory) in grid order. `spawn(cmd, log, env)`
    starts one (a Popen-like object: poll, send_signal, wait, kill)."""
    if jobs < 1:
        raise FltoolError(f"sweep: --jobs must be at least 1, got {jobs}")
    if jobs > MAX_JOBS:
        raise FltoolError(f"sweep: --jobs must be at most {MAX_JOBS} (processes on this machine), got {jobs}")
    prepare_dir(plan)
    # two sweeps of one directory would start the same runs and write into one log
    with run_lock(plan.dir, what="sweep"):
        return _run_points(plan, jobs, echo, spawn)


def _run_points(plan: SweepPlan, jobs: int, echo: Callable[[str], None], spawn: Callable[..., Any]) -> list[RunResult]:
    (plan.dir / "logs").mkdir(exist_ok=True)
    n = len(plan.points)
    pending = list(range(n))
    running: dict[int, tuple[subprocess.Popen, Any]] = {}
    exit_codes: dict[int, int] = {}
    env = child_env(jobs)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                i = pending.pop(0)
                cmd = run_command(plan, i)
                label = f"[{i + 1}/{n}] {plan.names[i]}"
                if cmd is None:
                    echo(f"{label}: {read_result(plan, i).status} already, skipped")
                    continue
                log = open(plan.dir / "logs" / f"{plan.names[i]}.log", "a")
                echo(f"{label}: {'resuming' if '--resume' in cmd else 'starting'}")
                running[i] = (spawn(cmd, log, env), log)
            for i, (proc, log) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[i]
                exit_codes[i] = code
                result = read_result(plan, i)
                how = result.status if code == 0 else f"failed (exit {code}; see {plan.dir / 'logs' / (plan.names[i] + '.log')})"
                echo(f"[{i + 1}/{n}] {plan.names[i]}: {how}{describe(result)}")
            if running:
                time.sleep(0.1)
    except KeyboardInterrupt:
        for proc, log in running.values():
            proc.send_signal(2)  # SIGINT: each run stops at a round boundary, its checkpoint intact
        for proc, log in running.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        write_summary(plan, [read_result(plan, i) for i in range(n)])
        raise
    results = [read_result(plan, i, exit_codes.get(i)) for i in range(n)]
    write_summary(plan, results)
    return results


def describe(result: RunResult) -> str:
    parts = []
    if result.final_accuracy is not None:
        parts.append(f"final {result.final_accuracy:.4f}")
    if result.best_accuracy is not None:
        parts.append(f"best {result.best_accuracy:.4f}")
    if result.target_round is not None:
        parts.append(f"target at round {result.target_round}")
    if result.wall_s is not None:
        parts.append(f"{result.wall_s:.1f} s")
    return f" ({', '.join(parts)})" if parts else ""


def read_result(plan: SweepPlan, i: int, exit_code: int | None = None) -> RunResult:
    from fltool.run.runs_table import run_info

    run_dir = plan.run_dir(i)
    values = {a.key: p.partition("=")[2] for a, p in zip(plan.axes, plan.points[i])}
    if not (run_dir / "config.yaml").is_file():
        status = "failed" if exit_code else "not started"
        return RunResult(plan.names[i], plan.points[i], status, values=values)
    info = run_info(run_dir)  # (a run whose process failed is interrupted or failed by what it left)
    return RunResult(
        plan.names[i], plan.points[i], info.status, info.final_accuracy, info.best_accuracy, info.target_round, info.wall_s, values=values
    )


# ---- the summary -------------------------------------------------------------------


def summary_csv(plan: SweepPlan, results: list[RunResult]) -> str:
    keys = [a.key for a in plan.axes]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run", *keys, "status", "final_accuracy", "best_accuracy", "target_round", "wall_s", "run_dir"])
    for r in results:
        writer.writerow(
            [r.name, *(r.values[k] for k in keys), r.status, _cell(r.final_accuracy), _cell(r.best_accuracy), _cell(r.target_round), _cell(r.wall_s), str(plan.dir / r.name)]
        )
    return buf.getvalue()


def _cell(value: Any) -> Any:
    return "" if value is None else value


def write_summary(plan: SweepPlan, results: list[RunResult]) -> None:
    from fltool.run.atomic import atomic_write_text

    atomic_write_text(plan.dir / SUMMARY_FILE, summary_csv(plan, results))


def mean_std(values: list[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (n - 1; 0 for one value); None for none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass
class Group:
    setting: dict[str, str]  # every axis but the seed
    results: list[RunResult]

    def stat(self, attr: str) -> tuple[float, float] | None:
        return mean_std([getattr(r, attr) for r in self.results if getattr(r, attr) is not None])


def group_by_setting(plan: SweepPlan, results: list[RunResult]) -> list[Group]:
    keys = [a.key for a in plan.axes if a.key != SEED]
    groups: dict[tuple[str, ...], Group] = {}
    for r in results:
        setting = tuple(r.values[k] for k in keys)
        groups.setdefault(setting, Group(dict(zip(keys, setting)), [])).results.append(r)
    return list(groups.values())


def _pm(stat: tuple[float, float] | None, digits: int = 4) -> str:
    return "-" if stat is None else f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"


def format_summary(plan: SweepPlan, results: list[RunResult]) -> str:
    """One row per setting: mean ± std over its seeds (sample std)."""
    from fltool.run.runs_table import render

    groups = group_by_setting(plan, results)
    keys = [a.key for a in plan.axes if a.key != SEED and len(a.values) > 1]
    header = [*keys, "runs", "final acc", "best acc", "target round", "wall s"]
    body = []
    for g in groups:
        done = [r for r in g.results if r.status in ENDED]
        reached = [r for r in g.results if r.target_round is not None]
        target = _pm(g.stat("target_round"), 1)
        if reached and len(reached) < len(g.results):
            target += f" ({len(reached)}/{len(g.results)})"
        body.append(
            [*(g.setting[k] for k in keys), f"{len(done)}/{len(g.results)}", _pm(g.stat("final_accuracy")), _pm(g.stat("best_accuracy")), target, _pm(g.stat("wall_s"), 1)]
        )
    seeds = next((len(a.values) for a in plan.axes if a.key == SEED), 1)
    note = f"mean ± std over {seeds} seeds per row\n" if seeds > 1 else ""
    return render(header, body) + note
