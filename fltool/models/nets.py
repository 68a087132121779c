"""The networks of McMahan et al. 2017, the seed's DDP example, and pfl-research's CIFAR CNN."""

from __future__ import annotations

import math

from torch import nn


def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """McMahan's 2NN: two hidden layers of 200 ReLU units (199,210 parameters on MNIST)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 200),
        nn.ReLU(),
        nn.Linear(200, 200),
        nn.ReLU(),
        nn.Linear(200, num_classes),
    )


def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """McMahan's CNN: 5x5 conv 32, pool, 5x5 conv 64, pool, fc 512, fc (1,663,370 on MNIST)."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (h // 4) * (w // 4), 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def cnn_small(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The seed article's DDP example: 3x3 conv 32, pool, 3x3 conv 64, pool, fc."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (h // 4) * (w // 4), num_classes),
    )


def cnn_cifar(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """pfl-research's CIFAR-10 benchmark CNN (1,626,442 parameters on 3x32x32)."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(64 * ((h - 4) // 2) * ((w - 4) // 2), 128),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(128, num_classes),
    )


class Residual(nn.Module):
    """body(x) + shortcut(x), the shortcut an identity when empty. Both are plain
    Sequentials of conv-stage layers, so the vectorized engine's hand-batched forward
    runs them in its grouped layout (see `batched_nets`)."""

    def __init__(self, body: nn.Sequential, shortcut: nn.Sequential | None = None) -> None:
        super().__init__()
        self.body = body  # registered first: the parameter order the batched forward reads
        self.shortcut = shortcut if shortcut is not None else nn.Sequential()

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels // 4) or 1, channels)


def _block(c_in: int, c_out: int, stride: int) -> Residual:
    body = nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        _gn(c_out),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        _gn(c_out),
    )
    shortcut = None
    if stride != 1 or c_in != c_out:
        shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _gn(c_out))
    return Residual(body, shortcut)


def resnet8_gn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ResNet-8 for CIFAR (He et al. 2016's n=1: a conv, three residual blocks of 16, 32
    and 64 channels, a linear head; 78,042 parameters at 10 classes) with GroupNorm for
    BatchNorm: no running statistics, so every client of a stacked forward normalises by
    its own examples, and the vectorized engine trains it (Hsieh et al. 2020 on GroupNorm
    in federated learning)."""
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1, bias=False),
        _gn(16),
        nn.ReLU(),
        _block(16, 16, 1),
        nn.ReLU(),
        _block(16, 32, 2),
        nn.ReLU(),
        _block(32, 64, 2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, num_classes),
    )
