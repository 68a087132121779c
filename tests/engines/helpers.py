"""Run one cohort through an engine the way the trainer does, and compare the results.

`cohort_mean` builds the round's `CohortJob` as `fltool.trainers.federated.train_round`
does (context from the algorithm's server state and the clients' state rows, uploads
into a mean aggregator, new state rows kept), but stops before the server update: what
the engines are responsible for is everything up to the aggregate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fltool.algorithms import ALGORITHMS, Aggregate, ClientStore, FedAvg, Stacked, Upload
from fltool.algorithms.aggregators import MeanAggregator
from fltool.config.schema import AggregatorConfig, FederatedConfig
from fltool.distributed.comm import Comm
from fltool.engines import ClientData, CohortJob, Engine

# sizes that leave partial last batches for B=5, a client of one example, and clients
# whose schedules end at different steps
SIZES = [7, 23, 16, 40, 1, 12]
EQUAL_SIZES = [12] * 6
NUM_CLIENTS = 10  # clients in the federation (the tests' cohorts use ids 0..len-1)

# name -> (registered algorithm, its config's settings); every one at E=2, B=5, lr 0.1
# (FedSGD: one full-batch step)
ALGORITHM_SETTINGS: dict[str, tuple[str, dict]] = {
    "fedavg": ("fedavg", {}),
    "fedsgd": ("fedsgd", {}),
    "fedprox": ("fedprox", {"mu": 0.5}),
    "scaffold": ("scaffold", {"option": 2}),
    "scaffold1": ("scaffold", {"option": 1}),
    "fednova": ("fednova", {}),
}
BASIC = ["fedavg", "fedprox", "fedsgd"]  # the algorithms the engines were first tested with
ALL = list(ALGORITHM_SETTINGS)


def make_algorithm(name: str, epochs: int = 2, batch_size: int | None = 5, lr: float = 0.1) -> FedAvg:
    registered, settings = ALGORITHM_SETTINGS.get(name, (name, {}))
    config = ALGORITHMS.config_class(registered)(name=registered, **settings)
    federated = FederatedConfig(local_epochs=epochs, batch_size=batch_size, lr=lr)
    return ALGORITHMS.get(registered)(config, federated)


def make_clients(shape: tuple[int, ...], sizes: Sequence[int] = SIZES) -> list[ClientData]:
    g = torch.Generator().manual_seed(1)
    return [ClientData(i, torch.randn((n, *shape), generator=g), torch.randint(10, (n,), generator=g)) for i, n in enumerate(sizes)]


def global_params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a: Sequence[Tensor], b: Sequence[Tensor], atol: float = 1e-5, rtol: float = 1e-4) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


@dataclass
class AlgorithmState:
    """The algorithm's server state and every client's state rows, as the trainer keeps them."""

    server: dict[str, list[Tensor]]
    clients: ClientStore


def initial_state(algorithm: FedAvg, params: Sequence[Tensor], num_clients: int = NUM_CLIENTS, scale: float = 0.0) -> AlgorithmState:
    """The algorithm's initial state; `scale` > 0 fills every state tensor with random
    values of that size instead (SCAFFOLD's c and c_i, as after some rounds), so that a
    single round already exercises what the state does to the local steps."""
    server = algorithm.init_server_state(params)
    store = ClientStore(algorithm.init_client_state(params), num_clients, params[0].device)
    if scale > 0:
        g = torch.Generator().manual_seed(7)
        for ts in (*server.values(), *store.tables.values()):
            for t in ts:
                t.copy_(scale * torch.randn(t.shape, generator=g))
    return AlgorithmState(server, store)


@dataclass
class CohortOutcome:
    aggregate: Aggregate
    loss_sum: Tensor
    total_weight: float  # sum of the uploads' weights
    ids: list[int]  # every uploaded client id, in upload order
    rows: Stacked = field(default_factory=dict)  # new client state rows, ordered by client id

    @property
    def delta(self) -> list[Tensor]:
        return self.aggregate.delta

    def mean_model(self, params: Sequence[Tensor]) -> list[Tensor]:
        """global + the aggregate's mean delta: for the mean aggregator and FedAvg's
        weights, the weighted mean of the client models (the old `weighted.average()`)."""
        return [p + d for p, d in zip(params, self.aggregate.delta, strict=True)]


def cohort_mean(
    engine: Engine,
    params: Sequence[Tensor],
    clients: Sequence[ClientData],
    algorithm: FedAvg,
    round_: int,
    state: AlgorithmState | None = None,
) -> CohortOutcome:
    """Train `clients` for round `round_` and aggregate their uploads with the mean
    aggregator; the clients' new state rows are returned, not stored."""
    state = state or initial_state(algorithm, params)
    aggregator = MeanAggregator(AggregatorConfig())
    ids: list[int] = []
    weights: list[Tensor] = []
    new_rows: list[tuple[Tensor, Stacked]] = []

    def context_for(chunk_ids: list[int]) -> Stacked:
        return algorithm.client_context(state.server, state.clients.rows(chunk_ids), params)

    def collect(chunk_ids: Tensor, upload: Upload) -> None:
        assert upload.weight.shape == chunk_ids.shape
        assert all(d.shape[0] == chunk_ids.shape[0] for d in upload.delta)
        aggregator.add(chunk_ids, upload)
        ids.extend(chunk_ids.tolist())
        weights.append(upload.weight.detach().sum())
        if upload.state:
            new_rows.append((chunk_ids, upload.state))

    loss_sum = engine.train_cohort(params, clients, CohortJob(algorithm, round_, context_for, collect))
    aggregate = aggregator.reduce(Comm(), [], len(clients), state.clients.num_clients)
    rows: Stacked = {}
    if new_rows:
        order = torch.cat([i for i, _ in new_rows]).argsort()
        for name in new_rows[0][1]:
            columns = zip(*(r[name] for _, r in new_rows), strict=True)
            rows[name] = [torch.cat(parts)[order.to(parts[0].device)] for parts in columns]
    return CohortOutcome(aggregate, loss_sum, float(sum(weights)) if weights else 0.0, ids, rows)


def assert_same_outcome(a: CohortOutcome, b: CohortOutcome, atol: float = 1e-5, rtol: float = 1e-4, loss: bool = True) -> None:
    """Two engines' cohorts agree: the mean update, every extra, every client's new
    state row, the weights, and the loss sum."""
    assert sorted(a.ids) == sorted(b.ids)
    assert a.total_weight == b.total_weight
    assert_same(a.delta, b.delta, atol=atol, rtol=rtol)
    assert set(a.aggregate.extras) == set(b.aggregate.extras)
    for name in a.aggregate.extras:
        assert_same(a.aggregate.extras[name], b.aggregate.extras[name], atol=atol, rtol=rtol)
    assert set(a.rows) == set(b.rows)
    for name in a.rows:
        assert_same(a.rows[name], b.rows[name], atol=atol, rtol=rtol)
    if loss:
        torch.testing.assert_close(a.loss_sum, b.loss_sum, rtol=10 * rtol, atol=10 * atol)


def relative_update_error(a: Sequence[Tensor], b: Sequence[Tensor], start: Sequence[Tensor] | None = None) -> float:
    """The largest ||a - b|| / ||a - start|| over the tensors: how far apart two updates
    (or, with `start` None, two deltas: ||a - b|| / ||a||) are."""
    if start is None:
        return max(((x - y).norm() / x.norm()).item() for x, y in zip(a, b, strict=True))
    return max(((x - y).norm() / (x - s).norm()).item() for x, y, s in zip(a, b, start, strict=True))
