"""Shared set-up: device choice, seeded model construction."""

from __future__ import annotations

import torch
from torch import nn

from fltool.config import Config
from fltool.data import Dataset
from fltool.errors import FltoolError
from fltool.models import build_model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FltoolError("device: cuda was asked for but no CUDA device is visible; use device: auto or cpu")
    return torch.device(name)


def seeded_model(cfg: Config, dataset: Dataset, device: torch.device) -> nn.Module:
    """The initial global model: the same weights for the same seed, on any rank."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model.name, dataset.input_shape, dataset.num_classes).to(device)


def has_running_stats(model: nn.Module) -> bool:
    return any(getattr(m, "track_running_stats", False) for m in model.modules())
