"""topk: each client sends only its k largest-magnitude coordinates (Stich et al. 2018;
Aji & Heafield 2017), with client-side error feedback.

Per client, over all its parameters flattened together (P coordinates):

    u = delta + e                  (e = the client's residual; 0 without error feedback)
    decoded = u on the k = max(1, ceil(fraction P)) largest |u_i|, 0 elsewhere
    e <- u - decoded               (what was not sent waits for the client's next upload)

so whatever a client does not send now is sent later: over its rounds, the decoded
uploads plus the final residual sum to its deltas. The residual is per-client state
(P floats a client), kept in the trainer's client store and checkpointed.

Encoded size, per client: k (float32 value, int32 index) pairs, 8 k bytes.
Deterministic: one torch.topk per client row, so chunking does not change it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fltool.algorithms.api import Stacked
from fltool.algorithms.compression.base import Compressor
from fltool.algorithms.compression.qsgd import flatten, unflatten
from fltool.config.registry import COMPRESSORS
from fltool.config.schema import UNIT_INTERVAL_OPEN_LEFT, CompressionConfig


@dataclass
class TopKConfig(CompressionConfig):
    name: str = "topk"
    fraction: float = field(default=0.01, metadata=UNIT_INTERVAL_OPEN_LEFT)  # of each client's coordinates
    error_feedback: bool = True


def kept(fraction: float, p: int) -> int:
    """k = max(1, ceil(fraction P)); the product rounded first, so that 0.07 of 100 is 7,
    not the 8 that 7.000000000000001 would give."""
    return min(p, max(1, math.ceil(round(fraction * p, 6))))


@COMPRESSORS.register("topk", TopKConfig)
class TopK(Compressor):
    config: TopKConfig

    def init_client_state(self, params: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        return {"residual": [torch.zeros_like(p) for p in params]} if self.config.error_feedback else {}

    def compress(self, ids: Tensor, delta: list[Tensor], state: Stacked, round_: int) -> tuple[list[Tensor], Stacked, Tensor]:
        u = flatten(delta)
        if self.config.error_feedback:
            u = u + flatten(state["residual"]).to(u.dtype)
        m, p = u.shape
        k = kept(self.config.fraction, p)
        index = u.abs().topk(k, dim=1).indices
        decoded = torch.zeros_like(u).scatter_(1, index, u.gather(1, index))
        rows = {"residual": unflatten(u - decoded, state["residual"])} if self.config.error_feedback else {}
        return unflatten(decoded, delta), rows, torch.full((m,), float(8 * k), device=u.device)
