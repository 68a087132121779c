"""The vectorized engine computes what the sequential engine computes, only batched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fltool.algorithms import LocalRule
from fltool.config import config_from_dict
from fltool.engines.vectorized.batched_nets import make_batched_apply, supports
from fltool.engines.vectorized.batched_step import plan_chunk
from fltool.engines.vectorized.chunking import auto_chunk_size, step_bytes_per_client
from fltool.run.checkpoint import load_checkpoint
from fltool.engines.sequential import ClientData, SequentialEngine, client_batches, make_apply_fn, make_engine
from fltool.trainers.federated import train_federated
from fltool.run.rundir import last_checkpoint
from fltool.engines.vectorized.engine import VectorizedEngine, chunks
from fltool.errors import FltoolError
from fltool.models import build_model

# sizes that leave partial last batches for B=5, a client of one example, and clients
# whose schedules end at different steps
SIZES = [7, 23, 16, 40, 1, 12]
RULES = {
    "fedavg": LocalRule(epochs=2, batch_size=5, lr=0.1),
    "fedprox": LocalRule(epochs=2, batch_size=5, lr=0.1, mu=0.5),
    "fedsgd": LocalRule(epochs=1, batch_size=None, lr=0.1),
}


def make_clients(shape: tuple[int, ...], sizes: list[int] = SIZES) -> list[ClientData]:
    g = torch.Generator().manual_seed(1)
    return [ClientData(i, torch.randn((n, *shape), generator=g), torch.randint(10, (n,), generator=g)) for i, n in enumerate(sizes)]


def global_params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("mode", RULES)
@pytest.mark.parametrize("model_name", ["mlp", "cnn_small"])
def test_cohort_matches_sequential(mode: str, model_name: str) -> None:
    torch.manual_seed(0)
    model = build_model(model_name, (1, 8, 8), 10)
    clients, params = make_clients((1, 8, 8)), global_params(model)
    seq = SequentialEngine(model, seed=3).train_cohort(params, clients, RULES[mode], 2)
    vec = VectorizedEngine(model, seed=3).train_cohort(params, clients, RULES[mode], 2)
    assert vec.weighted.total == seq.weighted.total == sum(SIZES)
    assert_same(vec.weighted.average(), seq.weighted.average())
    torch.testing.assert_close(vec.loss_sum, seq.loss_sum, rtol=1e-5, atol=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(vec.weighted.average(), params))  # it trained


@pytest.mark.parametrize("mode", RULES)
def test_cohort_matches_sequential_with_every_dense_layer_batched(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's BatchedLinear (used for large layers only) trains the same cohort."""
    from fltool.engines.vectorized import batched_nets

    monkeypatch.setattr(batched_nets, "BATCHED_LINEAR_MIN_WEIGHTS", 0)
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    clients, params = make_clients((1, 8, 8)), global_params(model)
    seq = SequentialEngine(model, seed=3).train_cohort(params, clients, RULES[mode], 2)
    vec = VectorizedEngine(model, seed=3).train_cohort(params, clients, RULES[mode], 2)
    assert_same(vec.weighted.average(), seq.weighted.average())


@pytest.mark.parametrize("mode", ["fedavg", "fedprox"])
def test_vmap_fallback_matches_sequential(mode: str) -> None:
    """Models the hand-batched forward does not cover are vmap'd over functional_call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    assert not supports(model)
    clients, params = make_clients((1, 8, 8)), global_params(model)
    seq = SequentialEngine(model, seed=3).train_cohort(params, clients, RULES[mode], 2)
    vec = VectorizedEngine(model, seed=3)
    assert vec.batched_apply is None
    assert_same(vec.train_cohort(params, clients, RULES[mode], 2).weighted.average(), seq.weighted.average())


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


@pytest.mark.parametrize("chunk", [1, 2, 4])
def test_chunking_matches_whole_cohort(chunk: int) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    clients, params = make_clients((1, 8, 8)), global_params(model)
    whole = VectorizedEngine(model, seed=0).train_cohort(params, clients, RULES["fedprox"], 1)
    chunked = VectorizedEngine(model, seed=0, max_parallel_clients=chunk).train_cohort(params, clients, RULES["fedprox"], 1)
    assert_same(chunked.weighted.average(), whole.weighted.average())
    torch.testing.assert_close(chunked.loss_sum, whole.loss_sum, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_an_empty_share_of_the_cohort_adds_nothing(engine: str) -> None:
    # under `launch`, a rank gets no clients when the cohort is smaller than the world
    model = build_model("cnn_small", (1, 8, 8), 10)
    params = global_params(model)
    result = make_engine(engine, model, seed=3).train_cohort(params, [], RULES["fedavg"], 1)
    assert result.weighted.total == 0
    assert all(torch.count_nonzero(s) == 0 for s in result.weighted.sums)
    assert [s.shape for s in result.weighted.sums] == [p.shape for p in params]
    assert result.loss_sum.item() == 0


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


@pytest.mark.parametrize("mode", RULES)
def test_plan_follows_each_clients_sequential_schedule(mode: str) -> None:
    clients, rule = make_clients((2,)), RULES[mode]
    plan = plan_chunk(4, 3, clients, rule, torch.device("cpu"))
    offset = 0
    for m, client in enumerate(clients):
        expected = [b + offset for b in client_batches(4, 3, client.id, client.n, rule)]
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
    runs = [VectorizedEngine(model, seed=0).train_cohort(params, clients, RULES["fedavg"], 1) for _ in range(2)]
    assert_same(runs[0].weighted.average(), runs[1].weighted.average(), atol=0)
    assert all(torch.isfinite(p).all() for p in runs[0].weighted.average())
    seq = SequentialEngine(model, seed=0).train_cohort(params, clients, RULES["fedavg"], 1)
    delta_vec = sum((a - p).norm() for a, p in zip(runs[0].weighted.average(), params))
    delta_seq = sum((a - p).norm() for a, p in zip(seq.weighted.average(), params))
    assert 0.5 < float(delta_vec / delta_seq) < 2.0  # same size of update, different noise


def run_config(tmp_path: Path, mode: str, engine: str, **federated: object):
    raw = {
        "name": "vec",
        "mode": mode,
        "seed": 0,
        "device": "cpu",
        "data": {"dataset": "synthetic", "partition": "dirichlet", "alpha": 0.5,
                 "synthetic": {"train_size": 301, "test_size": 100, "shape": [1, 8, 8]}},
        "model": {"name": "mlp"},
        "federated": {"num_clients": 7, "fraction": 0.6, "rounds": 2, "local_epochs": 2, "batch_size": 8,
                      "lr": 0.1, "mu": 0.1, "engine": engine, **federated},
        "output": {"dir": str(tmp_path / "runs"), "run_dir": str(tmp_path / engine / mode)},
    }
    cfg = config_from_dict(raw, "test")
    run_dir = Path(cfg.output.run_dir)
    run_dir.mkdir(parents=True)
    summary = train_federated(cfg, run_dir)
    return summary, load_checkpoint(last_checkpoint(run_dir)).model


@pytest.mark.parametrize("mode", ["fedavg", "fedprox", "fedsgd"])
def test_training_run_matches_sequential(tmp_path: Path, mode: str) -> None:
    seq, seq_model = run_config(tmp_path, mode, "sequential")
    vec, vec_model = run_config(tmp_path, mode, "vectorized", max_parallel_clients=3)
    assert [r["client_ids"] for r in vec.metrics] == [r["client_ids"] for r in seq.metrics]
    for a, b in zip(vec.metrics, seq.metrics):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5)
    assert_same(list(vec_model.values()), list(seq_model.values()))


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
    rule = RULES["fedprox"]
    per_client = step_bytes_per_client(make_apply_fn(model), params, clients[3].x[:5], clients[3].y[:5])
    vec = VectorizedEngine(model, seed=3, memory_budget=2 * per_client)
    assert vec.chunk_size(params, clients, rule) == 2
    assert VectorizedEngine(model, seed=3).chunk_size(params, clients, rule) == len(clients)  # tiny model, CPU budget
    assert VectorizedEngine(model, seed=3, max_parallel_clients=4).chunk_size(params, clients, rule) == 4
    result = vec.train_cohort(params, clients, rule, 2)
    seq = SequentialEngine(model, seed=3).train_cohort(params, clients, rule, 2)
    assert_same(result.weighted.average(), seq.weighted.average())


def test_chunk_probe_leaves_the_random_state_alone() -> None:
    model = build_model("cnn_cifar", (3, 8, 8), 10).train()  # has dropout
    clients, params = make_clients((3, 8, 8), [6, 9]), global_params(model)
    state = torch.get_rng_state()
    VectorizedEngine(model, seed=0).chunk_size(params, clients, RULES["fedavg"])
    assert torch.equal(torch.get_rng_state(), state)


def test_chunk_probe_counts_the_batch_not_the_dataset_it_is_sliced_from() -> None:
    model = build_model("mlp", (1, 8, 8), 10)
    params = global_params(model)
    dataset_x, dataset_y = torch.randn(5000, 1, 8, 8), torch.randint(10, (5000,))
    sliced = step_bytes_per_client(make_apply_fn(model), params, dataset_x[:5], dataset_y[:5])
    copied = step_bytes_per_client(make_apply_fn(model), params, dataset_x[:5].clone(), dataset_y[:5].clone())
    assert sliced == copied


def test_a_chunk_out_of_device_memory_is_split_and_retried(monkeypatch) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    clients, params = make_clients((1, 8, 8)), global_params(model)
    engine = VectorizedEngine(model, seed=3)
    real_train_chunk, tried = engine.train_chunk, []

    def small_memory(global_params, chunk, rule, round_):
        tried.append(len(chunk))
        if len(chunk) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_train_chunk(global_params, chunk, rule, round_)

    monkeypatch.setattr(engine, "train_chunk", small_memory)
    result = engine.train_cohort(params, clients, RULES["fedprox"], 2)
    assert tried[:3] == [6, 3, 2] and max(tried[3:]) <= 2
    assert engine.oom_cap == 2 and engine.chunk_size(params, clients, RULES["fedprox"]) == 2  # remembered
    seq = SequentialEngine(model, seed=3).train_cohort(params, clients, RULES["fedprox"], 2)
    assert result.weighted.total == sum(SIZES)
    assert_same(result.weighted.average(), seq.weighted.average())
    torch.testing.assert_close(result.loss_sum, seq.loss_sum, rtol=1e-5, atol=1e-4)

    def no_memory(global_params, chunk, rule, round_):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine, "train_chunk", no_memory)
    with pytest.raises(torch.OutOfMemoryError):  # one client that does not fit is the user's to see
        engine.train_cohort(params, clients, RULES["fedprox"], 2)


@pytest.mark.parametrize("mode", ["fedavg", "fedprox"])
def test_a_low_rank_gradient_updates_as_its_product_would(mode: str) -> None:
    """`step_update` given a LowRankGrad (one GEMM into the weights; materialised first
    for FedProx's term) equals the update with the full gradient, finished clients still."""
    from fltool.engines.vectorized.batched_nets import LowRankGrad
    from fltool.engines.vectorized.batched_step import step_update

    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, generator=g)
    anchor = [torch.randn(4, 6, generator=g), torch.randn(4, generator=g)]
    low_rank = LowRankGrad(torch.randn(3, 4, 5, generator=g), torch.randn(3, 5, 6, generator=g))
    bias_grad, active = torch.randn(3, 4, generator=g), torch.tensor([1.0, 0.0, 1.0])
    low_rank.left[1] = 0  # a finished client's gradient is zero (its loss is weighted by 0)
    full = [w.clone(), bias.clone()]
    step_update(full, [low_rank.materialize(), bias_grad.clone()], anchor, RULES[mode], active)
    fused = [w.clone(), bias.clone()]
    step_update(fused, [low_rank, bias_grad.clone()], anchor, RULES[mode], active)
    assert_same(fused, full, atol=1e-6)
    assert torch.equal(fused[0][1], w[1])  # the finished client did not move
    assert not torch.equal(fused[0][0], w[0])


@pytest.mark.parametrize("mode", ["fedavg", "fedprox"])
def test_bias_free_dense_layers_first_in_the_model_train_as_in_sequential(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """BatchedLinear layers whose input needs no gradient and that have no bias: nothing
    of theirs but the weight is differentiated, so they hand back a full gradient."""
    from fltool.engines.vectorized import batched_nets

    monkeypatch.setattr(batched_nets, "BATCHED_LINEAR_MIN_WEIGHTS", 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 12, bias=False), nn.ReLU(), nn.Linear(12, 10, bias=False))
    clients, params = make_clients((1, 8, 8)), global_params(model)
    seq = SequentialEngine(model, seed=3).train_cohort(params, clients, RULES[mode], 2)
    vec = VectorizedEngine(model, seed=3).train_cohort(params, clients, RULES[mode], 2)
    assert vec.weighted.total == sum(SIZES)
    assert_same(vec.weighted.average(), seq.weighted.average())
