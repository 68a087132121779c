"""Checkpoints: a plain dict of tensors and primitives, loadable with weights_only=True."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fltool.config import Config, config_from_dict, config_to_dict
from fltool.engine.atomic import atomic_torch_save
from fltool.errors import FltoolError

FORMAT = "fltool.checkpoint"
VERSION = 1


def make_checkpoint(
    cfg: Config,
    model: nn.Module,
    round_: int,
    metrics: list[dict[str, Any]],
    best_accuracy: float | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": config_to_dict(cfg),
        "round": round_,
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "metrics": metrics,
        "best_accuracy": best_accuracy,
        "extra": extra or {},
    }


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    atomic_torch_save(state, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
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
    return state


def checkpoint_config(state: dict[str, Any], path: str | Path) -> Config:
    try:
        return config_from_dict(state["config"], f"{path} (stored config)")
    except KeyError:
        raise FltoolError(f"{path}: checkpoint holds no config") from None
