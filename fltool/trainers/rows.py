"""A federated round's metrics row: who took part, its loss and traffic, and what the
run's faults, SecAgg and DP did (see docs/outputs.md for the columns)."""

from __future__ import annotations

from typing import Any

from fltool.config import Config
from fltool.trainers.availability import RoundPlan
from fltool.trainers.privacy_budget import Budget


def round_row(cfg: Config, round_: int, plan: RoundPlan, train_loss: float | None, bytes_up: float, model_bytes: int) -> dict[str, Any]:
    """The row's columns in their order; the evaluation (test_*) and the times (wall_s,
    elapsed_s) are filled in by the trainer once known."""
    return {
        "round": round_,
        "clients": len(plan.sampled),
        "client_ids": plan.sampled,
        **plan_columns(cfg, plan),
        "train_loss": train_loss,
        "test_loss": None,
        "test_accuracy": None,
        "wall_s": None,
        "elapsed_s": None,
        "bytes_up": round(bytes_up),
        "bytes_down": len(plan.sampled) * model_bytes,
    }


def plan_columns(cfg: Config, plan: RoundPlan) -> dict[str, Any]:
    """The metrics columns of the faults this run simulates (none without faults)."""
    faults = cfg.clients
    row: dict[str, Any] = {}
    if faults.dropout > 0 or faults.stragglers > 0:
        row.update(returned=len(plan.returned), attempts=plan.attempts, skipped=plan.skipped)
    if faults.dropout > 0:
        row["dropped_ids"] = plan.dropped
    if faults.stragglers > 0:
        row["straggler_ids"] = sorted(plan.stragglers)
    if cfg.attack.name != "none":
        row["malicious_ids"] = plan.malicious
    return row


def server_columns(cfg: Config, round_: int, state: Any, budget: Budget | None) -> dict[str, Any]:
    """SecAgg's metrics of the round (read once from the `FederatedState`) and the
    privacy spent after it."""
    row: dict[str, Any] = {}
    if cfg.secagg.enabled:
        row.update(state.__dict__.pop("secagg_metrics", {}))
    if budget is not None:
        row.update(epsilon=budget.epsilon(round_), dp_delta=budget.delta, dp_noise_multiplier=budget.noise_multiplier, dp_sampling=cfg.federated.sampling)
        if cfg.dp.adaptive_clipping:
            row["dp_clip_norm"] = state.privacy.clip_norm.item()  # (the norm the next round clips to)
    return row
