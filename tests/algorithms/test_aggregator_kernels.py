"""The fast kernels under the robust aggregators against the plain torch they replace:
the CPU sort along the clients, Bulyan's window search, and Krum's float32 Gram with
its float64 fallback."""

from __future__ import annotations

import pytest
import torch

from fltool.algorithms.aggregators import bulyan, krum
from fltool.algorithms.aggregators.order import COLUMNS_PER_BLOCK, reduce_sorted, sort_over_clients


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (5, 3), (100, 2 * COLUMNS_PER_BLOCK + 17), (6, 3, 4, 5)])
def test_sort_over_clients_equals_torch_sort(dtype, shape):
    torch.manual_seed(0)
    stacked = torch.randn(shape).to(dtype)
    flat = stacked.view(shape[0], -1)
    if flat.shape[1] > 3 and shape[0] > 2:  # specials sort like torch sorts them: NaN last
        flat[0, 0], flat[1, 1], flat[2, 2], flat[1, 0] = float("nan"), float("inf"), float("-inf"), float("nan")
    got = sort_over_clients(stacked)
    assert got.dtype == dtype and got.shape == stacked.shape
    torch.testing.assert_close(got, stacked.sort(dim=0).values, rtol=0, atol=0, equal_nan=True)


def test_sort_over_clients_of_a_non_contiguous_stack():
    stacked = torch.randn(7, 9).T  # (9, 7) with strides (1, 9)
    torch.testing.assert_close(sort_over_clients(stacked), stacked.sort(dim=0).values, rtol=0, atol=0)


def nearest_to_median_by_definition(selected: torch.Tensor, beta: int) -> torch.Tensor:
    """Sort each coordinate's values by distance to the median, keep `beta`, average."""
    median = selected.quantile(0.5, dim=0)  # the mean of the two middle values for an even count
    order = (selected - median).abs().argsort(dim=0, stable=True)[:beta]
    return selected.gather(0, order).mean(dim=0)


@pytest.mark.parametrize(("theta", "beta"), [(5, 3), (98, 96), (10, 4), (9, 1)])
def test_bulyan_window_equals_the_nearest_values_to_the_median(theta, beta):
    torch.manual_seed(theta)
    selected = torch.randn(theta, 300, dtype=torch.float64) * torch.rand(300, dtype=torch.float64) * 10
    torch.testing.assert_close(
        bulyan.closest_to_median_mean(selected, beta), nearest_to_median_by_definition(selected, beta)
    )


def test_bulyan_window_keeps_an_infinite_value_out():
    col = torch.tensor([[float("-inf")], [1.0], [2.0], [3.0], [float("inf")]])
    torch.testing.assert_close(bulyan.closest_to_median_mean(col, 3), torch.tensor([2.0]))


def exact_distances(updates: torch.Tensor) -> torch.Tensor:
    x = updates.double()
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


def test_float32_distances_match_the_exact_ones():
    torch.manual_seed(0)
    updates = torch.randn(12, 3 * krum.BLOCK + 5) * 0.01 + torch.randn(12, 1) * 0.001
    torch.testing.assert_close(krum.pairwise_sq_distances(updates), exact_distances(updates), rtol=1e-4, atol=0)


def test_close_updates_fall_back_to_float64(monkeypatch):
    """Rows 1e-4 apart around a common vector of norm ~300: float32 products would lose
    every digit of the distance; the fallback keeps them."""
    torch.manual_seed(0)
    base = torch.randn(1, 100_000)
    updates = base + 1e-4 * torch.randn(6, 100_000)
    seen = []
    real = krum._gram
    monkeypatch.setattr(krum, "_gram", lambda u, products: seen.append(products) or real(u, products))
    exact = exact_distances(updates)
    torch.testing.assert_close(krum.pairwise_sq_distances(updates), exact, rtol=1e-4, atol=0)
    assert seen == [torch.float32, torch.float64]
    float32_only = krum._distances(real(updates, torch.float32))
    assert ((float32_only - exact).abs() > 0.1 * exact).any()


def test_overflowing_updates_fall_back_to_float64():
    updates = torch.tensor([[1e30, -1e30], [0.0, 1.0], [1.0, 0.0]])
    dist = krum.pairwise_sq_distances(updates)
    assert dist.isfinite().all() and dist[1, 2] == 2.0 and dist[0, 1] > 1e60


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduce_sorted_over_chosen_rows(dtype):
    torch.manual_seed(1)
    stacked = torch.randn(9, 2, COLUMNS_PER_BLOCK + 3).to(dtype)
    rows = torch.tensor([0, 2, 3, 7])
    got = reduce_sorted(stacked, lambda ordered: ordered[1:3].sum(dim=0), rows=rows)
    torch.testing.assert_close(got, stacked[rows].sort(dim=0).values[1:3].sum(dim=0))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_reduce_sorted_is_the_same_on_any_number_of_threads(threads):
    """The blocks go to a thread pool when torch has more than one thread (the suite runs
    with one: OMP_NUM_THREADS=1), and come back in column order."""
    stacked = torch.randn(7, 3 * COLUMNS_PER_BLOCK + 5, generator=torch.Generator().manual_seed(threads))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = reduce_sorted(stacked, lambda ordered: ordered[2:5].mean(dim=0), rows=torch.tensor([0, 2, 3, 5, 6]))
    finally:
        torch.set_num_threads(before)
    expected = stacked[[0, 2, 3, 5, 6]].sort(dim=0).values[2:5].mean(dim=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
