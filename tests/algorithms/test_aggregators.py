"""Aggregators: the weighted mean (McMahan et al. 2017's sum_k n_k/n Delta_k, streamed
chunk by chunk) and the coordinate-wise median (Yin et al. 2018, "Byzantine-Robust
Distributed Learning", the coordinate-wise median estimator), with extras (FedNova's
tau, SCAFFOLD's Delta c) always the weighted mean."""

from __future__ import annotations

import pytest
import torch

from fltool.algorithms import AGGREGATORS, Upload
from fltool.algorithms.aggregators import MeanAggregator, MedianAggregator, client_weighted_sum, coordinate_median
from fltool.config.schema import AggregatorConfig
from fltool.distributed.comm import Comm


def upload(deltas, weights, extras=None):
    return Upload(delta=[torch.tensor(d) for d in deltas], weight=torch.tensor(weights), extras=extras or {})


def test_registered_names():
    assert AGGREGATORS.get("mean") is MeanAggregator and AGGREGATORS.get("median") is MedianAggregator


def test_stacked_sum_in_any_layout_equals_the_per_client_sum():
    """A batched engine's stacks can hold per-client transposed matrices; the sum must
    read them by index, not by memory order."""
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([1.0, 3.0, 6.0])
    plain = torch.randn(3, 4, 5, generator=g)
    transposed = torch.randn(3, 5, 4, generator=g).transpose(1, 2)  # (3, 4, 5), strides (20, 1, 4)
    sliced = torch.randn(3, 4, 10, generator=g)[:, :, ::2]  # not dense: the fallback path
    for stack in (plain, transposed, sliced, torch.randn(3, 7, generator=g)):
        expected = sum(w * s for w, s in zip(weights, stack))
        torch.testing.assert_close(client_weighted_sum(weights, stack), expected)


def test_mean_is_the_weighted_average_streamed_over_chunks():
    """sum_k n_k Delta_k / sum_k n_k with n = (100, 300, 600), the cohort arriving as a
    chunk of two clients and then one (as the vectorized engine sends it)."""
    agg = MeanAggregator(AggregatorConfig())
    agg.add(torch.tensor([0, 1]), upload([[[1.0, 2.0], [3.0, 6.0]], [[10.0], [20.0]]], [100.0, 300.0], {"tau": [torch.tensor([2.0, 4.0])]}))
    agg.add(torch.tensor([2]), upload([[[5.0, 0.0]], [[40.0]]], [600.0], {"tau": [torch.tensor([10.0])]}))
    loss = torch.tensor(7.0)
    out = agg.reduce(Comm(), [loss], clients=3, num_clients=9)
    torch.testing.assert_close(out.delta[0], torch.tensor([0.1 * 1 + 0.3 * 3 + 0.6 * 5, 0.1 * 2 + 0.3 * 6 + 0.6 * 0]))
    torch.testing.assert_close(out.delta[1], torch.tensor([0.1 * 10 + 0.3 * 20 + 0.6 * 40]))
    torch.testing.assert_close(out.extras["tau"][0], torch.tensor(0.1 * 2 + 0.3 * 4 + 0.6 * 10))
    assert (out.clients, out.num_clients) == (3, 9) and loss.item() == 7.0


def test_coordinate_median_odd_and_even_counts():
    """Odd: the middle value per coordinate. Even: the mean of the two middle values
    (torch.median alone would return the lower one)."""
    odd = torch.tensor([[1.0, 9.0], [5.0, -1.0], [3.0, 4.0]])
    torch.testing.assert_close(coordinate_median(odd), torch.tensor([3.0, 4.0]))
    even = torch.tensor([[1.0, 9.0], [5.0, -1.0], [3.0, 4.0], [10.0, 0.0]])
    torch.testing.assert_close(coordinate_median(even), torch.tensor([(3.0 + 5.0) / 2, (0.0 + 4.0) / 2]))
    assert not torch.equal(coordinate_median(even), even.median(dim=0).values)
    torch.testing.assert_close(coordinate_median(torch.tensor([[2.0, -3.0]])), torch.tensor([2.0, -3.0]))
    two_by_two = torch.arange(8.0).view(2, 2, 2)
    torch.testing.assert_close(coordinate_median(two_by_two), torch.tensor([[2.0, 3.0], [4.0, 5.0]]))


def test_median_aggregator_is_unweighted_and_keeps_extras_weighted():
    """Deltas: coordinate-wise median over every client of every chunk, ignoring the
    weights; extras: the weighted mean all the same."""
    agg = MedianAggregator(AggregatorConfig(name="median"))
    agg.add(torch.tensor([0, 1]), upload([[[1.0, 9.0], [5.0, -1.0]]], [1.0, 1.0], {"c": [torch.tensor([[1.0], [2.0]])]}))
    agg.add(torch.tensor([2, 3]), upload([[[3.0, 4.0], [10.0, 0.0]]], [1.0, 5.0], {"c": [torch.tensor([[3.0], [4.0]])]}))
    out = agg.reduce(Comm(), [], clients=4, num_clients=4)
    torch.testing.assert_close(out.delta[0], torch.tensor([4.0, 2.0]))
    torch.testing.assert_close(out.extras["c"][0], torch.tensor([(1 + 2 + 3 + 5 * 4) / 8.0]))


def test_median_ignores_one_outlier_client_the_mean_does_not():
    """Four honest clients near (1, -1) and one sending 1e6: the median stays within the
    honest clients' range; the mean is dragged away."""
    honest = [[1.0, -1.0], [1.2, -0.9], [0.9, -1.1], [1.1, -1.05]]
    deltas = [[d] for d in honest] + [[[1e6, -1e6]]]
    mean, median = MeanAggregator(AggregatorConfig()), MedianAggregator(AggregatorConfig(name="median"))
    for k, d in enumerate(deltas):
        for agg in (mean, median):
            agg.add(torch.tensor([k]), Upload(delta=[torch.tensor(d)], weight=torch.tensor([10.0])))
    got = median.reduce(Comm(), [], 5, 5).delta[0]
    torch.testing.assert_close(got, torch.tensor([1.1, -1.05]))  # the 3rd of 5 sorted values
    assert abs(mean.reduce(Comm(), [], 5, 5).delta[0][0].item()) > 1e5


def test_median_in_the_real_round_is_x_plus_the_median_client_update(fl, engine):
    """FedAvg with the median aggregator: x+ = x + median_k (w_k - x), per coordinate,
    over an odd cohort of 3 (and, as the mean of the two middle ones, an even one of 4)."""
    clients = fl.make_clients([3, 6, 4, 5])
    cfg = fl.make_config(4, aggregator={"name": "median"}, local_epochs=2, lr=0.4)
    for cohort in ([0, 1, 2], [0, 1, 2, 3]):
        run = fl.run_rounds(cfg, fl.linear_model(), clients, [cohort], engine)
        x = run.history[0]
        updates = [[w - xi for w, xi in zip(fl.local_sgd(x, clients[k], [torch.arange(clients[k].n)] * 2, 0.4), x)] for k in cohort]
        for i, xi in enumerate(x):
            stack = torch.stack([u[i] for u in updates]).sort(dim=0).values
            mid = len(cohort) // 2
            median = stack[mid] if len(cohort) % 2 else (stack[mid - 1] + stack[mid]) / 2
            torch.testing.assert_close(run.final[i], xi + median, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mean", "median"])
def test_an_empty_share_still_reduces(name):
    """A rank whose share of a small cohort is empty still calls add (with no clients)."""
    agg = AGGREGATORS.get(name)(AggregatorConfig(name=name))
    agg.add(torch.zeros(0, dtype=torch.long), Upload(delta=[torch.zeros(0, 2)], weight=torch.zeros(0), extras={"tau": [torch.zeros(0)]}))
    agg.add(torch.tensor([4]), Upload(delta=[torch.tensor([[2.0, 4.0]])], weight=torch.tensor([3.0]), extras={"tau": [torch.tensor([5.0])]}))
    out = agg.reduce(Comm(), [], 1, 3)
    torch.testing.assert_close(out.delta[0], torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(out.extras["tau"][0], torch.tensor(5.0))
