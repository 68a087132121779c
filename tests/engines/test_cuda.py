"""The engines on a CUDA device: the same math as on CPU, graphed or eager.

Marked `gpu` and deselected by default (CI has no GPU); run them on a GPU machine with
`python -m pytest -m gpu`. Without CUDA they fail rather than skip.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fltool.algorithms import LocalRule
from fltool.engines.vectorized import batched_nets, step_graph
from fltool.run.checkpoint import load_checkpoint
from fltool.engines.sequential import ClientData, SequentialEngine
from fltool.run.metrics import read_metrics
from fltool.run.rundir import last_checkpoint
from fltool.run.runner import resume_run
from fltool.engines.vectorized.engine import VectorizedEngine
from fltool.models import build_model
from fltool.ui import PlainReporter

from .test_amp import relative_update_error
from ..trainers.test_federated import interrupted_run, run, strip_timing
from .test_vectorized import RULES, SIZES, assert_same, global_params, make_clients

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
MODELS = [("mlp", (1, 8, 8)), ("cnn", (1, 12, 12)), ("cnn_cifar", (3, 10, 10))]


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


@pytest.mark.parametrize("mode", RULES)
@pytest.mark.parametrize("model_name,shape", MODELS)
def test_graphed_vectorized_matches_sequential(mode: str, model_name: str, shape: tuple[int, ...]) -> None:
    model = cuda_model(model_name, shape)
    clients, params = on_cuda(make_clients(shape)), global_params(model)
    seq = SequentialEngine(model, seed=3).train_cohort(params, clients, RULES[mode], 2)
    engine = VectorizedEngine(model, seed=3)
    vec = engine.train_cohort(params, clients, RULES[mode], 2)
    assert len(engine.graphs.graphs) == 1  # it ran graphed
    assert vec.weighted.total == seq.weighted.total == sum(SIZES)
    assert_same(vec.weighted.average(), seq.weighted.average(), atol=1e-5)
    torch.testing.assert_close(vec.loss_sum, seq.loss_sum, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", RULES)
@pytest.mark.parametrize("model_name,shape", MODELS)
def test_graph_replays_compute_what_the_eager_steps_compute(mode: str, model_name: str, shape: tuple[int, ...]) -> None:
    model = cuda_model(model_name, shape)
    clients, params = on_cuda(make_clients(shape)), global_params(model)
    eager = VectorizedEngine(model, seed=3, cuda_graphs=False).train_cohort(params, clients, RULES[mode], 2)
    graphed = VectorizedEngine(model, seed=3).train_cohort(params, clients, RULES[mode], 2)
    assert_same(graphed.weighted.average(), eager.weighted.average(), atol=1e-6)
    torch.testing.assert_close(graphed.loss_sum, eager.loss_sum, rtol=1e-6, atol=1e-5)


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
    seq = SequentialEngine(model, seed=3).train_cohort(params, clients, RULES["fedprox"], 2)
    engine = VectorizedEngine(model, seed=3)
    vec = engine.train_cohort(params, clients, RULES["fedprox"], 2)
    assert len(engine.graphs.graphs) == 1
    assert_same(vec.weighted.average(), seq.weighted.average(), atol=1e-5)


@pytest.mark.parametrize("model_name,shape", MODELS)
def test_graphed_bf16_step_matches_eager_and_sequential(model_name: str, shape: tuple[int, ...]) -> None:
    """federated.amp=bf16 under capture: autocast's casts are graphed with the step (no
    cast cache), so replays equal the eager bf16 steps and track the sequential engine."""
    model = cuda_model(model_name, shape)
    clients, params = on_cuda(make_clients(shape)), global_params(model)
    rule = RULES["fedprox"]
    seq = SequentialEngine(model, seed=3, amp="bf16").train_cohort(params, clients, rule, 2)
    eager = VectorizedEngine(model, seed=3, cuda_graphs=False, amp="bf16").train_cohort(params, clients, rule, 2)
    engine = VectorizedEngine(model, seed=3, amp="bf16")
    graphed = engine.train_cohort(params, clients, rule, 2)
    assert len(engine.graphs.graphs) == 1
    assert_same(graphed.weighted.average(), eager.weighted.average(), atol=1e-6)
    assert relative_update_error(graphed.weighted.average(), seq.weighted.average(), params) < 1e-2


def test_graphs_are_reused_across_rounds_and_regrown_for_larger_cohorts(monkeypatch) -> None:
    """Chunks of two shapes (4 and 2 clients), cohorts that change size between rounds:
    every round equals the eager engine, and a graph is captured only for a new shape or
    a cohort larger than its buffers."""
    captures = []
    capture = step_graph.StepGraph.capture
    monkeypatch.setattr(step_graph.StepGraph, "capture", lambda self: captures.append(1) or capture(self))
    model = cuda_model("mlp", (1, 8, 8))
    params = global_params(model)
    graphed = VectorizedEngine(model, seed=3, max_parallel_clients=4)
    eager = VectorizedEngine(model, seed=3, max_parallel_clients=4, cuda_graphs=False)
    rule = RULES["fedprox"]
    cohorts = [SIZES, SIZES, [5, 9, 3, 11, 2, 7], [30, 41, 25, 50, 33, 28], [30, 41, 25, 50, 33, 28]]
    for r, sizes in enumerate(cohorts, start=1):
        clients = on_cuda(make_clients((1, 8, 8), sizes))
        a = graphed.train_cohort(params, clients, rule, r)
        b = eager.train_cohort(params, clients, rule, r)
        assert_same(a.weighted.average(), b.weighted.average(), atol=1e-6)
    # rounds 1-2: shapes (4, 5) and (2, 5) captured once; round 3 fits them; round 4's
    # larger clients need larger buffers (the width stays 5), captured again, then reused
    assert len(captures) == 4
    assert len(graphed.graphs.graphs) == 2


def test_graphed_dropout_model_is_deterministic_per_seed() -> None:
    model = cuda_model("cnn_cifar", (3, 10, 10), dropout=True)
    clients, params = on_cuda(make_clients((3, 10, 10))), global_params(model)
    rule = LocalRule(epochs=2, batch_size=5, lr=0.1)
    runs = [VectorizedEngine(model, seed=3).train_cohort(params, clients, rule, 2) for _ in range(2)]
    assert_same(runs[0].weighted.average(), runs[1].weighted.average(), atol=0.0)
    other = VectorizedEngine(model, seed=3).train_cohort(params, clients, rule, 3)  # other round, other masks
    assert any(not torch.equal(a, b) for a, b in zip(other.weighted.average(), runs[0].weighted.average()))


def test_cuda_run_is_reproducible_and_resumes_to_the_same_model(make_config) -> None:
    cfg = make_config(device="cuda", data={"partition": "dirichlet"}, federated={"rounds": 4, "engine": "vectorized"})
    runs = [run(cfg), run(cfg)]
    broken = interrupted_run(cfg, after_round=2)
    resume_run(broken, [], PlainReporter())
    models = [load_checkpoint(last_checkpoint(d)).model for d in (*runs, broken)]
    for other in models[1:]:
        assert all(torch.equal(models[0][k], other[k]) for k in models[0])
    metrics = [strip_timing(read_metrics(d)) for d in (*runs, broken)]
    assert metrics[0] == metrics[1] == metrics[2]
