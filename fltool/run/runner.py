"""Entry point from the CLI to the trainers: fresh runs and resumed runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fltool.config import Config, dump_config
from fltool.run.atomic import WriteFailed, atomic_write_text
from fltool.run.checkpoint import Checkpoint, load_checkpoint
from fltool.trainers.federated import train_federated
from fltool.trainers.privacy_budget import budget_for
from fltool.trainers.privacy_budget import describe as describe_budget
from fltool.trainers.progress import Progress, RunSummary
from fltool.run.resume import check_resumable, resume_config
from fltool.run.rundir import (
    CONFIG_FILE,
    RunInterrupted,
    best_checkpoint,
    create_run_dir,
    discard_run_dir,
    last_checkpoint,
    missing_dirs,
    run_dir_base,
    run_lock,
)
from fltool.models.setup import check_model_fits
from fltool.errors import FltoolError
from fltool.ui import PlainReporter


def summary_dict(summary: RunSummary, unit: str = "round") -> dict[str, Any]:
    """The end-of-run summary; `unit` is "round" (federated) or "epoch" (DDP)."""
    out = {
        "run_dir": str(summary.run_dir),
        f"{unit}s": summary.rounds_completed,
        "final_accuracy": summary.final_accuracy,
        "final_test_loss": None if summary.final_loss is None else round(summary.final_loss, 4),
        "best_accuracy": summary.best_accuracy,
        f"target_reached_{unit}": summary.target_round,
        "setup_s": round(summary.setup_s, 3),
        "wall_s": round(summary.wall_s, 3),
    }
    last = summary.metrics[-1] if summary.metrics else {}
    if "epsilon" in last:
        out["epsilon"] = round(last["epsilon"], 4)
        out["dp_delta"] = last["dp_delta"]
    if summary.stopped:
        out["stopped"] = summary.stopped
    return out


def what_to_train(cfg: Config, resume: Checkpoint | None) -> tuple[str, int, int]:
    """(unit, first, total): this process trains rounds (epochs) first..total, none if
    first > total, as the trainers' `Progress` decides."""
    progress = Progress(cfg)
    first = progress.first(resume.round, resume.metrics) if resume else 1
    return progress.unit, first, progress.total


def run(cfg: Config, run_dir: Path, reporter: PlainReporter, resume: Checkpoint | None = None) -> RunSummary:
    unit, first, total = what_to_train(cfg, resume)
    reporter.unit = unit
    try:
        reporter.start(cfg.name, str(run_dir), first, total)
        budget = budget_for(cfg) if cfg.mode == "federated" else None
        if budget is not None:
            reporter.message(describe_budget(cfg, budget))
        if cfg.mode == "ddp":
            from fltool.trainers.ddp import train_ddp

            summary = train_ddp(cfg, run_dir, reporter.update, resume, on_progress=reporter.within)
        else:
            summary = train_federated(cfg, run_dir, reporter.update, resume)
    except KeyboardInterrupt:
        raise RunInterrupted(run_dir) from None
    except WriteFailed as exc:
        if last_checkpoint(run_dir).is_file():
            raise FltoolError(f"{exc.lines[0]}; once fixed, continue with `fltool train --resume {run_dir}`") from None
        raise
    finally:
        reporter.close()
    reporter.finish(summary_dict(summary, reporter.unit))
    return summary


def start_run(cfg: Config, reporter: PlainReporter) -> RunSummary:
    check_model_fits(cfg)
    created = missing_dirs(run_dir_base(cfg), "output.run_dir" if cfg.output.run_dir else "output.dir")
    run_dir = create_run_dir(cfg)
    if not cfg.output.run_dir:  # a timestamped run directory is always new
        created.insert(0, run_dir)
    try:
        with run_lock(run_dir):
            return run(cfg, run_dir, reporter)
    except (Exception, KeyboardInterrupt):
        # Failed or interrupted before a single round was logged (bad data root, a crash in
        # set-up, Ctrl-C in round 1): leave no empty run behind, which would also block a
        # rerun with the same run_dir, and which nothing could resume.
        if not (run_dir / "metrics.jsonl").exists() and not last_checkpoint(run_dir).exists():
            discard_run_dir(run_dir, created)
        raise


def _start_again(cfg: Config, run_dir: Path, reporter: PlainReporter) -> RunSummary:
    """A run killed before its first checkpoint (a SIGKILL, a power cut: no cleanup ran)
    leaves its directory and config.yaml and nothing to continue: `--resume` starts it
    again there, from round 1, dropping any metrics rows no checkpoint carries."""
    for stale in ("metrics.jsonl", "metrics.csv", best_checkpoint(run_dir)):
        (run_dir / stale).unlink(missing_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, dump_config(cfg))
    reporter.message(f"{run_dir}: no checkpoint yet; starting the run again from round 1")
    return run(cfg, run_dir, reporter)


def resume_run(run_dir: Path, overrides: list[str], reporter: PlainReporter) -> RunSummary:
    cfg = resume_config(run_dir, overrides)  # (first: it says whether run_dir is a run at all)
    with run_lock(run_dir):
        return _resume_locked(cfg, run_dir, overrides, reporter)


def _resume_locked(cfg: Config, run_dir: Path, overrides: list[str], reporter: PlainReporter) -> RunSummary:
    ckpt_path = last_checkpoint(run_dir)
    if not ckpt_path.is_file():
        return _start_again(cfg, run_dir, reporter)
    state = load_checkpoint(ckpt_path)
    check_resumable(state, cfg, ckpt_path, 1, "fltool train")
    if overrides:  # only now, once the resume is known to be valid: the run's config says what it does
        atomic_write_text(run_dir / CONFIG_FILE, dump_config(cfg))
    return run(cfg, run_dir, reporter, resume=state)
