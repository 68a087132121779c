"""The compressor interface, and `none`.

A compressor is how a client encodes its update for the uplink. The trainer routes
every chunk's deltas through it on their way to the aggregator, under any engine:

    state = compressor.init_client_state(params)          # per-client rows (error feedback)
    delta, new_state, nbytes = compressor.compress(ids, delta, state, round)

`compress` returns the update as the server decodes it (what is aggregated), each
client's new state rows, and the (M,) bytes each client's encoded upload takes: the
`bytes_up` metric. Randomness is seeded per (seed, round, client), so both engines and
a resumed run draw the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fltool.algorithms.api import Stacked
from fltool.config.registry import COMPRESSORS
from fltool.config.schema import CompressionConfig


def dense_bytes(delta: Sequence[Tensor]) -> Tensor:
    """(M,) bytes of each client's uncompressed update."""
    per_client = sum(math.prod(d.shape[1:]) * d.element_size() for d in delta)  # (a chunk may have no rows)
    return torch.full((delta[0].shape[0],), float(per_client), device=delta[0].device)


@COMPRESSORS.register("none", CompressionConfig)
class Compressor:
    """No compression: the dense float update; every compressor subclasses this."""

    def __init__(self, config: CompressionConfig, seed: int) -> None:
        self.config = config
        self.seed = seed

    def init_client_state(self, params: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        """One client's initial state (without the client dim), kept for every client."""
        return {}

    def compress(self, ids: Tensor, delta: list[Tensor], state: Stacked, round_: int) -> tuple[list[Tensor], Stacked, Tensor]:
        """(decoded delta, new state rows, (M,) encoded bytes) for a chunk of clients."""
        return delta, {}, dense_bytes(delta)
