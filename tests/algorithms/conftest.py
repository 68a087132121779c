"""A tiny federated problem that the algorithm tests check by hand.

The model is a linear softmax classifier (Flatten + Linear(4, 3)) and each client holds
a handful of examples, so every expected value can be recomputed in the test with
plain torch (`Reference`), written out from the papers' equations, independently of
the code under test. `FL.run` drives the real round (`train_round`: engine, algorithm
hooks, aggregator, client-state store, server optimizer) on chosen cohorts, as
`train_federated` does, without data sets or run directories.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fltool.algorithms import FedAvg, LocalRule
from fltool.config import Config, config_from_dict
from fltool.distributed.comm import Comm
from fltool.engines import ClientData, make_engine
from fltool.engines.base import client_batches
from fltool.trainers.federated import FederatedState, build_algorithm, train_round

D_IN, CLASSES = 4, 3
SEED = 0


@pytest.fixture(autouse=True)
def _tiny_tensors(one_thread):
    """Every test here runs on one torch thread (see `one_thread`)."""


@pytest.fixture(params=["sequential", "vectorized"])
def engine(request: pytest.FixtureRequest) -> str:
    """Every algorithm's hooks run with M = 1 (sequential) and M = a chunk (vectorized)."""
    return request.param


def linear_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D_IN, CLASSES))
    with torch.no_grad():  # weights of order 1, so a few steps move them visibly
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def make_clients(sizes: Sequence[int], seed: int = 1) -> list[ClientData]:
    g = torch.Generator().manual_seed(seed)
    return [
        ClientData(k, torch.randn(n, 1, 2, 2, generator=g), torch.randint(CLASSES, (n,), generator=g))
        for k, n in enumerate(sizes)
    ]


def make_config(
    num_clients: int,
    algorithm: dict[str, Any] | None = None,
    server_optimizer: dict[str, Any] | None = None,
    aggregator: dict[str, Any] | None = None,
    **federated: Any,
) -> Config:
    fed = {"num_clients": num_clients, "fraction": 1.0, "local_epochs": 1, "batch_size": None, "lr": 0.3, **federated}
    raw: dict[str, Any] = {"seed": SEED, "device": "cpu", "data": {"dataset": "synthetic"}, "federated": fed}
    for key, section in (("algorithm", algorithm), ("server_optimizer", server_optimizer), ("aggregator", aggregator)):
        if section is not None:
            raw[key] = section
    return config_from_dict(raw, "test")


class Run:
    """The global model after each round and the run's state (server, clients, optimizer)."""

    def __init__(self, history: list[list[Tensor]], state: FederatedState, algorithm: FedAvg) -> None:
        self.history = history  # history[0] = initial model, history[r] after round r
        self.state = state
        self.algorithm = algorithm

    @property
    def final(self) -> list[Tensor]:
        return self.history[-1]


def run_rounds(
    cfg: Config, model: nn.Module, clients: Sequence[ClientData], cohorts: Sequence[Sequence[int]], engine: str = "sequential"
) -> Run:
    """Rounds 1, 2, ... with the given cohorts (client ids), as `train_federated` runs them."""
    device = torch.device("cpu")
    algorithm = build_algorithm(cfg)
    eng = make_engine(engine, model, cfg.seed, max_parallel_clients=None, cuda_graphs=False)
    params = [p.detach().clone() for p in model.parameters()]
    state = FederatedState(cfg, algorithm, params, device)
    history = [[p.clone() for p in params]]
    for r, cohort in enumerate(cohorts, start=1):
        mine = [clients[k] for k in cohort]
        new, _, _ = train_round(eng, algorithm, state, params, mine, r, cfg, Comm(), len(cohort))
        with torch.no_grad():
            torch._foreach_copy_(params, new)
        history.append([p.clone() for p in params])
    return Run(history, state, algorithm)


# ---- the independent reference: plain torch on (W, b) -------------------------------


def logits(w: Sequence[Tensor], x: Tensor) -> Tensor:
    weight, bias = w
    return x.flatten(1) @ weight.T + bias


def ce_gradient(w: Sequence[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    """The gradient of the mean cross-entropy over (x, y) at w."""
    leaves = [t.detach().clone().requires_grad_(True) for t in w]
    return [g.detach() for g in torch.autograd.grad(F.cross_entropy(logits(leaves, x), y), leaves)]


def schedule(cfg: Config, rule: LocalRule, round_: int, client: ClientData) -> list[Tensor]:
    """Client k's minibatches in round r: full batch (all examples, E times) needs no
    draw; with B set, the seeded per-(round, client) permutations every engine shares."""
    if rule.batch_size is None:
        return [torch.arange(client.n)] * rule.epochs
    return client_batches(cfg.seed, round_, client, rule)


def local_sgd(
    w0: Sequence[Tensor],
    client: ClientData,
    batches: Sequence[Tensor],
    lr: float,
    extra: Callable[[list[Tensor]], Sequence[Tensor]] | None = None,
) -> list[Tensor]:
    """w <- w - lr * (grad CE on the batch + extra(w)) for every batch in order."""
    w = [t.clone() for t in w0]
    for idx in batches:
        g = ce_gradient(w, client.x[idx], client.y[idx])
        if extra is not None:
            g = [gi + ei for gi, ei in zip(g, extra(w))]
        w = [wi - lr * gi for wi, gi in zip(w, g)]
    return w


def assert_params_close(got: Sequence[Tensor], want: Sequence[Tensor], rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


class FL:
    """The helpers above, for tests (pytest's importlib mode keeps conftest out of imports)."""

    linear_model = staticmethod(linear_model)
    make_clients = staticmethod(make_clients)
    make_config = staticmethod(make_config)
    run_rounds = staticmethod(run_rounds)
    logits = staticmethod(logits)
    ce_gradient = staticmethod(ce_gradient)
    schedule = staticmethod(schedule)
    local_sgd = staticmethod(local_sgd)
    assert_params_close = staticmethod(assert_params_close)


@pytest.fixture
def fl() -> type[FL]:
    return FL
