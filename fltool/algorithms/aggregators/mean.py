"""mean: sum_k w_k delta_k / sum_k w_k (FedAvg's n_k-weighted mean, or the algorithm's
weights), streamed chunk by chunk and all-reduced under `launch`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from fltool.algorithms.aggregators.base import WeightedSums
from fltool.algorithms.api import Aggregate, Upload
from fltool.config.registry import AGGREGATORS
from fltool.config.schema import AggregatorConfig


@AGGREGATORS.register("mean", AggregatorConfig)
class MeanAggregator:
    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.sums = WeightedSums()

    def add(self, ids: Tensor, upload: Upload) -> None:
        self.sums.add({"delta": upload.delta, **{f"extra.{k}": v for k, v in upload.extras.items()}}, upload.weight)

    def reduce(self, comm: Any, also: Sequence[Tensor], clients: int, num_clients: int) -> Aggregate:
        """Sum over ranks (with `also`, in the same collective) and divide."""
        comm.all_reduce_sum([*self.sums.tensors(), *also])
        means = self.sums.means()
        extras = {k.removeprefix("extra."): v for k, v in means.items() if k.startswith("extra.")}
        return Aggregate(delta=means["delta"], extras=extras, clients=clients, num_clients=num_clients)
