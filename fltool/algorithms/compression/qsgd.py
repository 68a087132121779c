"""qsgd: stochastic uniform quantisation of each client's update (Alistarh et al. 2017).

With s = 2^bits - 1 levels and the client's norm ||x||_2 over all its parameters,
coordinate i is sent as sign(x_i) and a level l_i in {0, ..., s}:

    l_i = floor(s |x_i| / ||x|| + u_i),  u_i ~ U[0, 1)   (stochastic rounding)
    decoded_i = ||x|| sign(x_i) l_i / s

so E[l_i] = s |x_i| / ||x|| and the server's decoded update is unbiased, E = x. A zero
update has norm 0 and decodes to 0.

Encoded size, per client: the norm as a float32 (4 bytes), then P coordinates of
bits + 1 bits each (the level and a sign bit), packed: 4 + ceil(P (bits + 1) / 8).

The u_i are one flat draw per client from a generator seeded by (seed, round,
client), so the sequential engine (one client at a time), the vectorized engine (any
chunk) and a resumed run quantise a client's update alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fltool.algorithms.api import Stacked
from fltool.algorithms.compression.base import Compressor
from fltool.algorithms.sampling import derive_seed
from fltool.config.registry import COMPRESSORS
from fltool.config.schema import CompressionConfig, _check


@dataclass
class QSGDConfig(CompressionConfig):
    name: str = "qsgd"
    bits: int = field(default=8, metadata=_check(lambda v: 1 <= v <= 16, "in [1, 16]"))


def flatten(stacks: list[Tensor]) -> Tensor:
    """(M, P): each client's parameters side by side. reshape, not view: a vectorized
    engine's stacks may be per-client transposed."""
    m = stacks[0].shape[0]
    return torch.cat([s.reshape(m, math.prod(s.shape[1:])) for s in stacks], dim=1)


def unflatten(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """The (M, P) columns back into stacks shaped and typed like `like`."""
    sizes = [math.prod(s.shape[1:]) for s in like]
    return [c.reshape(s.shape).to(s.dtype) for c, s in zip(flat.split(sizes, dim=1), like, strict=True)]


@COMPRESSORS.register("qsgd", QSGDConfig)
class QSGD(Compressor):
    config: QSGDConfig

    def compress(self, ids: Tensor, delta: list[Tensor], state: Stacked, round_: int) -> tuple[list[Tensor], Stacked, Tensor]:
        x = flatten(delta)
        m, p = x.shape
        s = 2**self.config.bits - 1
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        u = torch.empty_like(x)
        for row, client in enumerate(ids.tolist()):  # one generator per client, one draw over all its parameters
            g = torch.Generator(device=x.device).manual_seed(derive_seed(self.seed, "qsgd", round_, client))
            u[row] = torch.rand(p, generator=g, device=x.device, dtype=x.dtype)
        # (a zero norm divides nothing: its levels are 0; the clamp keeps rounding error
        # from giving |x_i| / ||x|| > 1 a level past s)
        level = torch.floor(x.abs() / norm.clamp_min(torch.finfo(x.dtype).tiny) * s + u).clamp_(max=s)
        decoded = norm * torch.sign(x) * level / s
        nbytes = 4 + math.ceil(p * (self.config.bits + 1) / 8)
        return unflatten(decoded, delta), {}, torch.full((m,), float(nbytes), device=x.device)
