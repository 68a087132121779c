"""Shared set-up: device choice, seeded model construction."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from fltool.config import Config
from fltool.data import Dataset, data_shape
from fltool.errors import FltoolError
from fltool.models import build_model

LARGEST_SIDE_TRIED = 256  # when telling the smallest input a model takes


def seeded_model(cfg: Config, dataset: Dataset, device: torch.device) -> nn.Module:
    """The initial global model: the same weights for the same seed, on any rank."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model.name, dataset.input_shape, dataset.num_classes).to(device)


def check_model_fits(cfg: Config) -> None:
    """A model that cannot take the data's inputs fails here, in one line and before any
    run directory or worker exists, not as a convolution error in the first round."""
    shape, classes = data_shape(cfg.data)
    if _takes(cfg.model.name, shape, classes):
        return
    side = next((s for s in range(1, LARGEST_SIDE_TRIED + 1) if _takes(cfg.model.name, (shape[0], s, s), classes)), None)
    need = f"inputs of at least {side}x{side}" if side else "larger inputs"
    raise FltoolError(f"model.name: {cfg.model.name} needs {need}; data.synthetic.shape is {list(shape)}")


def _takes(name: str, shape: tuple[int, ...], classes: int) -> bool:
    """Whether model `name` runs on one input of `shape`: a forward pass on the meta
    device, which checks every shape and computes nothing."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a Linear of zero inputs warns when built
        model = build_model(name, shape, classes)
        try:
            model(torch.empty(1, *shape))
        except RuntimeError:
            return False
    return True


def has_running_stats(model: nn.Module) -> bool:
    return any(getattr(m, "track_running_stats", False) for m in model.modules())
