"""The engines on a CUDA device: the same math as on CPU, graphed or eager.

Marked `gpu` and deselected by default (CI has no GPU); run them on a GPU machine with
`python -m pytest -m gpu`. Without CUDA they fail rather than skip.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fltool.engines.base import ClientData
from fltool.engines.sequential import SequentialEngine
from fltool.engines.vectorized import batched_nets, step_graph
from fltool.engines.vectorized.engine import VectorizedEngine
from fltool.models import build_model
from fltool.run.checkpoint import load_checkpoint
from fltool.run.metrics import read_metrics
from fltool.run.rundir import last_checkpoint
from fltool.run.runner import resume_run
from fltool.ui import PlainReporter

from ..trainers.test_federated import interrupted_run, run, strip_timing
from .helpers import (
    BASIC,
    SIZES,
    assert_same_outcome,
    cohort_mean,
    global_params,
    initial_state,
    make_algorithm,
    make_clients,
    relative_update_error,
)

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
MODELS = [("mlp", (1, 8, 8)), ("cnn", (1, 12, 12)), ("cnn_cifar", (3, 10, 10))]
# SCAFFOLD adds a gradient term read from the context (c - c_i) inside the captured step;
# option I also takes each client's full-data gradient before the replays
GRAPHED = [*BASIC, "scaffold", "scaffold1"]
STATE_SCALE = 0.01  # SCAFFOLD's c and c_i as after some rounds: its correction is not zero


@pytest.fixture(autouse=True)
def _full_precision():
    """cuDNN convolutions default to TF32 (10-bit mantissa): the grouped convolution of
    one engine and the plain one of the other then differ by ~1e-3. Compare in fp32."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


def on_cuda(clients: list[ClientData]) -> list[ClientData]:
    return [ClientData(c.id, c.x.to(CUDA), c.y.to(CUDA)) for c in clients]


def cuda_model(name: str, shape: tuple[int, ...], dropout: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, shape, 10).to(CUDA)
    for layer in model.modules():
        if isinstance(layer, nn.Dropout) and not dropout:  # draws differ between engines by design
            layer.p = 0.0
    return model


def cohort(engine, params, clients, mode: str, round_: int = 2, algorithm=None):
    """The cohort's outcome from the same (random, for SCAFFOLD) algorithm state."""
    algorithm = algorithm or make_algorithm(mode)
    return cohort_mean(engine, params, clients, algorithm, round_, initial_state(algorithm, params, scale=STATE_SCALE))


@pytest.mark.parametrize("mode", GRAPHED)
@pytest.mark.parametrize("model_name,shape", MODELS)
def test_graphed_vectorized_matches_sequential(mode: str, model_name: str, shape: tuple[int, ...]) -> None:
    model = cuda_model(model_name, shape)
    clients, params = on_cuda(make_clients(shape)), global_params(model)
    seq = cohort(SequentialEngine(model, seed=3), params, clients, mode)
    engine = VectorizedEngine(model, seed=3)
    vec = cohort(engine, params, clients, mode)
    assert len(engine.graphs.graphs) == 1  # it ran graphed
    assert vec.total_weight == seq.total_weight == (len(SIZES) if mode.startswith("scaffold") else sum(SIZES))
    assert_same_outcome(vec, seq, atol=1e-5)


@pytest.mark.parametrize("mode", GRAPHED)
@pytest.mark.parametrize("model_name,shape", MODELS)
def test_graph_replays_compute_what_the_eager_steps_compute(mode: str, model_name: str, shape: tuple[int, ...]) -> None:
    model = cuda_model(model_name, shape)
    clients, params = on_cuda(make_clients(shape)), global_params(model)
    eager = cohort(VectorizedEngine(model, seed=3, cuda_graphs=False), params, clients, mode)
    engine = VectorizedEngine(model, seed=3)
    graphed = cohort(engine, params, clients, mode)
    assert len(engine.graphs.graphs) == 1
    assert_same_outcome(graphed, eager, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("variant", ["batched-linear", "channels-last"])
@pytest.mark.parametrize("model_name,shape", MODELS)
def test_bench_variants_graphed_match_sequential(variant: str, model_name: str, shape: tuple[int, ...], monkeypatch) -> None:
    """`bench_engines.py --variant` on CUDA: BatchedLinear for every dense layer, or
    channels-last convolutions, captured in a graph, still compute the sequential model."""
    if variant == "batched-linear":
        monkeypatch.setattr(batched_nets, "uses_batched_linear", lambda x, w: True)
    else:
        monkeypatch.setattr(batched_nets, "conv_layout", lambda device: torch.channels_last)
    model = cuda_model(model_name, shape)
    clients, params = on_cuda(make_clients(shape)), global_params(model)
    for mode in ("fedprox", "scaffold"):
        seq = cohort(SequentialEngine(model, seed=3), params, clients, mode)
        engine = VectorizedEngine(model, seed=3)
        vec = cohort(engine, params, clients, mode)
        assert len(engine.graphs.graphs) == 1
        assert_same_outcome(vec, seq, atol=1e-5)


@pytest.mark.parametrize("model_name,shape", MODELS)
def test_graphed_bf16_step_matches_eager_and_sequential(model_name: str, shape: tuple[int, ...]) -> None:
    """federated.amp=bf16 under capture: autocast's casts are graphed with the step (no
    cast cache), so replays equal the eager bf16 steps and track the sequential engine
    (cuDNN's bf16 convolutions accumulate in fp32 in either engine's layout)."""
    model = cuda_model(model_name, shape)
    clients, params = on_cuda(make_clients(shape)), global_params(model)
    algorithm = make_algorithm("fedprox")
    seq = cohort(SequentialEngine(model, seed=3, amp="bf16"), params, clients, "fedprox", algorithm=algorithm)
    eager = cohort(VectorizedEngine(model, seed=3, cuda_graphs=False, amp="bf16"), params, clients, "fedprox", algorithm=algorithm)
    engine = VectorizedEngine(model, seed=3, amp="bf16")
    graphed = cohort(engine, params, clients, "fedprox", algorithm=algorithm)
    assert len(engine.graphs.graphs) == 1
    assert_same_outcome(graphed, eager, atol=1e-6, rtol=1e-6)
    assert relative_update_error(graphed.delta, seq.delta) < 1e-2


@pytest.mark.parametrize("mode", ["fedprox", "scaffold"])
def test_graphs_are_reused_across_rounds_and_regrown_for_larger_cohorts(mode: str, monkeypatch) -> None:
    """Chunks of two shapes (4 and 2 clients), cohorts that change size between rounds:
    every round equals the eager engine, and a graph is captured only for a new shape or
    a cohort larger than its buffers. For SCAFFOLD every chunk brings its own clients'
    correction into the graph's context buffers, and its state rows change each round."""
    captures = []
    capture = step_graph.StepGraph.capture
    monkeypatch.setattr(step_graph.StepGraph, "capture", lambda self: captures.append(1) or capture(self))
    model = cuda_model("mlp", (1, 8, 8))
    params = global_params(model)
    graphed = VectorizedEngine(model, seed=3, max_parallel_clients=4)
    eager = VectorizedEngine(model, seed=3, max_parallel_clients=4, cuda_graphs=False)
    algorithm = make_algorithm(mode)
    states = [initial_state(algorithm, params, scale=STATE_SCALE) for _ in range(2)]
    cohorts = [SIZES, SIZES, [5, 9, 3, 11, 2, 7], [30, 41, 25, 50, 33, 28], [30, 41, 25, 50, 33, 28]]
    for r, sizes in enumerate(cohorts, start=1):
        clients = on_cuda(make_clients((1, 8, 8), sizes))
        a = cohort_mean(graphed, params, clients, algorithm, r, states[0])
        b = cohort_mean(eager, params, clients, algorithm, r, states[1])
        assert_same_outcome(a, b, atol=1e-6, rtol=1e-6)
        for state, outcome in zip(states, (a, b)):  # the next round starts from the new rows
            if outcome.rows:
                state.clients.write(torch.tensor(sorted(outcome.ids)), outcome.rows)
    # rounds 1-2: shapes (4, 5) and (2, 5) captured once; round 3 fits them; round 4's
    # larger clients need larger buffers (the width stays 5), captured again, then reused
    assert len(captures) == 4
    assert len(graphed.graphs.graphs) == 2


def test_graphed_dropout_model_is_deterministic_per_seed() -> None:
    model = cuda_model("cnn_cifar", (3, 10, 10), dropout=True)
    clients, params = on_cuda(make_clients((3, 10, 10))), global_params(model)
    algorithm = make_algorithm("fedavg")
    runs = [cohort_mean(VectorizedEngine(model, seed=3), params, clients, algorithm, 2) for _ in range(2)]
    assert_same_outcome(runs[0], runs[1], atol=0.0, rtol=0.0)
    other = cohort_mean(VectorizedEngine(model, seed=3), params, clients, algorithm, 3)  # other round, other masks
    assert any(not torch.equal(a, b) for a, b in zip(other.delta, runs[0].delta))


@pytest.mark.parametrize("algorithm", [{"name": "fedavg"}, {"name": "scaffold"}])
def test_cuda_run_is_reproducible_and_resumes_to_the_same_model(make_config, algorithm: dict) -> None:
    cfg = make_config(
        mode="federated",
        algorithm=algorithm,
        device="cuda",
        data={"partition": "dirichlet"},
        federated={"rounds": 4, "engine": "vectorized"},
    )
    runs = [run(cfg), run(cfg)]
    broken = interrupted_run(cfg, after_round=2)
    resume_run(broken, [], PlainReporter())
    checkpoints = [load_checkpoint(last_checkpoint(d)) for d in (*runs, broken)]
    models = [c.model for c in checkpoints]
    for other in models[1:]:
        assert all(torch.equal(models[0][k], other[k]) for k in models[0])
    states = [c.extra["algorithm"] for c in checkpoints]  # SCAFFOLD's c and every c_i too
    for other in states[1:]:
        for part in ("server", "clients"):
            assert all(torch.equal(a, b) for name in states[0][part] for a, b in zip(states[0][part][name], other[part][name]))
    metrics = [strip_timing(read_metrics(d)) for d in (*runs, broken)]
    assert metrics[0] == metrics[1] == metrics[2]
