"""Devices: choosing one, host memory for training on CPU, and host-to-device copies
that do not wait for the GPU."""

from __future__ import annotations

import contextlib
import ctypes
import sys

import torch
from torch import Tensor

from fltool.errors import FltoolError


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a host tensor to `device` without a stream synchronisation.

    A blocking copy, like `torch.tensor(..., device="cuda")`, waits for every queued
    kernel; a non-blocking copy from pageable memory may still make the driver sync
    while it stages the data. From pinned memory the copy is queued and returns at once.
    """
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def autocast_for(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` for amp "bf16", else nothing.

    No cast cache: a client's weights change every step, and a CUDA graph must not
    capture a cached cast from its warm-up."""
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_host_memory(device: torch.device) -> bool:
    """On CPU, make glibc's malloc keep freed memory for reuse rather than return it to
    the OS. Returns whether the setting took (never off Linux/glibc or on CUDA).

    By default glibc serves large allocations (above a threshold that adapts up to
    32 MiB) with a fresh mmap, unmaps them when freed, and trims the heap's free top. A
    training step allocates and frees the same large activations and gradients every
    step, so every step faulted its pages in again and the kernel zeroed them: a
    vectorized CIFAR CNN round took 90,000-240,000 page faults and 2.10-2.40 s, against a
    few faults and 1.89-2.01 s with these settings, and a 6-client batched matmul writing
    38 MB ran 12x slower than into kept memory. The price: a process keeps its peak heap
    until it exits.
    """
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):  # not glibc
        return False


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, key: str = "device") -> torch.device:
    """`auto`, `cpu` or `cuda` as a torch device; `key` is where the user set it, for errors."""
    if name not in DEVICES:
        raise FltoolError(f"{key}: must be one of {', '.join(DEVICES)}; got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FltoolError(f"{key}: cuda was asked for but no CUDA device is visible; use auto or cpu")
    return torch.device(name)
