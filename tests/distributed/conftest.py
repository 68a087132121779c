"""Fixtures for the distributed tests; shared helpers live in ddp_helpers.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# Make `from ddp_helpers import ...` work in every pytest import mode: with
# --import-mode=importlib this folder is not on sys.path, so register the module here
# (conftest.py is imported before the test modules of its folder).
if "ddp_helpers" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("ddp_helpers", Path(__file__).with_name("ddp_helpers.py"))
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["ddp_helpers"] = _module
    _spec.loader.exec_module(_module)


@pytest.fixture(autouse=True)
def one_thread():
    """In-process reference runs use one thread, like each torchrun worker (OMP_NUM_THREADS=1):
    on a 2-core CI machine two intra-op threads only fight the launched workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
