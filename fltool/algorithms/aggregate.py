"""The server aggregation rule: w <- sum_k n_k/n * w_k, then an optional server step."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fltool.devices import host_to_device


class WeightedSum:
    """Streams sum_k n_k * w_k so that a cohort never needs all client models at once.

    Kept as a sum (not a running mean) so partial sums from several ranks can be
    all-reduced and divided once.
    """

    def __init__(self, like: Sequence[Tensor]) -> None:
        self.sums = [torch.zeros_like(t) for t in like]
        self.total = 0.0

    def add(self, params: Sequence[Tensor], weight: float) -> None:
        torch._foreach_add_(self.sums, list(params), alpha=float(weight))
        self.total += float(weight)

    def add_stacked(self, stacked: Sequence[Tensor], weights: Sequence[float]) -> None:
        """Add sum_k weights[k] * w_k for client-stacked tensors (client k along dim 0)."""
        like = self.sums[0]
        w = host_to_device(torch.tensor([float(v) for v in weights], dtype=like.dtype), like.device)
        for acc, s in zip(self.sums, stacked, strict=True):
            acc.add_(client_weighted_sum(w, s))
        self.total += float(sum(weights))

    def average(self) -> list[Tensor]:
        if self.total <= 0:
            raise ValueError("no client contributed a positive weight")
        return torch._foreach_div(self.sums, self.total)


def client_weighted_sum(weights: Tensor, stacked: Tensor) -> Tensor:
    """sum_k weights[k] * stacked[k] as one matrix-vector product, in whatever memory
    layout the stack has: a batched engine's weight stacks can be per-client transposed,
    and tensordot would first copy them into contiguous order."""
    # visit the per-client dims in memory order so the stack is a dense (M, N) matrix
    order = sorted(range(1, stacked.dim()), key=lambda d: -stacked.stride(d))
    dense = stacked.permute(0, *order)
    if not dense.is_contiguous():
        return torch.tensordot(weights, stacked, dims=1)
    summed = (weights @ dense.reshape(len(weights), -1)).reshape(dense.shape[1:])
    inverse = sorted(range(len(order)), key=lambda i: order[i])
    return summed.permute(*inverse)


def weighted_average(client_params: Sequence[Sequence[Tensor]], weights: Sequence[float]) -> list[Tensor]:
    acc = WeightedSum(client_params[0])
    for params, w in zip(client_params, weights, strict=True):
        acc.add(params, w)
    return acc.average()


def server_update(global_params: Sequence[Tensor], average: Sequence[Tensor], server_lr: float) -> list[Tensor]:
    """w + server_lr * (avg - w); server_lr = 1 is plain FedAvg (returns avg exactly)."""
    if server_lr == 1.0:
        return [a.clone() for a in average]
    delta = torch._foreach_sub(list(average), list(global_params))
    return torch._foreach_add(list(global_params), delta, alpha=server_lr)
