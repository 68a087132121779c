"""The vectorized engine computes what the sequential engine computes, only batched:
the same uploads (the aggregate's mean update and extras, every client's new state
rows) for every algorithm, chunked or not, out of memory or not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fltool.algorithms import LocalRule, Upload
from fltool.algorithms.aggregators import MeanAggregator
from fltool.config import config_from_dict
from fltool.config.schema import AggregatorConfig
from fltool.engines import CohortJob, SequentialEngine, make_engine
from fltool.engines.base import ClientData, client_batches, make_apply_fn
from fltool.engines.vectorized.batched_nets import make_batched_apply, supports
from fltool.engines.vectorized.batched_step import plan_chunk
from fltool.engines.vectorized.chunking import auto_chunk_size, step_bytes_per_client
from fltool.engines.vectorized.engine import VectorizedEngine, chunks
from fltool.errors import FltoolError
from fltool.models import build_model
from fltool.run.checkpoint import load_checkpoint
from fltool.run.rundir import last_checkpoint
from fltool.trainers.federated import train_federated

from .helpers import (
    ALL,
    BASIC,
    EQUAL_SIZES,
    SIZES,
    assert_same,
    assert_same_outcome,
    cohort_mean,
    global_params,
    initial_state,
    make_algorithm,
    make_clients,
)

@pytest.fixture(autouse=True)
def _tiny_tensors(one_thread):
    """Every test here runs on one torch thread (see `one_thread`)."""


SIZINGS = {"unequal": SIZES, "equal": EQUAL_SIZES}
STATE_SCALE = 0.01  # SCAFFOLD's c and c_i as after some rounds: its correction is not zero


def expected_weight(mode: str, sizes: list[int]) -> float:
    """What the uploads' weights add up to: n_k each, or 1 per client for SCAFFOLD."""
    return float(len(sizes)) if mode.startswith("scaffold") else float(sum(sizes))


def both_engines(model: nn.Module, mode: str, clients: list[ClientData], round_: int = 2, **vectorized: object):
    params = global_params(model)
    algorithm = make_algorithm(mode)
    seq = cohort_mean(SequentialEngine(model, seed=3), params, clients, algorithm,
                      round_, initial_state(algorithm, params, scale=STATE_SCALE))
    vec = cohort_mean(VectorizedEngine(model, seed=3, **vectorized), params, clients, algorithm,
                      round_, initial_state(algorithm, params, scale=STATE_SCALE))
    return seq, vec


@pytest.mark.parametrize("sizing", SIZINGS)
@pytest.mark.parametrize("mode", ALL)
@pytest.mark.parametrize("model_name", ["mlp", "cnn_small"])
def test_cohort_matches_sequential(mode: str, model_name: str, sizing: str) -> None:
    torch.manual_seed(0)
    model = build_model(model_name, (1, 8, 8), 10)
    sizes = SIZINGS[sizing]
    seq, vec = both_engines(model, mode, make_clients((1, 8, 8), sizes))
    assert vec.total_weight == seq.total_weight == expected_weight(mode, sizes)
    assert_same_outcome(vec, seq)
    assert all(d.abs().sum() > 0 for d in vec.delta)  # it trained
    if mode.startswith("scaffold"):  # new control variates for every client, and their mean change
        assert set(vec.rows) == {"c"} and all(r.shape[0] == len(sizes) for r in vec.rows["c"])
        assert set(vec.aggregate.extras) == {"c"}
    if mode == "fednova":  # the cohort's mean local step count
        (tau,) = vec.aggregate.extras["tau"]
        steps = [2 * -(-n // 5) for n in sizes]
        assert tau.item() == pytest.approx(sum(n * s for n, s in zip(sizes, steps)) / sum(sizes))


@pytest.mark.parametrize("mode", ALL)
def test_cohort_matches_sequential_with_every_dense_layer_batched(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's BatchedLinear (used for large layers only) trains the same cohort; its
    low-rank weight gradients are materialised for the algorithms that adjust them."""
    from fltool.engines.vectorized import batched_nets

    monkeypatch.setattr(batched_nets, "BATCHED_LINEAR_MIN_WEIGHTS", 0)
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    seq, vec = both_engines(model, mode, make_clients((1, 8, 8)))
    assert_same_outcome(vec, seq)


@pytest.mark.parametrize("mode", ["fedavg", "fedprox", "scaffold", "scaffold1"])
def test_vmap_fallback_matches_sequential(mode: str) -> None:
    """Models the hand-batched forward does not cover are vmap'd over functional_call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    assert not supports(model)
    assert VectorizedEngine(model, seed=3).batched_apply is None
    seq, vec = both_engines(model, mode, make_clients((1, 8, 8)))
    assert_same_outcome(vec, seq)


ODD_CONVS = nn.Sequential(  # strides, padding, dilation, a non-square kernel, no bias
    nn.Conv2d(2, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Conv2d(5, 4, 3, padding=1),
    nn.Flatten(),
    nn.Linear(4 * 3 * 3, 10),
)


@pytest.mark.parametrize(
    "model_name,shape", [("mlp", (1, 8, 8)), ("cnn", (1, 12, 12)), ("cnn_cifar", (3, 10, 10)), ("odd_convs", (2, 11, 8))]
)
def test_hand_batched_forward_equals_per_client_forward(model_name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = ODD_CONVS if model_name == "odd_convs" else build_model(model_name, shape, 10)
    model.eval()  # eval: no dropout, so outputs are comparable
    assert supports(model)
    stacked = [torch.stack([p.detach() + 0.01 * k for k in range(3)]) for p in model.parameters()]
    x = torch.randn(3, 4, *shape)
    batched = make_batched_apply(model)(stacked, x)
    apply_fn = make_apply_fn(model)
    for k in range(3):
        torch.testing.assert_close(batched[k], apply_fn([p[k] for p in stacked], x[k]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["fedprox", "scaffold"])
@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_chunking_matches_whole_cohort(chunk: int, mode: str) -> None:
    """Chunks (sorted by size, so not in id order) get their own context rows and hand
    back their own uploads; only the float summation order changes."""
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    clients, params = make_clients((1, 8, 8)), global_params(model)
    algorithm = make_algorithm(mode)
    outcomes = [
        cohort_mean(VectorizedEngine(model, seed=0, max_parallel_clients=size), params, clients, algorithm, 1,
                    initial_state(algorithm, params, scale=STATE_SCALE))
        for size in (None, chunk)
    ]
    whole, chunked = outcomes
    assert len(chunked.ids) == len(clients) and sorted(chunked.ids) == [c.id for c in clients]
    assert_same_outcome(chunked, whole)


@pytest.mark.parametrize("mode", ["fedavg", "scaffold", "scaffold1", "fednova"])
@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_an_empty_share_of_the_cohort_uploads_nothing_but_the_shapes(engine: str, mode: str) -> None:
    """Under `launch`, a rank gets no clients when the cohort is smaller than the world:
    it still uploads once (no rows), so that its aggregator holds the same tensors as a
    rank with clients for the collectives, all zero."""
    model = build_model("cnn_small", (1, 8, 8), 10)
    params, algorithm = global_params(model), make_algorithm(mode)
    state = initial_state(algorithm, params)

    def run(clients: list[ClientData]) -> tuple[list[tuple[torch.Tensor, Upload]], MeanAggregator, torch.Tensor]:
        uploads, aggregator = [], MeanAggregator(AggregatorConfig())

        def collect(ids: torch.Tensor, upload: Upload) -> None:
            uploads.append((ids, upload))
            aggregator.add(ids, upload)

        def context_for(ids: list[int]):
            return algorithm.client_context(state.server, state.clients.rows(ids), params)

        loss = make_engine(engine, model, seed=3).train_cohort(params, clients, CohortJob(algorithm, 1, context_for, collect))
        return uploads, aggregator, loss

    uploads, aggregator, loss_sum = run([])
    assert loss_sum.item() == 0
    ((ids, upload),) = uploads
    assert ids.shape == (0,) and upload.weight.shape == (0,)
    assert [d.shape for d in upload.delta] == [(0, *p.shape) for p in params]
    assert all(t.shape[0] == 0 for ts in (*upload.extras.values(), *upload.state.values()) for t in ts)
    assert all(torch.count_nonzero(t) == 0 for t in aggregator.sums.tensors())
    _, with_clients, _ = run(make_clients((1, 8, 8), [3]))
    assert [t.shape for t in aggregator.sums.tensors()] == [t.shape for t in with_clients.sums.tensors()]


def test_chunks_cover_the_cohort_once() -> None:
    clients = make_clients((2,))
    parts = chunks(clients, 4)
    assert [len(p) for p in parts] == [4, 2]
    assert sorted(c.id for p in parts for c in p) == [c.id for c in clients]
    assert len(chunks(clients, None)) == 1


def test_plan_masks_padding_and_finished_clients() -> None:
    clients = make_clients((2,), [7, 3])
    plan = plan_chunk(0, 1, clients, LocalRule(epochs=1, batch_size=5, lr=0.1), torch.device("cpu"))
    assert plan.steps == [2, 1]
    assert plan.mask.sum(dim=2).tolist() == [[5.0, 3.0], [2.0, 0.0]]  # partial batches, then done
    assert plan.active.tolist() == [[1.0, 1.0], [1.0, 0.0]]
    real = plan.index[plan.mask.bool()]
    assert sorted(real.tolist()) == list(range(10))  # every example once, client 1 offset by 7


@pytest.mark.parametrize("mode", BASIC)
def test_plan_follows_each_clients_sequential_schedule(mode: str) -> None:
    clients, rule = make_clients((2,)), make_algorithm(mode).rule
    plan = plan_chunk(4, 3, clients, rule, torch.device("cpu"))
    offset = 0
    for m, client in enumerate(clients):
        expected = [b + offset for b in client_batches(4, 3, client, rule)]
        planned = [plan.index[s, m][plan.mask[s, m].bool()] for s in range(plan.steps[m])]
        assert len(planned) == len(expected) and all(torch.equal(a, b) for a, b in zip(planned, expected))
        assert plan.active[plan.steps[m] :, m].sum() == 0
        offset += client.n


def test_auto_picks_vectorized_unless_running_stats() -> None:
    mlp = build_model("mlp", (1, 8, 8), 10)
    with_bn = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))
    assert isinstance(make_engine("auto", mlp, 0), VectorizedEngine)
    assert isinstance(make_engine("auto", with_bn, 0), SequentialEngine)
    assert isinstance(make_engine("sequential", mlp, 0), SequentialEngine)
    with pytest.raises(FltoolError, match="BatchNorm"):
        make_engine("vectorized", with_bn, 0)


def test_dropout_model_trains_deterministically() -> None:
    """cnn_cifar has dropout: per-client masks differ from the sequential engine's, so
    only determinism and sanity are checked, not equality."""
    torch.manual_seed(0)
    model = build_model("cnn_cifar", (3, 8, 8), 10)
    clients, params = make_clients((3, 8, 8), [6, 9, 4]), global_params(model)
    algorithm = make_algorithm("fedavg")
    runs = [cohort_mean(VectorizedEngine(model, seed=0), params, clients, algorithm, 1) for _ in range(2)]
    assert_same(runs[0].delta, runs[1].delta, atol=0, rtol=0)
    assert all(torch.isfinite(d).all() for d in runs[0].delta)
    seq = cohort_mean(SequentialEngine(model, seed=0), params, clients, algorithm, 1)
    delta_vec = sum(d.norm() for d in runs[0].delta)
    delta_seq = sum(d.norm() for d in seq.delta)
    assert 0.5 < float(delta_vec / delta_seq) < 2.0  # same size of update, different noise


# name -> the config's algorithm section
RUN_ALGORITHMS = {
    "fedavg": {"name": "fedavg"},
    "fedprox": {"name": "fedprox", "mu": 0.1},
    "fedsgd": {"name": "fedsgd"},
    "scaffold": {"name": "scaffold"},
    "scaffold1": {"name": "scaffold", "option": 1},
    "fednova": {"name": "fednova"},
}


def run_config(tmp_path: Path, mode: str, engine: str, **federated: object):
    raw = {
        "name": "vec",
        "mode": "federated",
        "seed": 0,
        "device": "cpu",
        "data": {"dataset": "synthetic", "partition": "dirichlet", "alpha": 0.5,
                 "synthetic": {"train_size": 301, "test_size": 100, "shape": [1, 8, 8]}},
        "model": {"name": "mlp"},
        "federated": {"num_clients": 7, "fraction": 0.6, "rounds": 2, "local_epochs": 2, "batch_size": 8,
                      "lr": 0.1, "engine": engine, **federated},
        "algorithm": RUN_ALGORITHMS[mode],
        "output": {"dir": str(tmp_path / "runs"), "run_dir": str(tmp_path / engine / mode)},
    }
    cfg = config_from_dict(raw, "test")
    run_dir = Path(cfg.output.run_dir)
    run_dir.mkdir(parents=True)
    summary = train_federated(cfg, run_dir)
    return summary, load_checkpoint(last_checkpoint(run_dir))


@pytest.mark.parametrize("mode", RUN_ALGORITHMS)
def test_training_run_matches_sequential(tmp_path: Path, mode: str) -> None:
    """Whole runs (Dirichlet: unequal clients; the algorithm's state carried between
    rounds): the same metrics, model and checkpointed algorithm state."""
    seq, seq_ckpt = run_config(tmp_path, mode, "sequential")
    vec, vec_ckpt = run_config(tmp_path, mode, "vectorized", max_parallel_clients=3)
    assert [r["client_ids"] for r in vec.metrics] == [r["client_ids"] for r in seq.metrics]
    for a, b in zip(vec.metrics, seq.metrics):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
    assert_same(list(vec_ckpt.model.values()), list(seq_ckpt.model.values()))
    vec_state, seq_state = vec_ckpt.extra["algorithm"], seq_ckpt.extra["algorithm"]
    for part in ("server", "clients"):
        assert set(vec_state[part]) == set(seq_state[part])
        for name in seq_state[part]:
            assert_same(vec_state[part][name], seq_state[part][name])
    if mode.startswith("scaffold"):  # the state really moved
        assert any(c.abs().sum() > 0 for c in vec_state["server"]["c"])


def test_max_parallel_clients_is_validated() -> None:
    with pytest.raises(FltoolError, match="max_parallel_clients"):
        config_from_dict({"federated": {"max_parallel_clients": 0}}, "test")


def test_auto_chunk_size_fits_the_memory_budget() -> None:
    torch.manual_seed(0)
    model = build_model("cnn_small", (1, 8, 8), 10)
    clients, params = make_clients((1, 8, 8)), global_params(model)
    x, y = clients[3].x[:5], clients[3].y[:5]
    per_client = step_bytes_per_client(make_apply_fn(model), params, x, y)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    assert per_client > 2 * param_bytes  # parameters, gradients, and saved activations
    assert step_bytes_per_client(make_apply_fn(model), params, clients[3].x[:10], clients[3].y[:10]) > per_client
    assert auto_chunk_size(make_apply_fn(model), params, x, y, budget=3 * per_client + 1) == 3
    assert auto_chunk_size(make_apply_fn(model), params, x, y, budget=1) == 1


def test_engine_sizes_chunks_to_its_budget_and_keeps_the_math() -> None:
    """With max_parallel_clients unset, the budget decides the chunks; the result stays
    the sequential engine's, and the probe does not disturb the random state."""
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    clients, params = make_clients((1, 8, 8)), global_params(model)
    algorithm = make_algorithm("fedprox")
    rule = algorithm.rule
    per_client = step_bytes_per_client(make_apply_fn(model), params, clients[3].x[:5], clients[3].y[:5])
    vec = VectorizedEngine(model, seed=3, memory_budget=2 * per_client)
    assert vec.chunk_size(params, clients, rule) == 2
    assert VectorizedEngine(model, seed=3).chunk_size(params, clients, rule) == len(clients)  # tiny model, CPU budget
    assert VectorizedEngine(model, seed=3, max_parallel_clients=4).chunk_size(params, clients, rule) == 4
    result = cohort_mean(vec, params, clients, algorithm, 2)
    seq = cohort_mean(SequentialEngine(model, seed=3), params, clients, algorithm, 2)
    assert_same_outcome(result, seq)


def test_chunk_probe_leaves_the_random_state_alone() -> None:
    model = build_model("cnn_cifar", (3, 8, 8), 10).train()  # has dropout
    clients, params = make_clients((3, 8, 8), [6, 9]), global_params(model)
    state = torch.get_rng_state()
    VectorizedEngine(model, seed=0).chunk_size(params, clients, make_algorithm("fedavg").rule)
    assert torch.equal(torch.get_rng_state(), state)


def test_chunk_probe_counts_the_batch_not_the_dataset_it_is_sliced_from() -> None:
    model = build_model("mlp", (1, 8, 8), 10)
    params = global_params(model)
    dataset_x, dataset_y = torch.randn(5000, 1, 8, 8), torch.randint(10, (5000,))
    sliced = step_bytes_per_client(make_apply_fn(model), params, dataset_x[:5], dataset_y[:5])
    copied = step_bytes_per_client(make_apply_fn(model), params, dataset_x[:5].clone(), dataset_y[:5].clone())
    assert sliced == copied


@pytest.mark.parametrize("mode", ["fedprox", "scaffold"])
def test_a_chunk_out_of_device_memory_is_split_and_retried(mode: str, monkeypatch) -> None:
    """Nothing of a failed chunk is uploaded: every client uploads exactly once, and the
    cohort is still the sequential engine's."""
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    clients, params = make_clients((1, 8, 8)), global_params(model)
    algorithm = make_algorithm(mode)
    engine = VectorizedEngine(model, seed=3)
    real_train_chunk, tried = engine.train_chunk, []

    def small_memory(global_params, chunk, job, context):
        tried.append(len(chunk))
        if len(chunk) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_train_chunk(global_params, chunk, job, context)

    monkeypatch.setattr(engine, "train_chunk", small_memory)
    result = cohort_mean(engine, params, clients, algorithm, 2, initial_state(algorithm, params, scale=STATE_SCALE))
    assert tried[:3] == [6, 3, 2] and max(tried[3:]) <= 2
    assert engine.oom_cap == 2 and engine.chunk_size(params, clients, algorithm.rule) == 2  # remembered
    assert sorted(result.ids) == [c.id for c in clients]  # each once
    seq = cohort_mean(SequentialEngine(model, seed=3), params, clients, algorithm, 2,
                      initial_state(algorithm, params, scale=STATE_SCALE))
    assert result.total_weight == expected_weight(mode, SIZES)
    assert_same_outcome(result, seq)

    def no_memory(global_params, chunk, job, context):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine, "train_chunk", no_memory)
    with pytest.raises(torch.OutOfMemoryError):  # one client that does not fit is the user's to see
        cohort_mean(engine, params, clients, algorithm, 2)


@pytest.mark.parametrize("mode", ["fedavg", "fedprox", "scaffold"])
def test_a_low_rank_gradient_updates_as_its_product_would(mode: str) -> None:
    """`step_update` given a LowRankGrad (one GEMM into the weights; materialised first
    for FedProx's and SCAFFOLD's terms) equals the update with the full gradient, and a
    finished client stays where it is whatever the algorithm adds."""
    from fltool.engines.vectorized.batched_nets import LowRankGrad
    from fltool.engines.vectorized.batched_step import step_update

    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, generator=g)
    anchor = [torch.randn(4, 6, generator=g), torch.randn(4, generator=g)]
    low_rank = LowRankGrad(torch.randn(3, 4, 5, generator=g), torch.randn(3, 5, 6, generator=g))
    bias_grad, active = torch.randn(3, 4, generator=g), torch.tensor([1.0, 0.0, 1.0])
    low_rank.left[1] = 0  # a finished client's gradient is zero (its loss is weighted by 0)
    algorithm = make_algorithm(mode)
    context = {}
    if mode == "scaffold":  # c - c_i per client
        c_i = [torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, generator=g)]
        server = {"c": [torch.randn(4, 6, generator=g), torch.randn(4, generator=g)]}
        context = algorithm.client_context(server, {"c": c_i}, anchor)
    full = [w.clone(), bias.clone()]
    step_update(full, [low_rank.materialize(), bias_grad.clone()], anchor, algorithm, context, active)
    fused = [w.clone(), bias.clone()]
    step_update(fused, [low_rank, bias_grad.clone()], anchor, algorithm, context, active)
    assert_same(fused, full, atol=1e-6)
    assert torch.equal(fused[0][1], w[1])  # the finished client did not move
    assert not torch.equal(fused[0][0], w[0])


@pytest.mark.parametrize("mode", ["fedavg", "fedprox", "scaffold"])
def test_bias_free_dense_layers_first_in_the_model_train_as_in_sequential(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """BatchedLinear layers whose input needs no gradient and that have no bias: nothing
    of theirs but the weight is differentiated, so they hand back a full gradient."""
    from fltool.engines.vectorized import batched_nets

    monkeypatch.setattr(batched_nets, "BATCHED_LINEAR_MIN_WEIGHTS", 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 12, bias=False), nn.ReLU(), nn.Linear(12, 10, bias=False))
    seq, vec = both_engines(model, mode, make_clients((1, 8, 8)))
    assert vec.total_weight == expected_weight(mode, SIZES)
    assert_same_outcome(vec, seq)
