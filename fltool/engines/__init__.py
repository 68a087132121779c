"""Compute engines: how a cohort's clients are trained (one by one, or vectorized)."""

from __future__ import annotations

from torch import nn

from fltool.engines.base import ClientData, CohortJob, Engine
from fltool.engines.sequential import SequentialEngine
from fltool.engines.vectorized.engine import VectorizedEngine
from fltool.models.setup import has_running_stats

__all__ = ["ClientData", "CohortJob", "Engine", "SequentialEngine", "VectorizedEngine", "make_engine"]


def make_engine(
    name: str,
    model: nn.Module,
    seed: int,
    max_parallel_clients: int | None = None,
    cuda_graphs: bool = True,
    amp: str = "none",
) -> SequentialEngine | VectorizedEngine:
    """`sequential`, `vectorized`, or `auto`: vectorized unless the model keeps BatchNorm
    running statistics (which one stacked forward pass cannot update per client).
    `amp` "bf16" runs the clients' forward passes under bf16 autocast."""
    if name == "auto":
        name = "sequential" if has_running_stats(model) else "vectorized"
    if name == "vectorized":
        return VectorizedEngine(model, seed, max_parallel_clients, cuda_graphs=cuda_graphs, amp=amp)
    if name == "sequential":
        return SequentialEngine(model, seed, amp)
    raise ValueError(f"unknown engine {name!r}")
