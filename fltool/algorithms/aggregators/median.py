"""median: the coordinate-wise median of the cohort's updates (Yin et al. 2018),
unweighted; for an even cohort the mean of the two middle values."""

from __future__ import annotations

from torch import Tensor

from fltool.algorithms.aggregators.base import GatheredAggregator
from fltool.algorithms.aggregators.order import reduce_sorted
from fltool.config.registry import AGGREGATORS
from fltool.config.schema import AggregatorConfig


def coordinate_median(stacked: Tensor) -> Tensor:
    """The median over dim 0 of every coordinate; for an even count the mean of the two
    middle values (torch.median would return the lower one)."""
    return reduce_sorted(stacked, middle_of_sorted)


def middle_of_sorted(ordered: Tensor) -> Tensor:
    """The median over dim 0 of a stack already sorted along it."""
    m = ordered.shape[0]
    if m % 2:
        return ordered[m // 2].clone()
    return (ordered[m // 2 - 1] + ordered[m // 2]) / 2


@AGGREGATORS.register("median", AggregatorConfig)
class MedianAggregator(GatheredAggregator):
    def combine(self, updates: Tensor, weights: Tensor) -> Tensor:
        return coordinate_median(updates)
