"""Resuming a run: which settings may change, checked before anything is written.

A resumed run must continue the experiment its checkpoints come from. It may run
longer, evaluate and checkpoint differently, and compute elsewhere or faster; a new
seed, mode, model, data split or hyperparameter would make it another experiment (or
not load at all), so those are refused, and the run directory is left as it was.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fltool.config import Config, load_config
from fltool.config.load import read_yaml_mapping
from fltool.run.checkpoint import Checkpoint, check_weights_fit, not_a_file
from fltool.trainers.federated import check_algorithm_state
from fltool.run.rundir import CONFIG_FILE, last_checkpoint
from fltool.errors import FltoolError

# dotted keys, or prefixes ending in "."
RESUME_MAY_CHANGE = (
    "federated.rounds",
    "ddp.epochs",
    "eval.",
    "output.checkpoint_every",
    "output.tensorboard",
    "device",
    "data.root",
    "data.cache",
    "federated.engine",
    "federated.max_parallel_clients",
    "federated.cuda_graphs",
    "ddp.backend",
    "ddp.timeout_s",
    "ddp.compile",
)

# Where the run lives. A moved or copied run directory's config names another place
# than its checkpoints do, so they may differ from the checkpoint's; but a resume goes
# on in its own directory, and an override would only make config.yaml wrong about it.
RUN_LOCATION = ("name", "output.dir", "output.run_dir")


def resume_config(run_dir: Path, overrides: list[str]) -> Config:
    """The run's own config.yaml with `overrides` applied, refused (with every offending
    key named) when an override is one a resumed run may not change."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FltoolError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    if not read_yaml_mapping(path):  # load_config would take it for the defaults
        raise FltoolError(f"{path}: is empty; a run's {CONFIG_FILE} holds the config it was trained with")
    ckpt = last_checkpoint(run_dir)
    if ckpt.exists() and not ckpt.is_file():
        raise FltoolError(not_a_file(ckpt))
    cfg = load_config(path, overrides, stored=True)
    problems = [
        f"command line: {key}: a resumed run goes on in {run_dir} (the run has {old!r}, got {new!r}); "
        "move or copy the directory to put it elsewhere"
        if key in RUN_LOCATION
        else f"command line: {key}: a resumed run cannot change it (the run has {old!r}, got {new!r}); "
        f"it may change {allowed_text()}"
        for key, old, new in fixed_changes(load_config(path, stored=True), cfg, RESUME_MAY_CHANGE)
    ]
    if problems:
        raise FltoolError(*problems)
    return cfg


def check_resumable(ckpt: Checkpoint, cfg: Config, path: Path, world_size: int, how: str) -> None:
    """A checkpoint resumes only the experiment it was trained in (one copied from
    another run would fail to load, or silently continue the wrong one), and a DDP run
    only on as many processes as it trained on: its global batch, and so its steps per
    epoch and learning-rate schedule, are per-rank batch x world size. (A federated
    run's result does not depend on the world size.)"""
    problems = [
        f"{path}: was trained with {key}={old!r}, but the run's config has {new!r}"
        for key, old, new in fixed_changes(ckpt.config, cfg, RESUME_MAY_CHANGE + RUN_LOCATION)
    ]
    if problems:
        raise FltoolError(*problems)
    key, length, unit = (
        ("ddp.epochs", cfg.ddp.epochs, "epochs") if cfg.mode == "ddp" else ("federated.rounds", cfg.federated.rounds, "rounds")
    )
    if length < ckpt.round:
        raise FltoolError(
            f"{path}: the run has trained {ckpt.round} {unit}, more than {key}={length}; "
            f"resume with {key} of at least {ckpt.round}"
        )
    check_weights_fit(ckpt, path, cfg)
    if cfg.mode != "ddp":
        check_algorithm_state(cfg, ckpt.extra.get("algorithm"), str(path))
    if cfg.mode == "ddp":
        lacking = [k for k in ("optimizer", "scheduler") if not isinstance(ckpt.extra.get(k), dict)]
        if lacking:
            raise FltoolError(f"{path}: a DDP checkpoint needs the optimizer and scheduler state in 'extra'; it lacks {' and '.join(lacking)}")
    trained = ckpt.extra.get("world_size")
    if ckpt.config.mode == "ddp" and trained is not None and trained != world_size:
        raise FltoolError(
            f"{path}: this DDP run trained on {trained} process(es) and {how} would resume it on {world_size}; "
            f"resume with fltool launch --nproc/--nnodes giving {trained} processes"
            + (" (or fltool train --resume for 1)" if trained == 1 else "")
        )


def fixed_changes(old: Config, new: Config, allowed: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every setting that differs although it is
    not `allowed` (dotted keys, or prefixes ending in ".") to."""
    a, b = _flatten(dataclasses.asdict(old)), _flatten(dataclasses.asdict(new))
    # another algorithm has other keys: one side's missing value shows as None
    keys = [*a, *(k for k in b if k not in a)]
    changed = [k for k in keys if (k in a) != (k in b) or a[k] != b[k]]
    return [(k, a.get(k), b.get(k)) for k in changed if not _matches(k, allowed)]


def _matches(key: str, allowed: tuple[str, ...]) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in allowed)


def allowed_text() -> str:
    return ", ".join(f"{k}*" if k.endswith(".") else k for k in RESUME_MAY_CHANGE)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
