"""Fixtures for the distributed tests (helpers live in ddp_helpers.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """In-process reference runs use one thread, like each torchrun worker (OMP_NUM_THREADS=1):
    on a 2-core CI machine two intra-op threads only fight the launched workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
