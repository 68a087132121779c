"""Client sampling and seed derivation.

Every random choice of round r is drawn from a generator seeded by (seed, r, ...), not
from a stream carried across rounds: a resumed run, a second rank, or another engine
reproduces the same choices without sharing RNG state.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *keys: object) -> int:
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator_for(seed: int, *keys: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def cohort_size(num_clients: int, fraction: float) -> int:
    return max(1, round(fraction * num_clients))


def sample_clients(num_clients: int, fraction: float, generator: torch.Generator) -> list[int]:
    """max(1, round(C*K)) distinct clients, uniformly without replacement, in ascending order."""
    m = cohort_size(num_clients, fraction)
    return sorted(torch.randperm(num_clients, generator=generator)[:m].tolist())


def poisson_sample(num_clients: int, rate: float, generator: torch.Generator) -> list[int]:
    """Each client independently with probability `rate`, in ascending order (possibly none)."""
    return (torch.rand(num_clients, generator=generator) < rate).nonzero().flatten().tolist()
