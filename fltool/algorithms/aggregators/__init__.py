"""Aggregators: how the cohort's uploads become one update, one file each, registered
by name for the config's `aggregator` section.

Streamed ones (`mean`) fold each chunk's uploads into running sums, so a cohort's
updates are never held at once; under `launch` the partial sums are all-reduced.
Gathered ones (`median`, `trimmed_mean`, `krum`, `multikrum`, `bulyan`) subclass
`GatheredAggregator`: every update of the cohort, as one (clients, parameters) matrix
in client-id order (all-gathered under `launch`), combined on the device by one tensor
function. `norm_bounded` clips each client's update as its chunk streams in, then
averages like `mean`. The robust rules are described in docs/robustness.md.
Extras (`Upload.extras`) are always the weighted mean, whatever combines the deltas.
"""

# in registration order, which is the order error messages list the names in
from fltool.algorithms.aggregators import mean, median, trimmed_mean, krum, bulyan, norm_bounded  # noqa: I001
from fltool.algorithms.aggregators.base import GatheredAggregator, WeightedSums, client_weighted_sum
from fltool.algorithms.aggregators.bulyan import BulyanAggregator, BulyanConfig
from fltool.algorithms.aggregators.krum import KrumAggregator, KrumConfig, MultiKrumAggregator, MultiKrumConfig
from fltool.algorithms.aggregators.mean import MeanAggregator
from fltool.algorithms.aggregators.median import MedianAggregator, coordinate_median
from fltool.algorithms.aggregators.norm_bounded import NormBoundedAggregator, NormBoundedConfig
from fltool.algorithms.aggregators.trimmed_mean import TrimmedMeanAggregator, TrimmedMeanConfig

__all__ = [
    "BulyanAggregator",
    "BulyanConfig",
    "GatheredAggregator",
    "KrumAggregator",
    "KrumConfig",
    "MeanAggregator",
    "MedianAggregator",
    "MultiKrumAggregator",
    "MultiKrumConfig",
    "NormBoundedAggregator",
    "NormBoundedConfig",
    "TrimmedMeanAggregator",
    "TrimmedMeanConfig",
    "WeightedSums",
    "bulyan",
    "client_weighted_sum",
    "coordinate_median",
    "krum",
    "mean",
    "median",
    "norm_bounded",
    "trimmed_mean",
]
