"""Checkpoints: on disk a plain dict of tensors and primitives, loadable with
`torch.load(..., weights_only=True)`; in the code a typed `Checkpoint`."""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fltool.config import Config, config_from_dict, config_to_dict
from fltool.engine.atomic import atomic_torch_save
from fltool.errors import FltoolError

FORMAT = "fltool.checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    config: Config  # the config the run was trained with
    round: int  # the last completed round (epoch, for DDP)
    model: dict[str, Tensor]  # the global model's state dict, on the CPU
    metrics: list[dict[str, Any]]  # every metrics row up to `round`
    best_accuracy: float | None
    extra: dict[str, Any] = field(default_factory=dict)  # DDP: optimizer and scheduler state

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "config": config_to_dict(self.config),
            "round": self.round,
            "model": self.model,
            "metrics": self.metrics,
            "best_accuracy": self.best_accuracy,
            "extra": self.extra,
        }


def make_checkpoint(
    cfg: Config,
    model: nn.Module,
    round_: int,
    metrics: list[dict[str, Any]],
    best_accuracy: float | None,
    extra: dict[str, Any] | None = None,
) -> Checkpoint:
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return Checkpoint(cfg, round_, weights, list(metrics), best_accuracy, extra or {})


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> None:
    atomic_torch_save(ckpt.to_dict(), path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise FltoolError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FltoolError(f"{path}: not a readable checkpoint ({reason[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise FltoolError(f"{path}: not an fltool checkpoint (missing format marker '{FORMAT}')")
    if state.get("version") != VERSION:
        raise FltoolError(f"{path}: checkpoint version {state.get('version')} is not supported (expected {VERSION})")
    missing = [k for k in ("config", "round", "model", "metrics", "best_accuracy") if k not in state]
    if missing:
        raise FltoolError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return Checkpoint(
        config=config_from_dict(state["config"], f"{path} (stored config)"),
        round=state["round"],
        model=state["model"],
        metrics=state["metrics"],
        best_accuracy=state["best_accuracy"],
        extra=state.get("extra", {}),
    )
