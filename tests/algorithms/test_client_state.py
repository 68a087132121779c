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


def transposed(rows: torch.Tensor) -> torch.Tensor:
    """rows (M, O, I) laid out as the vectorized engine lays out a Linear layer's
    stacked weight (its gradient's layout): (M, I, O) in memory."""
    return rows.transpose(1, 2).contiguous().transpose(1, 2)


def test_the_table_takes_the_layout_of_the_rows_written_and_rows_come_out_in_it():
    """Values never change, only strides: reads and writes then sweep memory linearly."""
    store = ClientStore(initial(), 5, CPU)
    values = torch.arange(2 * 6.0).view(2, 2, 3)
    store.write(torch.tensor([3, 0]), {"c": [transposed(values), torch.ones(2, 3)], "s": [torch.zeros(2, 2)]})
    table = store.tables["c"][0]
    assert table.shape == (5, 2, 3) and table.stride() == (6, 1, 2)  # each row (3, 2) in memory
    got = store.rows([0, 3, 1])["c"][0]
    assert got.stride() == (6, 1, 2)
    assert torch.equal(got, torch.stack([values[1], values[0], torch.zeros(2, 3)]))
    assert store.tables["c"][1].is_contiguous()  # a bias row: nothing to lay out


def test_a_contiguous_write_does_not_flip_the_layout_back():
    """Under `launch` joined rows arrive contiguous; one round's engine rows are not: the
    table keeps the first non-contiguous layout instead of copying itself every round."""
    store = ClientStore(initial(), 4, CPU)
    first = torch.randn(1, 2, 3)
    store.write(torch.tensor([1]), {"c": [transposed(first), torch.zeros(1, 3)], "s": [torch.zeros(1, 2)]})
    table = store.tables["c"][0]
    second = torch.randn(2, 2, 3)
    store.write(torch.tensor([2, 0]), {"c": [second, torch.zeros(2, 3)], "s": [torch.zeros(2, 2)]})
    assert store.tables["c"][0] is table and table.stride() == (6, 1, 2)
    assert torch.equal(store.rows([0, 1, 2])["c"][0], torch.stack([second[1], first[0], second[0]]))


def test_a_relaid_table_round_trips_through_state_dict():
    store = ClientStore(initial(), 3, CPU)
    store.write(torch.tensor([2]), {"c": [transposed(torch.randn(1, 2, 3)), torch.ones(1, 3)], "s": [torch.ones(1, 2)]})
    saved = {k: [t.clone() for t in v] for k, v in store.state_dict().items()}
    fresh = ClientStore(initial(), 3, CPU)
    fresh.load_state_dict(saved)
    for name in ("c", "s"):
        assert all(torch.equal(a, b) for a, b in zip(fresh.rows(range(3))[name], store.rows(range(3))[name]))


def test_rows_with_gaps_or_overlaps_leave_the_layout_alone():
    store = ClientStore(initial(), 3, CPU)
    wide = torch.randn(2, 2, 6)[:, :, ::2]  # every other element: gaps
    broadcast = torch.randn(2, 3).unsqueeze(0).expand(2, 2, 3)  # overlapping rows
    store.write(torch.tensor([0, 1]), {"c": [wide, torch.zeros(2, 3)], "s": [torch.zeros(2, 2)]})
    store.write(torch.tensor([0, 2]), {"c": [broadcast, torch.zeros(2, 3)], "s": [torch.zeros(2, 2)]})
    assert store.tables["c"][0].is_contiguous()
    assert torch.equal(store.rows([1])["c"][0], wide[1:])
    assert torch.equal(store.rows([0, 2])["c"][0], broadcast)


def test_the_first_relayout_rebuilds_from_the_initial_row_and_loading_keeps_the_saved_layout():
    """Before any write every row is the initial one: the table is rebuilt in the new
    layout from it rather than copied (a large table never exists twice). A checkpoint
    keeps the layout (torch.save keeps strides), so a resumed store starts in it."""
    start = {"c": [torch.full((2, 3), 0.5)]}
    store = ClientStore(start, 4, CPU)
    new = torch.randn(1, 2, 3)
    store.write(torch.tensor([2]), {"c": [transposed(new)]})
    table = store.tables["c"][0]
    assert table.stride() == (6, 1, 2)
    assert torch.equal(table, torch.stack([torch.full((2, 3), 0.5)] * 2 + [new[0], torch.full((2, 3), 0.5)]))
    saved = {k: [t.clone() for t in v] for k, v in store.state_dict().items()}
    assert saved["c"][0].stride() == (6, 1, 2)  # (clone keeps a dense layout)
    fresh = ClientStore(start, 4, CPU)
    fresh.load_state_dict(saved)
    loaded = fresh.tables["c"][0]
    assert loaded.stride() == (6, 1, 2) and torch.equal(loaded, table)
    fresh.write(torch.tensor([0]), {"c": [transposed(torch.ones(1, 2, 3))]})
    assert fresh.tables["c"][0] is loaded  # no relayout after a resume
    contiguous = ClientStore(start, 4, CPU)
    contiguous.load_state_dict({"c": [table.contiguous()]})  # a checkpoint of the sequential engine
    assert contiguous.tables["c"][0].is_contiguous() and torch.equal(contiguous.tables["c"][0], table)
    contiguous.write(torch.tensor([1]), {"c": [transposed(new)]})  # written already: one copy
    assert contiguous.tables["c"][0].stride() == (6, 1, 2)
    assert torch.equal(contiguous.rows([1, 2])["c"][0], torch.cat([new, new]))
