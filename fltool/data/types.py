"""The tensors a dataset is held as, shared by the built-in loaders (`datasets`) and the
user's loader (`user`): here, so neither imports the other for its types."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TensorSplit:
    x: torch.Tensor  # float32 [N, C, H, W], normalised
    y: torch.Tensor  # int64 [N]
    # int64 [N] on the host: each example's natural client (a writer, a user), for
    # `data.partition: natural`; None where the data has no such owner
    client: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.y.shape[0]

    def to(self, device: torch.device | str) -> TensorSplit:
        return TensorSplit(self.x.to(device), self.y.to(device), self.client)


@dataclass
class Dataset:
    name: str
    train: TensorSplit
    test: TensorSplit
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def to(self, device: torch.device | str) -> Dataset:
        return Dataset(self.name, self.train.to(device), self.test.to(device), self.num_classes)
