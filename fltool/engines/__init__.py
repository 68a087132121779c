"""Compute engines: how a cohort's clients are trained (one by one, or vectorized)."""

from __future__ import annotations

from torch import nn

from fltool.engines.base import ClientData, CohortJob, Engine
from fltool.engines.sequential import SequentialEngine
from fltool.engines.vectorized.engine import VectorizedEngine

__all__ = ["ClientData", "CohortJob", "Engine", "SequentialEngine", "VectorizedEngine", "make_engine"]


def make_engine(
    name: str,
    model: nn.Module,
    seed: int,
    max_parallel_clients: int | None = None,
    cuda_graphs: bool = True,
    amp: str = "none",
) -> SequentialEngine | VectorizedEngine:
    """`sequential`, `vectorized`, or `auto`: vectorized where one batched step of the
    model runs, else sequential (see `fltool.engines.auto`, which prints the choice).
    `amp` "bf16" runs the clients' forward passes under bf16 autocast."""
    if name == "auto":
        from fltool.engines.auto import announce, choose_engine

        engine, reason = choose_engine(
            model, lambda: VectorizedEngine(model, seed, max_parallel_clients, cuda_graphs=cuda_graphs, amp=amp)
        )
        announce("vectorized" if engine is not None else "sequential", reason)
        return engine if engine is not None else SequentialEngine(model, seed, amp)
    if name == "vectorized":
        return VectorizedEngine(model, seed, max_parallel_clients, cuda_graphs=cuda_graphs, amp=amp)
    if name == "sequential":
        return SequentialEngine(model, seed, amp)
    raise ValueError(f"unknown engine {name!r}")
