"""Aggregators: how the cohort's uploads become one update.

- mean: sum_k w_k delta_k / sum_k w_k, streamed chunk by chunk, so a cohort's updates
  are never held at once; under `launch` the partial sums are all-reduced.
- median: the coordinate-wise median of the deltas (Yin et al. 2018), unweighted,
  the mean of the two middle values for an even cohort. It needs every update at
  once: they are gathered (all-gathered under `launch`).
Extras (`Upload.extras`) are always the weighted mean, whatever combines the deltas.
`comm` is the trainer's `fltool.distributed.comm.Comm`: in one process its
collectives do nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fltool.algorithms.api import Aggregate, Upload
from fltool.config.registry import AGGREGATORS
from fltool.config.schema import AggregatorConfig


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


@AGGREGATORS.register("mean", AggregatorConfig)
class MeanAggregator:
    def __init__(self, config: AggregatorConfig) -> None:
        self.sums = WeightedSums()

    def add(self, upload: Upload) -> None:
        self.sums.add({"delta": upload.delta, **{f"extra.{k}": v for k, v in upload.extras.items()}}, upload.weight)

    def reduce(self, comm: Any, also: Sequence[Tensor], clients: int, num_clients: int) -> Aggregate:
        """Sum over ranks (with `also`, in the same collective) and divide."""
        comm.all_reduce_sum([*self.sums.tensors(), *also])
        means = self.sums.means()
        extras = {k.removeprefix("extra."): v for k, v in means.items() if k.startswith("extra.")}
        return Aggregate(delta=means["delta"], extras=extras, clients=clients, num_clients=num_clients)


@AGGREGATORS.register("median", AggregatorConfig)
class MedianAggregator:
    def __init__(self, config: AggregatorConfig) -> None:
        self.deltas: list[list[Tensor]] = []
        self.extras = WeightedSums()

    def add(self, upload: Upload) -> None:
        self.deltas.append(upload.delta)
        self.extras.add(upload.extras, upload.weight)

    def reduce(self, comm: Any, also: Sequence[Tensor], clients: int, num_clients: int) -> Aggregate:
        comm.all_reduce_sum([*self.extras.tensors(), *also])
        stacks = [torch.cat(parts) for parts in zip(*self.deltas, strict=True)]
        gathered = comm.all_gather_rows(stacks)
        return Aggregate(
            delta=[coordinate_median(s) for s in gathered],
            extras=self.extras.means(),
            clients=clients,
            num_clients=num_clients,
        )


def coordinate_median(stacked: Tensor) -> Tensor:
    """The median over dim 0 of every coordinate; for an even count the mean of the two
    middle values (torch.median would return the lower one)."""
    m = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    if m % 2:
        return ordered[m // 2].clone()
    return (ordered[m // 2 - 1] + ordered[m // 2]) / 2
