"""What aggregators share: weighted sums streamed over chunks, and the base of the
aggregators that need every update at once.

`comm` is the trainer's `fltool.distributed.comm.Comm`: in one process its collectives
do nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fltool.algorithms.api import Aggregate, Upload
from fltool.config.schema import AggregatorConfig
from fltool.errors import FltoolError


def client_weighted_sum(weights: Tensor, stacked: Tensor) -> Tensor:
    """sum_k weights[k] * stacked[k] as one matrix-vector product, in whatever memory
    layout the stack has: a batched engine's weight stacks can be per-client transposed,
    and tensordot would first copy them into contiguous order."""
    if stacked.dim() == 1 or stacked.shape[0] == 0:  # (an empty upload: a rank without clients)
        return torch.tensordot(weights, stacked, dims=1)
    # visit the per-client dims in memory order so the stack is a dense (M, N) matrix
    order = sorted(range(1, stacked.dim()), key=lambda d: -stacked.stride(d))
    dense = stacked.permute(0, *order)
    if not dense.is_contiguous():
        return torch.tensordot(weights, stacked, dims=1)
    summed = (weights @ dense.reshape(len(weights), -1)).reshape(dense.shape[1:])
    inverse = sorted(range(len(order)), key=lambda i: order[i])
    return summed.permute(*inverse)


class WeightedSums:
    """Streams sum_k w_k x_k for named stacks, and sum_k w_k."""

    def __init__(self) -> None:
        self.sums: dict[str, list[Tensor]] = {}
        self.total: Tensor | None = None

    def add(self, named: dict[str, list[Tensor]], weight: Tensor) -> None:
        for name, stacked in named.items():
            summed = [client_weighted_sum(weight.to(s.dtype), s) for s in stacked]
            if name in self.sums:
                torch._foreach_add_(self.sums[name], summed)
            else:
                self.sums[name] = summed
        total = weight.sum()
        self.total = total if self.total is None else self.total + total

    def tensors(self) -> list[Tensor]:
        """Everything to all-reduce, in a fixed order (names sorted)."""
        return [t for name in sorted(self.sums) for t in self.sums[name]] + [self.total]

    def means(self) -> dict[str, list[Tensor]]:
        return {name: torch._foreach_div(sums, self.total) for name, sums in self.sums.items()}


class GatheredAggregator:
    """The base of an aggregator that needs the whole cohort's updates at once.

    Each chunk's deltas are flattened to (M, P) rows; `reduce` gathers every rank's rows
    and orders them by client id, so the result depends neither on how the cohort was
    chunked nor on how it was split over ranks, then calls `combine` once. A subclass
    writes only `combine` (and its config class, with any check on the cohort size)."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.ids: list[Tensor] = []
        self.weights: list[Tensor] = []
        self.rows: list[Tensor] = []
        self.shapes: list[torch.Size] = []
        self.extras = WeightedSums()

    def add(self, ids: Tensor, upload: Upload) -> None:
        self.shapes = [d.shape[1:] for d in upload.delta]
        self.ids.append(ids)
        self.weights.append(upload.weight)
        self.rows.append(torch.cat([d.reshape(d.shape[0], s.numel()) for d, s in zip(upload.delta, self.shapes)], dim=1))
        self.extras.add(upload.extras, upload.weight)

    def combine(self, updates: Tensor, weights: Tensor) -> Tensor:
        """(m, P) updates of m clients (ascending id) and their (m,) weights -> (P,)."""
        raise NotImplementedError

    def reduce(self, comm: Any, also: Sequence[Tensor], clients: int, num_clients: int) -> Aggregate:
        comm.all_reduce_sum([*self.extras.tensors(), *also])
        ids, weights, rows = comm.all_gather_rows([torch.cat(self.ids), torch.cat(self.weights), torch.cat(self.rows)])
        found = self.config.problem(rows.shape[0])  # a round can have fewer updates than sampled
        if found is not None:
            raise FltoolError(f"aggregator.{found[0]}: {found[1]}")
        if len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all()):  # usually sorted already: skip a copy of all rows
            order = ids.argsort()
            rows, weights = rows[order], weights[order]
        combined = self.combine(rows, weights)
        delta = [part.view(shape) for part, shape in zip(combined.split([s.numel() for s in self.shapes]), self.shapes, strict=True)]
        return Aggregate(delta=delta, extras=self.extras.means(), clients=clients, num_clients=num_clients)
