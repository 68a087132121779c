"""ClientStore: every client's persistent algorithm state (SCAFFOLD's c_i, Karimireddy
et al. 2020: each of the N clients keeps its own c_i across rounds, sampled or not)."""

from __future__ import annotations

import torch

from fltool.algorithms import ClientStore

CPU = torch.device("cpu")


def initial():
    return {"c": [torch.zeros(2, 3), torch.zeros(3)], "s": [torch.tensor([1.5, -2.0])]}


def test_every_client_starts_from_the_initial_row():
    store = ClientStore(initial(), 5, CPU)
    rows = store.rows([0, 4, 2])
    assert [t.shape for t in rows["c"]] == [(3, 2, 3), (3, 3)] and rows["s"][0].shape == (3, 2)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in rows["c"])
    assert torch.equal(rows["s"][0], torch.tensor([[1.5, -2.0]] * 3))  # a non-zero start, broadcast


def test_write_then_rows_round_trip_in_the_order_of_the_ids_and_untouched_rows_stay():
    store = ClientStore(initial(), 6, CPU)
    before = store.rows(range(6))
    new = {
        "c": [torch.arange(2 * 6.0).view(2, 2, 3), torch.tensor([[7.0, 8.0, 9.0], [-1.0, -2.0, -3.0]])],
        "s": [torch.tensor([[10.0, 11.0], [20.0, 21.0]])],
    }
    store.write(torch.tensor([4, 1]), new)
    got = store.rows([1, 4])  # the other order
    assert torch.equal(got["c"][0], new["c"][0].flip(0)) and torch.equal(got["c"][1], new["c"][1].flip(0))
    assert torch.equal(got["s"][0], torch.tensor([[20.0, 21.0], [10.0, 11.0]]))
    after = store.rows(range(6))
    for k in (0, 2, 3, 5):
        for name in ("c", "s"):
            assert all(torch.equal(a[k], b[k]) for a, b in zip(before[name], after[name]))


def test_rows_are_copies_not_views_of_the_table():
    """A hook that changes its context in place must not change the stored c_i."""
    store = ClientStore(initial(), 3, CPU)
    rows = store.rows([1])
    rows["c"][0].add_(5.0)
    assert torch.equal(store.rows([1])["c"][0], torch.zeros(1, 2, 3))


def test_state_dict_round_trip_into_a_fresh_store():
    store = ClientStore(initial(), 4, CPU)
    store.write(torch.tensor([2]), {"c": [torch.ones(1, 2, 3), torch.full((1, 3), 3.0)], "s": [torch.tensor([[0.5, 0.25]])]})
    saved = {k: [t.clone() for t in v] for k, v in store.state_dict().items()}
    assert set(saved) == {"c", "s"} and [t.shape for t in saved["c"]] == [(4, 2, 3), (4, 3)]
    assert all(t.device.type == "cpu" for ts in saved.values() for t in ts)
    fresh = ClientStore(initial(), 4, CPU)
    fresh.load_state_dict(saved)
    for name in ("c", "s"):
        assert all(torch.equal(a, b) for a, b in zip(fresh.rows(range(4))[name], store.rows(range(4))[name]))
    assert torch.equal(fresh.rows([2])["c"][1], torch.full((1, 3), 3.0))
    assert torch.equal(fresh.rows([0])["s"][0], torch.tensor([[1.5, -2.0]]))


def test_a_stateless_algorithm_keeps_an_empty_store():
    store = ClientStore({}, 10, CPU)
    assert store.rows([3, 4]) == {} and store.state_dict() == {}
    store.write(torch.tensor([3]), {})
    store.load_state_dict({})
