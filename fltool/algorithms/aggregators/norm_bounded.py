"""norm_bounded: norm-bounded averaging (Sun et al. 2019, "Can You Really Backdoor
Federated Learning?", the norm thresholding defence): each client's whole update, all
parameters together, is scaled by min(1, clip_norm / ||delta_k||_2), then averaged with
the usual weights: sum_k w_k s_k delta_k / sum_k w_k. An update within the bound is
unchanged; a boosted (model-replacement) update is shrunk onto the bound.

Streamed like `mean`: each chunk is clipped as it arrives (its per-client norms over
all parameter stacks at once), so no cohort-sized matrix is held; extras (FedNova's tau,
SCAFFOLD's Delta c) are not clipped. Any n works. Cost: one extra pass over each chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from fltool.algorithms.aggregators.mean import MeanAggregator
from fltool.algorithms.api import Upload
from fltool.algorithms.fedavg import per_client
from fltool.config.registry import AGGREGATORS
from fltool.config.schema import POSITIVE, AggregatorConfig


def client_norms(stacked: Sequence[Tensor]) -> Tensor:
    """(M,) L2 norm of each client's update over all its parameter stacks (M, ...)
    together. vector_norm reduces over the per-client dims in any memory layout: a
    vectorized engine's stacks can be per-client transposed, where a reshape would copy."""
    per_tensor = [
        torch.linalg.vector_norm(s, dim=tuple(range(1, s.dim()))) if s.dim() > 1 else s.abs() for s in stacked
    ]
    return torch.linalg.vector_norm(torch.stack(per_tensor), dim=0)


def clip_factors(stacked: Sequence[Tensor], clip_norm: float) -> Tensor:
    """(M,) min(1, clip_norm / ||delta_k||); 1 for a zero update."""
    return (clip_norm / client_norms(stacked)).clamp(max=1.0)


@dataclass
class NormBoundedConfig(AggregatorConfig):
    name: str = "norm_bounded"
    # bound on each client's update norm (L2 over all parameters); no universal value:
    # it depends on the model, lr and local steps, so set it near the honest updates' norms
    clip_norm: float = field(default=1.0, metadata=POSITIVE)


@AGGREGATORS.register("norm_bounded", NormBoundedConfig)
class NormBoundedAggregator(MeanAggregator):
    config: NormBoundedConfig

    def add(self, ids: Tensor, upload: Upload) -> None:
        """Scale each client's delta (every stack keeps its layout), then as `mean`."""
        scale = clip_factors(upload.delta, self.config.clip_norm)
        clipped = [d * per_client(scale.to(d.dtype), d) for d in upload.delta]
        super().add(ids, replace(upload, delta=clipped))
