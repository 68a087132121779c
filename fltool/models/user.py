"""Your model: `model.class_path` names any `nn.Module` class (or a function returning
one), built as `class_path(**model.init_args)`.

A constructor that takes `num_classes` or `input_shape` by name and is not given them
in `init_args` gets the data's, so one class serves several datasets. The built-in names
(`mlp`, `cnn`, ...) are aliases: `class_path: cnn_cifar` is `name: cnn_cifar`.

The model's forward takes a batch of inputs [B, ...] and returns logits [B, classes];
the loss is classification cross-entropy. `check_model_fits` runs it on a batch of two
inputs on the CPU before training, so a wrong constructor or output shape is one line, not a crash in
round 1. For the engines: BatchNorm keeps running statistics that one stacked forward
cannot update per client, so `engine: auto` trains such a model sequentially; use
GroupNorm (no running statistics) to keep the vectorized engine.
"""

from __future__ import annotations

from torch import nn

from fltool.class_path import call, resolve
from fltool.errors import FltoolError

KEY = "model.class_path"


def build_user_model(path: str, init_args: dict, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    fn = resolve(KEY, path)
    model = call(KEY, path, fn, init_args, {"num_classes": num_classes, "input_shape": tuple(input_shape)})
    if not isinstance(model, nn.Module):
        raise FltoolError(f"{KEY}: {path}(**model.init_args) returned a {type(model).__name__}, not a torch nn.Module")
    if not any(True for _ in model.parameters()):
        raise FltoolError(f"{KEY}: {path} has no parameters to train")
    return model
