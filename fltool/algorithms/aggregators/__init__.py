"""Aggregators: how the cohort's uploads become one update, one file each, registered
by name for the config's `aggregator` section.

Streamed ones (`mean`) fold each chunk's uploads into running sums, so a cohort's
updates are never held at once; under `launch` the partial sums are all-reduced.
Gathered ones (`median`, ...) subclass `GatheredAggregator`: every update of the
cohort, as one (clients, parameters) matrix in client-id order (all-gathered under
`launch`), combined on the device by one tensor function.
Extras (`Upload.extras`) are always the weighted mean, whatever combines the deltas.
"""

from fltool.algorithms.aggregators import mean, median
from fltool.algorithms.aggregators.base import GatheredAggregator, WeightedSums, client_weighted_sum
from fltool.algorithms.aggregators.mean import MeanAggregator
from fltool.algorithms.aggregators.median import MedianAggregator, coordinate_median

__all__ = [
    "GatheredAggregator",
    "MeanAggregator",
    "MedianAggregator",
    "WeightedSums",
    "client_weighted_sum",
    "coordinate_median",
    "mean",
    "median",
]
