"""FedProx (Li et al. 2020): FedAvg whose local objective adds mu/2 ||w - w_global||^2,
so each local step's gradient gains mu (w - w_global) (Eq. 2 of the paper)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from fltool.algorithms.api import Stacked
from fltool.algorithms.fedavg import FedAvg, per_client
from fltool.config.registry import ALGORITHMS
from fltool.config.schema import NON_NEGATIVE, AlgorithmConfig


@dataclass
class FedProxConfig(AlgorithmConfig):
    mu: float = field(default=0.01, metadata=NON_NEGATIVE)  # proximal weight


def add_proximal_gradient_(
    grads: list[Tensor], params: Sequence[Tensor], anchor: Sequence[Tensor], mu: float, active: Tensor | None = None
) -> None:
    """grads += mu * (w - w_global) for client-stacked params (anchor without the client
    dim); `active` (M,) keeps the term off clients whose schedule has ended, which the
    term alone would still move."""
    for g, p, a in zip(grads, params, anchor, strict=True):
        term = p - a
        g.add_(term if active is None else term * per_client(active, term), alpha=mu)


@ALGORITHMS.register("fedprox", FedProxConfig)
class FedProx(FedAvg):
    config: FedProxConfig

    @property
    def adjusts_gradients(self) -> bool:  # type: ignore[override]
        return self.config.mu > 0

    def adjust_gradients_(
        self, grads: list[Tensor], params: Sequence[Tensor], anchor: Sequence[Tensor], context: Stacked, active: Tensor
    ) -> None:
        add_proximal_gradient_(grads, params, anchor, self.config.mu, active)
