from __future__ import annotations

import torch

from fltool.algorithms import WeightedSum, server_update, weighted_average
from fltool.algorithms.aggregate import client_weighted_sum
from fltool.algorithms.sampling import cohort_size, generator_for, sample_clients


def test_weighted_average_equals_hand_computation():
    w1 = [torch.tensor([1.0, 2.0]), torch.tensor([[10.0]])]
    w2 = [torch.tensor([3.0, 6.0]), torch.tensor([[20.0]])]
    w3 = [torch.tensor([5.0, 0.0]), torch.tensor([[40.0]])]
    avg = weighted_average([w1, w2, w3], [100, 300, 600])
    # n = 1000: 0.1*w1 + 0.3*w2 + 0.6*w3
    assert torch.allclose(avg[0], torch.tensor([0.1 * 1 + 0.3 * 3 + 0.6 * 5, 0.1 * 2 + 0.3 * 6 + 0.6 * 0]))
    assert torch.allclose(avg[1], torch.tensor([[0.1 * 10 + 0.3 * 20 + 0.6 * 40]]))


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
    acc = WeightedSum([torch.zeros(4, 5)])
    acc.add_stacked([transposed], [1.0, 3.0, 6.0])
    torch.testing.assert_close(acc.average()[0], sum(w * s for w, s in zip(weights, transposed)) / 10)


def test_server_update_interpolates_with_server_lr():
    w = [torch.tensor([1.0, 1.0])]
    avg = [torch.tensor([3.0, -1.0])]
    assert torch.equal(server_update(w, avg, 1.0)[0], avg[0])
    assert torch.allclose(server_update(w, avg, 0.5)[0], torch.tensor([2.0, 0.0]))


def test_sample_clients_draws_round_c_k_distinct_clients():
    assert cohort_size(100, 0.1) == 10 and cohort_size(100, 0.001) == 1 and cohort_size(7, 1.0) == 7
    ids = sample_clients(100, 0.1, generator_for(0, "sample", 1))
    assert len(ids) == 10 == len(set(ids)) and ids == sorted(ids) and all(0 <= k < 100 for k in ids)
    assert ids == sample_clients(100, 0.1, generator_for(0, "sample", 1))
    assert ids != sample_clients(100, 0.1, generator_for(0, "sample", 2))
