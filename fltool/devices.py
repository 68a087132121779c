"""Host-to-device copies that do not wait for the GPU."""

from __future__ import annotations

import torch
from torch import Tensor


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a host tensor to `device` without a stream synchronisation.

    A blocking copy, like `torch.tensor(..., device="cuda")`, waits for every queued
    kernel; a non-blocking copy from pageable memory may still make the driver sync
    while it stages the data. From pinned memory the copy is queued and returns at once.
    """
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
