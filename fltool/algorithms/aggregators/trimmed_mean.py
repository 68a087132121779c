"""trimmed_mean: the coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", Definition 2): per coordinate,
drop the b = floor(beta * m) largest and b smallest of the m values and average the
other m - 2b, unweighted. beta = 0 is the plain (unweighted) mean.

Robust while fewer than b clients are Byzantine; costs one sort of the (m, P) matrix
along the clients (`order.reduce_sorted`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

from torch import Tensor

from fltool.algorithms.aggregators.base import GatheredAggregator
from fltool.algorithms.aggregators.order import reduce_sorted
from fltool.config.registry import AGGREGATORS
from fltool.config.schema import AggregatorConfig, _check


def trimmed_count(beta: float, m: int) -> int:
    """floor(beta * m), with beta read as the decimal it was written as: 0.29 * 100 is
    28.999999999999996 in floats, which would trim one value fewer than written."""
    return math.floor(Fraction(repr(beta)) * m)


def coordinate_trimmed_mean(stacked: Tensor, b: int) -> Tensor:
    """The mean over dim 0 of every coordinate without its b largest and b smallest
    values (ties are trimmed like any other value: only their count matters)."""
    m = stacked.shape[0]
    if b == 0:
        return stacked.mean(dim=0)
    return reduce_sorted(stacked, lambda ordered: ordered[b : m - b].mean(dim=0))


@dataclass
class TrimmedMeanConfig(AggregatorConfig):
    name: str = "trimmed_mean"
    # fraction trimmed at each end, per coordinate; below 1/2 so something is left
    beta: float = field(default=0.1, metadata=_check(lambda v: 0 <= v < 0.5, "in [0, 0.5)"))

    def problem(self, cohort: int) -> tuple[str, str] | None:
        # unreachable for beta in [0, 0.5) (2 floor(beta n) <= 2 beta n < n); kept for
        # configs built in code, which skip the field checks
        b = trimmed_count(self.beta, cohort)
        if 2 * b >= cohort:
            return "beta", f"trims {b} values at each end, all of a cohort of {cohort} (2 * floor(beta * n) >= n)"
        return None


@AGGREGATORS.register("trimmed_mean", TrimmedMeanConfig)
class TrimmedMeanAggregator(GatheredAggregator):
    config: TrimmedMeanConfig

    def combine(self, updates: Tensor, weights: Tensor) -> Tensor:
        return coordinate_trimmed_mean(updates, trimmed_count(self.config.beta, updates.shape[0]))
