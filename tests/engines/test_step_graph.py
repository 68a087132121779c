"""CUDA-graph step: the parts that run without a GPU (the graphs themselves are tested
in test_cuda.py, marked gpu)."""

from __future__ import annotations

import pytest
import torch

from fltool.engines.sequential import SequentialEngine
from fltool.engines.vectorized.engine import VectorizedEngine
from fltool.engines.vectorized.step_graph import capacity
from fltool.models import build_model

from .helpers import assert_same_outcome, cohort_mean, global_params, initial_state, make_algorithm, make_clients


@pytest.fixture(autouse=True)
def _tiny_tensors(one_thread):
    """Every test here runs on one torch thread (see `one_thread`)."""


def test_buffers_grow_to_powers_of_two() -> None:
    assert [capacity(n) for n in (1, 2, 3, 5, 8, 9, 600)] == [1, 2, 4, 8, 8, 16, 1024]


@pytest.mark.parametrize("mode", ["fedprox", "scaffold"])
def test_cpu_runs_eagerly_and_captures_nothing(mode: str) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    clients, params = make_clients((1, 8, 8)), global_params(model)
    algorithm = make_algorithm(mode)
    graphed = VectorizedEngine(model, seed=3)  # cuda_graphs on, as by default
    eager = VectorizedEngine(model, seed=3, cuda_graphs=False)
    a, b, seq = (
        cohort_mean(engine, params, clients, algorithm, 1, initial_state(algorithm, params, scale=0.01))
        for engine in (graphed, eager, SequentialEngine(model, seed=3))
    )
    assert graphed.graphs is not None and not graphed.graphs.graphs and eager.graphs is None
    # the setting changes nothing on CPU: bit for bit the eager engine, and the sequential math
    assert_same_outcome(a, b, atol=0, rtol=0)
    assert_same_outcome(a, seq)


def test_the_vmap_fallback_is_never_captured() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.Tanh())
    assert VectorizedEngine(model, seed=0).graphs is None

