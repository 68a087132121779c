"""How many clients the vectorized engine trains at once when the config leaves it open.

A chunk's working set is, per client, its stacked parameters and their gradients plus
the activations autograd keeps for one local step. The chunk is as large as a budget
allows:
- CUDA: half the device's total memory. Steps are launch-bound there, so wider is
  faster until memory runs out. Total (not free) memory keeps the choice, and with it
  the float summation order, the same from run to run and after a resume.
- CPU: a fixed 48 MiB working set (96 MiB under bf16 autocast, `federated.amp`, whose
  activations are half the size). On CPU, steps are memory- and compute-bound and wide
  chunks fall out of cache; these budgets landed on the chunk sizes that ran fastest
  for the shipped models (docs/engines.md).
`federated.max_parallel_clients` replaces the estimate with a fixed size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fltool.algorithms.local import ApplyFn

CPU_WORKING_SET_BYTES = 48 * 2**20
CPU_BF16_WORKING_SET_BYTES = 96 * 2**20
GPU_MEMORY_FRACTION = 0.5


def step_bytes_per_client(apply_fn: ApplyFn, params: Sequence[Tensor], x: Tensor, y: Tensor) -> int:
    """Bytes one client needs for a local step on the batch (x, y): parameters,
    gradients, and every tensor autograd saves for the backward pass."""
    # a copy, as a training step gathers its batch: a view would count the whole
    # dataset's storage
    x, y = x.clone(), y.clone()
    weights = [p.detach().requires_grad_(True) for p in params]
    own = {w.untyped_storage().data_ptr() for w in weights}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    device = x.device
    # the probe's dropout must not advance the generators the training steps draw from
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            F.cross_entropy(apply_fn(weights, x), y)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    return 2 * param_bytes + sum(saved.values())


def device_memory_budget(device: torch.device, amp: str = "none") -> int:
    if device.type == "cuda":
        return int(GPU_MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory)
    return CPU_BF16_WORKING_SET_BYTES if amp == "bf16" else CPU_WORKING_SET_BYTES


def auto_chunk_size(
    apply_fn: ApplyFn, params: Sequence[Tensor], x: Tensor, y: Tensor, budget: int | None = None
) -> int:
    """Clients per chunk for batches shaped like (x, y); at least 1."""
    budget = device_memory_budget(params[0].device) if budget is None else budget
    return max(1, budget // step_bytes_per_client(apply_fn, params, x, y))
