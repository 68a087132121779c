"""bulyan (El Mhamdi et al. 2018, "The Hidden Vulnerability of Distributed Learning in
Byzantium"), over Krum, for n >= 4f + 3 updates. The variant implemented:

1. Selection: theta = n - 2f updates, one at a time: Krum on the remaining set R (each
   score the sum of squared L2 distances to the max(1, |R| - f - 2) nearest others in R;
   the lowest score wins, ties to the lowest client id) moves its winner from R to the
   selection. The distances are computed once, over all n updates. (The paper's
   |R| - f - 2 is 0 at the last step when f = 1, since |R| = 2f + 1 there, which would
   make every score 0 and pick the lowest id blindly; one neighbour is kept instead.)
2. Aggregation, per coordinate: the beta = theta - 2f values of the selection closest
   to the selection's coordinate-wise median (for an even theta the mean of the two
   middle values), averaged; a tie in distance keeps the smaller value.

Unweighted. Cost: Krum's (n, n) distance matrix over all P parameters once, theta
selection steps on that (n, n) matrix, and one sort of the (theta, P) selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fltool.algorithms.aggregators.base import GatheredAggregator
from fltool.algorithms.aggregators.krum import KrumConfig, krum_scores, pairwise_sq_distances
from fltool.algorithms.aggregators.median import middle_of_sorted
from fltool.algorithms.aggregators.order import reduce_sorted
from fltool.config.registry import AGGREGATORS


def bulyan_select(updates: Tensor, f: int) -> Tensor:
    """Indices (ascending) of the theta = n - 2f updates recursive Krum selects."""
    n = updates.shape[0]
    dist = pairwise_sq_distances(updates)
    remaining = torch.arange(n, device=updates.device)
    chosen = []
    for _ in range(n - 2 * f):  # selection steps; each is tensor ops on the (|R|, |R|) block
        if len(remaining) == 1:
            winner = 0
        else:
            sub = dist[remaining][:, remaining]
            neighbours = min(max(len(remaining) - f - 2, 1), len(remaining) - 1)
            scores = krum_scores(sub, neighbours).nan_to_num(nan=torch.inf)  # a NaN update never wins
            winner = int(scores.argmin())  # the first minimum: the lowest client id
        chosen.append(remaining[winner])
        remaining = torch.cat([remaining[:winner], remaining[winner + 1 :]])
    return torch.stack(chosen).sort().values


def closest_to_median_mean(updates: Tensor, beta: int, rows: Tensor | None = None) -> Tensor:
    """Per coordinate, the mean of the `beta` values of dim 0 (of `rows` only, if given)
    closest to their median; a tie in distance keeps the smaller value."""
    return reduce_sorted(updates, lambda ordered: mean_nearest_median(ordered, beta), rows)


def mean_nearest_median(ordered: Tensor, beta: int) -> Tensor:
    """`closest_to_median_mean` of values already sorted along dim 0.

    In sorted order the `beta` values nearest the median are consecutive: of the windows
    of `beta` consecutive values, the one whose farther end lies nearest the median (the
    first such, holding the smaller values, on a tie). That is a handful of tensor ops
    over all coordinates at once, whatever f is."""
    theta = ordered.shape[0]
    drop = theta - beta
    median = middle_of_sorted(ordered)
    reach = torch.maximum(median - ordered[: drop + 1], ordered[beta - 1 :] - median)  # window start -> radius
    low = reach.nan_to_num(nan=torch.inf).argmin(dim=0)  # a window holding NaN is never the nearest
    # rows [drop, beta) lie in every window; the others where low <= row < low + beta
    # (row >= low always holds past `drop`, as low <= drop)
    rows = torch.arange(theta, device=ordered.device)[:, None]
    total = ordered[drop:beta].sum(dim=0)
    first, last = rows[:drop], rows[max(beta, drop) :]
    total += torch.where((first >= low) & (first < low + beta), ordered[:drop], 0).sum(dim=0)
    total += torch.where(last < low + beta, ordered[max(beta, drop) :], 0).sum(dim=0)
    return total / beta


@dataclass
class BulyanConfig(KrumConfig):
    name: str = "bulyan"

    def problem(self, cohort: int) -> tuple[str, str] | None:
        if cohort < 4 * self.f + 3:
            return "f", f"bulyan needs n >= 4f + 3 updates: f={self.f} needs {4 * self.f + 3}, the cohort has {cohort}"
        return None


@AGGREGATORS.register("bulyan", BulyanConfig)
class BulyanAggregator(GatheredAggregator):
    config: BulyanConfig

    def combine(self, updates: Tensor, weights: Tensor) -> Tensor:
        f = self.config.f
        return closest_to_median_mean(updates, updates.shape[0] - 4 * f, rows=bulyan_select(updates, f))
