"""What both trainers decide the same way, in one place: where a run starts, which
rounds (epochs) it evaluates, whether one improved on the best or met the target,
which checkpoints it writes, whether the model diverged, and the run's summary from
its metric rows."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fltool.config import Config


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
    stopped: str | None = None  # why the run ended before its last round, other than its target


@dataclass(frozen=True)
class Decision:
    save_last: bool  # the run's last.pt: due by output.checkpoint_every, final, or at the target
    save_best: bool  # best.pt: the accuracy improved
    stop: bool  # the target accuracy was met, or the run stops after this round (it diverged)


class Progress:
    """A run's position in rounds (federated) or epochs (DDP), and its best accuracy."""

    def __init__(self, cfg: Config, best: float | None = None) -> None:
        self.unit, self.total = ("epoch", cfg.ddp.epochs) if cfg.mode == "ddp" else ("round", cfg.federated.rounds)
        self.target = cfg.eval.target_accuracy
        self.eval_every = cfg.eval.every
        self.checkpoint_every = cfg.output.checkpoint_every
        self.best = best

    def first(self, last_done: int, rows: list[dict[str, Any]]) -> int:
        """The first round to train after `last_done`; past the end if the run already
        met its target (a resume of it trains nothing)."""
        if target_reached_at(rows, self.unit, self.target) is not None:
            return self.total + 1
        return last_done + 1

    def evaluates(self, index: int, last: bool = False) -> bool:
        """Every eval.every-th round (epoch), and the last: the planned one, or `last`,
        one the run stops after (a diverged model's)."""
        return index % self.eval_every == 0 or index == self.total or last

    def decide(self, index: int, accuracy: float | None, last: bool = False) -> Decision:
        """With `last`, the run stops after `index` (it diverged): checkpointed as its
        final round, so that a resume starts from where it stopped."""
        reached = self.target is not None and accuracy is not None and accuracy >= self.target
        improved = accuracy is not None and (self.best is None or accuracy > self.best)
        if improved:
            self.best = accuracy
        due = index % self.checkpoint_every == 0 or index == self.total or reached or last
        return Decision(save_last=due, save_best=improved, stop=reached or last)


def all_finite(params: Sequence[Tensor]) -> Tensor:
    """A bool scalar on the parameters' device, True when none holds a NaN or an inf;
    no host sync (the trainers read it with the round's or epoch's loss)."""
    return torch.stack([p.detach().isfinite().all() for p in params]).all()


def read_scalars(*scalars: Tensor) -> list[float]:
    """Device scalars on the host in one sync, as float64 (float32, float64 and bool
    widen exactly: each value is the one `.item()` reads)."""
    return torch.stack([t.to(torch.float64) for t in scalars]).tolist()


def diverged(unit: str, index: int) -> str:
    """The stop reason of a run whose model went NaN or inf after round (epoch) `index`."""
    model = "global model" if unit == "round" else "model"
    return f"diverged: the {model} has non-finite parameters after {unit} {index}"


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
