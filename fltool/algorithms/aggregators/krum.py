"""krum and multikrum (Blanchard et al. 2017, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent").

With n updates and f of them possibly Byzantine, update i's score is the sum of its
squared L2 distances to its n - f - 2 nearest other updates. Krum returns the update of
lowest score (ties: the lowest client id, the first row); Multi-Krum computes the scores
once, keeps the m lowest (ties by row order; m defaults to n - f) and returns their
unweighted mean. Both need n - f - 2 >= 1.

Cost: an (n, n) matrix of distances over all P parameters, O(n^2 P) as one matrix
product per block of parameters (see `pairwise_sq_distances`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fltool.algorithms.aggregators.base import GatheredAggregator
from fltool.config.registry import AGGREGATORS
from fltool.config.schema import AT_LEAST_ONE, AggregatorConfig, _check

NON_NEGATIVE_INT = _check(lambda v: v >= 0, ">= 0")
BLOCK = 1 << 16  # parameters per Gram-matrix block: an (n, BLOCK) float64 copy at a time
# float32 block products resolve a distance to about 1e-5 of |x_i|^2 + |x_j|^2; pairs
# closer than this fraction of it are recomputed in float64
RESOLVABLE = 1e-2


def pairwise_sq_distances(updates: Tensor) -> Tensor:
    """(n, P) -> (n, n) squared L2 distances, float64, exactly symmetric, zero diagonal.

    |x_i|^2 + |x_j|^2 - 2 x_i.x_j from the Gram matrix, accumulated in float64 over
    blocks of columns: a matrix product (torch.cdist's exact form is a slow loop over P),
    symmetrised so that equal configurations score exactly equal and ties go by client
    id. The products are float32 on the CPU (float64 costs 4x there: the copy and the
    slower product); where that cannot be trusted (an overflow, a NaN, or two updates so
    close that cancellation would eat the float32 digits) the whole matrix is redone in
    float64, as it always is on accelerators, whose float64 is fast and whose float32
    products may be TF32. Not centred on the mean: one client's huge, infinite or NaN
    values would then enter every distance; as is, they stay in that client's own row
    and column."""
    if updates.device.type == "cpu" and updates.dtype == torch.float32:
        gram = _gram(updates, products=torch.float32)
        dist = _distances(gram)
        sq = gram.diagonal()
        close = dist < RESOLVABLE * (sq[:, None] + sq[None, :])
        close.fill_diagonal_(False)
        if bool(gram.isfinite().all()) and not bool(close.any()):  # one host sync per aggregation
            return dist
    return _distances(_gram(updates, products=torch.float64))


def _gram(updates: Tensor, products: torch.dtype) -> Tensor:
    """x_i.x_j in float64, summed over blocks of columns of `products` precision."""
    n = updates.shape[0]
    gram = torch.zeros(n, n, dtype=torch.float64, device=updates.device)
    for start in range(0, updates.shape[1], BLOCK):  # a loop over parameter blocks, not clients
        block = updates[:, start : start + BLOCK].to(products)
        gram += block @ block.T
    return gram


def _distances(gram: Tensor) -> Tensor:
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    return ((dist + dist.T) / 2).fill_diagonal_(0)


def krum_scores(dist: Tensor, neighbours: int) -> Tensor:
    """Each row's sum of distances to its `neighbours` nearest other rows (itself
    excluded); a NaN distance counts as the farthest (torch sorts NaN last)."""
    others = dist.clone().fill_diagonal_(torch.inf)
    return others.topk(neighbours, dim=1, largest=False).values.sum(dim=1)


def krum_select(updates: Tensor, f: int, keep: int) -> Tensor:
    """Indices (ascending) of the `keep` rows of lowest Krum score, ties by row order."""
    scores = krum_scores(pairwise_sq_distances(updates), updates.shape[0] - f - 2)
    return scores.sort(stable=True).indices[:keep].sort().values


def needs_more(name: str, f: int, cohort: int) -> str | None:
    if cohort - f - 2 < 1:
        return (
            f"{name} needs more than f + 2 updates: f={f} leaves none of a cohort of {cohort} "
            f"(n - f - 2 = {cohort - f - 2})"
        )
    return None


@dataclass
class KrumConfig(AggregatorConfig):
    name: str = "krum"
    f: int = field(default=1, metadata=NON_NEGATIVE_INT)  # Byzantine updates tolerated

    def problem(self, cohort: int) -> tuple[str, str] | None:
        text = needs_more(self.name, self.f, cohort)
        return ("f", text) if text else None


@dataclass
class MultiKrumConfig(KrumConfig):
    name: str = "multikrum"
    m: int | None = field(default=None, metadata=AT_LEAST_ONE)  # updates averaged; null: n - f

    def problem(self, cohort: int) -> tuple[str, str] | None:
        found = super().problem(cohort)
        if found is None and self.m is not None and not 1 <= self.m <= cohort - self.f:
            return "m", f"must keep between 1 and n - f = {cohort - self.f} updates of a cohort of {cohort} with f={self.f}, got {self.m}"
        return found


@AGGREGATORS.register("krum", KrumConfig)
class KrumAggregator(GatheredAggregator):
    config: KrumConfig

    def combine(self, updates: Tensor, weights: Tensor) -> Tensor:
        return updates[krum_select(updates, self.config.f, 1)[0]].clone()


@AGGREGATORS.register("multikrum", MultiKrumConfig)
class MultiKrumAggregator(GatheredAggregator):
    config: MultiKrumConfig

    def combine(self, updates: Tensor, weights: Tensor) -> Tensor:
        keep = self.config.m if self.config.m is not None else updates.shape[0] - self.config.f
        return updates[krum_select(updates, self.config.f, keep)].mean(dim=0)
