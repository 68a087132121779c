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
