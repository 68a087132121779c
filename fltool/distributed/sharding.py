"""Per-epoch index sharding with DistributedSampler semantics, for tensor-resident data.

The epoch's permutation comes from a generator seeded by (seed, epoch) -- the
`set_epoch` idea -- so every rank draws the same permutation without talking. It is
padded by wrapping around (as DistributedSampler pads) to a whole number of optimizer
steps, and each step takes the next `global_batch = batch_size * accum * world`
positions. Within a step's block, rank r takes positions r, r+world, r+2*world, ...
So the SET of examples in one optimizer step depends only on the global batch, not on
how it is split: 2 ranks x 16 see exactly the examples that 1 rank x 32 sees, and the
averaged gradient is the same (each rank's loss is a mean over equally many examples).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fltool.algorithms.sampling import generator_for


def steps_per_epoch(n: int, global_batch: int) -> int:
    return -(-n // global_batch)


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n, generator=generator_for(seed, "ddp_epoch", epoch))


def rank_batches(
    n: int, seed: int, epoch: int, batch_size: int, accum: int, rank: int, world_size: int
) -> Tensor:
    """Indices for this rank: [steps, accum, batch_size], one row per optimizer step."""
    global_batch = batch_size * accum * world_size
    steps = steps_per_epoch(n, global_batch)
    perm = epoch_permutation(n, seed, epoch)
    total = steps * global_batch
    if total > n:  # wrap around, repeatedly if the data is smaller than one global batch
        perm = perm.repeat(-(-total // n))[:total]
    # [steps, accum * batch_size, world]: column r of a step's block belongs to rank r.
    blocks = perm.view(steps, accum * batch_size, world_size)
    return blocks[:, :, rank].reshape(steps, accum, batch_size).contiguous()
