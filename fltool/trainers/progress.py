"""What both trainers decide the same way: whether a round (epoch) met the target,
and the run's summary from its metric rows."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunSummary:
    run_dir: Path
    rounds_completed: int
    final_accuracy: float | None
    final_loss: float | None
    best_accuracy: float | None
    target_round: int | None
    wall_s: float  # training only: setup (data, model) is in setup_s
    metrics: list[dict[str, Any]] = field(default_factory=list)
    setup_s: float = 0.0



def target_reached_at(rows: list[dict[str, Any]], unit: str, target: float | None) -> int | None:
    """The first round (epoch) of `rows` whose test accuracy met `target`."""
    if target is None:
        return None
    return next((r[unit] for r in rows if r["test_accuracy"] is not None and r["test_accuracy"] >= target), None)


def summarize(
    run_dir: Path,
    rows: list[dict[str, Any]],
    unit: str,
    best: float | None,
    target: float | None,
    t_setup: float,
    t0: float,
) -> RunSummary:
    """The run's summary from its metric rows (all of them, a resumed run's earlier ones
    too); shared by the federated and DDP trainers."""
    evaluated = [row for row in rows if row["test_accuracy"] is not None]
    return RunSummary(
        run_dir=run_dir,
        rounds_completed=rows[-1][unit] if rows else 0,
        final_accuracy=evaluated[-1]["test_accuracy"] if evaluated else None,
        final_loss=evaluated[-1]["test_loss"] if evaluated else None,
        best_accuracy=best,
        target_round=target_reached_at(rows, unit, target),
        wall_s=time.perf_counter() - t0,
        metrics=rows,
        setup_s=t0 - t_setup,
    )
