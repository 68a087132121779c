"""Models by config name. Each builder takes the input shape [C, H, W] and class count."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fltool.models.nets import cnn, cnn_cifar, cnn_small, mlp

MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "cnn_small": cnn_small,
    "cnn_cifar": cnn_cifar,
}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return MODELS[name](tuple(input_shape), num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "build_model", "count_parameters"]
