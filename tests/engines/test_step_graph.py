"""CUDA-graph step: the parts that run without a GPU (the graphs themselves are tested
in test_cuda.py, marked gpu)."""

from __future__ import annotations

import torch

from fltool.engines.sequential import SequentialEngine
from fltool.engines.vectorized.step_graph import capacity
from fltool.engines.vectorized.engine import VectorizedEngine
from fltool.models import build_model

from .test_vectorized import RULES, assert_same, global_params, make_clients


def test_buffers_grow_to_powers_of_two() -> None:
    assert [capacity(n) for n in (1, 2, 3, 5, 8, 9, 600)] == [1, 2, 4, 8, 8, 16, 1024]


def test_cpu_runs_eagerly_and_captures_nothing() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    clients, params = make_clients((1, 8, 8)), global_params(model)
    graphed = VectorizedEngine(model, seed=3)  # cuda_graphs on, as by default
    eager = VectorizedEngine(model, seed=3, cuda_graphs=False)
    a = graphed.train_cohort(params, clients, RULES["fedprox"], 1)
    b = eager.train_cohort(params, clients, RULES["fedprox"], 1)
    assert graphed.graphs is not None and not graphed.graphs.graphs and eager.graphs is None
    # the setting changes nothing on CPU: bit for bit the eager engine, and the sequential math
    assert all(torch.equal(x, y) for x, y in zip(a.weighted.average(), b.weighted.average()))
    seq = SequentialEngine(model, seed=3).train_cohort(params, clients, RULES["fedprox"], 1)
    assert_same(a.weighted.average(), seq.weighted.average())


def test_the_vmap_fallback_is_never_captured() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10), torch.nn.Tanh())
    assert VectorizedEngine(model, seed=0).graphs is None
