"""Host memory settings for CPU training."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from fltool.devices import keep_freed_host_memory


def test_nothing_changes_for_cuda_runs() -> None:
    assert keep_freed_host_memory(torch.device("cuda")) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt; CI runs Linux")
def test_a_large_tensor_freed_each_step_is_reused_without_page_faults() -> None:
    """What a training step does: allocate, touch and free the same 64 MiB every step.
    Without the setting glibc mmaps it afresh each time (16,384 page faults a step)."""
    assert keep_freed_host_memory(torch.device("cpu")) is True
    for _ in range(10):  # the first steps fault their pages in (aligned chunks settle)
        torch.empty(16 * 2**20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(16 * 2**20).fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 2_000, f"{faults} page faults in 10 steps"
