"""Models by config name. Each builder takes the input shape [C, H, W] and class count."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fltool.config.schema import ModelConfig
from fltool.models.nets import cnn, cnn_cifar, cnn_small, mlp, resnet8_gn

MODELS: dict[str, Callable[[tuple[int, ...], int], nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "cnn_small": cnn_small,
    "cnn_cifar": cnn_cifar,
    "resnet8_gn": resnet8_gn,
}


def build_model(spec: str | ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A built-in model by name, or the config's model: `class_path` (a built-in name or
    your nn.Module, see `fltool.models.user`) where set, else `name`."""
    if isinstance(spec, str):
        return MODELS[spec](tuple(input_shape), num_classes)
    if spec.class_path and spec.class_path not in MODELS:
        from fltool.models.user import build_user_model

        return build_user_model(spec.class_path, spec.init_args, tuple(input_shape), num_classes)
    return MODELS[spec.class_path or spec.name](tuple(input_shape), num_classes)


def model_label(spec: ModelConfig) -> str:
    """What a message calls the configured model."""
    return spec.class_path or spec.name


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "build_model", "count_parameters", "model_label"]
