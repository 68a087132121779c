"""Encoding real-valued updates as integers mod 2^modulus_bits, and back.

Masking needs a finite group, so each coordinate is clipped to [-c, c] (c =
clipping_range, default 8.0) and mapped affinely onto [0, Q] (Q = quantization_range,
default 2^22), then rounded *stochastically*: up with probability equal to the
fractional part. That rounding is unbiased (E[q] equals the scaled value), so the
dequantised sum is an unbiased estimate of the clipped float sum with per-coordinate
error at most n * 2c / Q. The sum of n encodings lies in [0, nQ]; it is exact mod
2^bits as long as nQ < 2^bits (checked), which for the defaults allows 1023 clients.

The rounding's coin flips come from a torch generator the caller passes: they protect
nothing (the masks do), and taking them from the experiment's seed keeps runs
reproducible.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fltool.errors import FltoolError


def check_capacity(clients: int, quantization_range: int, modulus_bits: int) -> None:
    """Refuse a cohort whose sum could wrap around the modulus."""
    if clients * quantization_range >= 1 << modulus_bits:
        raise FltoolError(
            f"secagg: {clients} clients x quantization_range {quantization_range} does not fit mod 2^{modulus_bits}; "
            f"lower quantization_range to below 2^{modulus_bits} / {clients} or raise modulus_bits"
        )


def quantize(x: Tensor, clipping_range: float, quantization_range: int, generator: torch.Generator | None = None) -> Tensor:
    """int64 in [0, Q]: clip, scale to [0, Q], round stochastically (unbiased). float64
    inside, so Q = 2^22 keeps its fractional part."""
    c = float(clipping_range)
    scaled = (x.detach().to(torch.float64).clamp(-c, c) + c) * (quantization_range / (2 * c))
    low = scaled.floor()
    coins = torch.rand(scaled.shape, dtype=torch.float64, device="cpu", generator=generator).to(scaled.device)
    return (low + (coins < (scaled - low)).to(torch.float64)).to(torch.int64)


def reduce_mod(x: Tensor, modulus_bits: int) -> Tensor:
    """x mod 2^bits for int64 x of either sign (two's complement: a bitwise and)."""
    return x & ((1 << modulus_bits) - 1)


def dequantize(total: Tensor, clients: int, clipping_range: float, quantization_range: int) -> Tensor:
    """The float64 sum of `clients` clipped values from the (already reduced) integer sum."""
    c = float(clipping_range)
    return total.to(torch.float64) * (2 * c / quantization_range) - clients * c


def error_bound(clients: int, clipping_range: float, quantization_range: int) -> float:
    """Worst-case per-coordinate |dequantised sum - clipped float sum| (one step per client)."""
    return clients * 2 * float(clipping_range) / quantization_range
