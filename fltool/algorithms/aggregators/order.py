"""Order statistics along the clients, the step the coordinate-wise rules (median,
trimmed mean, Bulyan) share: sort each coordinate's m values, then reduce them.

On the CPU that runs block by block of columns: each block of the selected rows is
copied transposed into cache, sorted by numpy's vectorised (SIMD) sort and reduced there,
on torch's thread count (numpy releases the GIL while sorting). torch's own sort along
dim 0 gathers each coordinate's values through a stride of P, tracks indices nobody
asks for, and would materialise the whole sorted (m, P) copy; the blocks never do.
Elsewhere, and for dtypes numpy lacks (bfloat16), it is torch's sort of the whole
stack. Measured in `scripts/bench_engines.py --robust`; see docs/robustness.md. (numpy
is not a dependency of its own: torchvision requires it.)
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import torch
from torch import Tensor

COLUMNS_PER_BLOCK = 8192  # an (m, 8192) float32 block of a 100-client cohort is 3.2 MB: it stays in cache
NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)

# (m, C) values sorted along dim 0 -> (..., C): each output column from its own column
SortedReduce = Callable[[Tensor], Tensor]


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="fltool-sort")


def reduce_sorted(stacked: Tensor, reduce: SortedReduce, rows: Tensor | None = None) -> Tensor:
    """`reduce(stacked[rows].sort(dim=0).values)` over an (m, *shape) stack, for a
    column-wise `reduce`; the result has shape (..., *shape). Sorting puts NaN last."""
    picked = stacked.detach().reshape(stacked.shape[0], -1)
    if rows is not None:
        rows = rows.to(picked.device)
    if picked.device.type != "cpu" or picked.dtype not in NUMPY_DTYPES or picked.numel() == 0:
        chosen = picked if rows is None else picked[rows]
        result = reduce(chosen.sort(dim=0).values)
    else:
        result = _reduce_sorted_blocks(picked, reduce, rows)
    return result.reshape(*result.shape[:-1], *stacked.shape[1:])


def _reduce_sorted_blocks(picked: Tensor, reduce: SortedReduce, rows: Tensor | None) -> Tensor:
    # Rows left out become NaN, which sorts last: the first len(rows) sorted values are
    # then exactly those of the chosen rows (any NaN of theirs comes last either way).
    # Cheaper than picking the rows: numpy's fancy indexing is slow, torch's a second copy.
    kept = picked.shape[0] if rows is None else len(rows)
    left_out = None
    if rows is not None:
        mask = np.ones(picked.shape[0], dtype=bool)
        mask[rows.numpy()] = False
        left_out = np.flatnonzero(mask)

    def sort_and_reduce(start: int) -> Tensor:
        block = np.ascontiguousarray(picked[:, start : start + COLUMNS_PER_BLOCK].numpy().T)
        if left_out is not None:
            block[:, left_out] = np.nan
        block.sort(axis=1)
        return reduce(torch.from_numpy(block).T[:kept])

    starts = range(0, picked.shape[1], COLUMNS_PER_BLOCK)
    threads = min(torch.get_num_threads(), len(starts))
    if threads <= 1:
        parts = [sort_and_reduce(start) for start in starts]
    else:
        parts = list(_pool(threads).map(sort_and_reduce, starts))
    return torch.cat(parts, dim=-1)


def sort_over_clients(stacked: Tensor) -> Tensor:
    """`stacked.sort(dim=0).values`, for callers that need every order statistic."""
    return reduce_sorted(stacked, lambda ordered: ordered)
