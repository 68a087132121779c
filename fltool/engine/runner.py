"""Entry point from the CLI to the trainers: fresh runs and resumed runs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from fltool.config import Config, dump_config, load_config
from fltool.engine.atomic import atomic_write_text
from fltool.engine.checkpoint import load_checkpoint
from fltool.engine.federated import RunSummary, train_federated
from fltool.engine.rundir import CONFIG_FILE, RunInterrupted, create_run_dir, last_checkpoint
from fltool.errors import FltoolError
from fltool.ui import PlainReporter


def summary_dict(summary: RunSummary) -> dict[str, Any]:
    return {
        "run_dir": str(summary.run_dir),
        "rounds": summary.rounds_completed,
        "final_accuracy": summary.final_accuracy,
        "final_test_loss": None if summary.final_loss is None else round(summary.final_loss, 4),
        "best_accuracy": summary.best_accuracy,
        "target_reached_round": summary.target_round,
        "setup_s": round(summary.setup_s, 3),
        "wall_s": round(summary.wall_s, 3),
    }


def run(cfg: Config, run_dir: Path, reporter: PlainReporter, resume: dict[str, Any] | None = None) -> RunSummary:
    first = resume["round"] + 1 if resume else 1
    try:
        if cfg.mode == "ddp":
            from fltool.distributed.trainer import train_ddp

            reporter.unit = "epoch"
            reporter.start(cfg.name, str(run_dir), first, cfg.ddp.epochs)
            summary = train_ddp(cfg, run_dir, reporter.update, resume)
        else:
            reporter.start(cfg.name, str(run_dir), first, cfg.federated.rounds)
            summary = train_federated(cfg, run_dir, reporter.update, resume)
    except KeyboardInterrupt:
        raise RunInterrupted(run_dir) from None
    reporter.finish(summary_dict(summary))
    return summary


def start_run(cfg: Config, reporter: PlainReporter) -> RunSummary:
    run_dir = create_run_dir(cfg)
    try:
        return run(cfg, run_dir, reporter)
    except FltoolError:
        # Failed before a single round was logged (bad data root, ...): leave no empty run behind.
        if not (run_dir / "metrics.jsonl").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def resume_run(run_dir: Path, overrides: list[str], reporter: PlainReporter) -> RunSummary:
    if not (run_dir / CONFIG_FILE).is_file():
        raise FltoolError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    cfg = load_config(run_dir / CONFIG_FILE, overrides)
    if overrides:  # the run directory's config must describe what the run actually did
        atomic_write_text(run_dir / CONFIG_FILE, dump_config(cfg))
    ckpt_path = last_checkpoint(run_dir)
    if not ckpt_path.is_file():
        raise FltoolError(f"{run_dir}: no checkpoint to resume from ({ckpt_path} is missing)")
    state = load_checkpoint(ckpt_path)
    return run(cfg, run_dir, reporter, resume=state)
