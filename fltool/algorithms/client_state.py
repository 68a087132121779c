"""Every client's persistent algorithm state (SCAFFOLD's c_i), for all K clients.

Rows live on the training device while the whole table fits in a fraction of its
memory, else in host memory (pinned on a CUDA machine), and a chunk's rows are copied
over when it trains. Under `launch` every rank keeps the whole table: the rows its
clients produce are all-gathered after each round, so each rank can train any client.

A table takes the memory layout of the rows written into it (`write`): the vectorized
engine's stacked weights are laid out like their gradients, transposed for a Linear
layer (`match_layout`), and rows kept in another layout cost a strided copy at every
read and write, more than all of SCAFFOLD's arithmetic at 1,000 clients
(docs/benchmarks.md). Layouts change strides, never values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fltool.algorithms.api import Stacked
from fltool.devices import host_to_device

DEVICE_FRACTION = 0.25  # of a GPU's memory that client state may take before moving to the host


def table_bytes(initial: dict[str, list[Tensor]], num_clients: int) -> int:
    return num_clients * sum(t.numel() * t.element_size() for ts in initial.values() for t in ts)


class ClientStore:
    def __init__(self, initial: dict[str, list[Tensor]], num_clients: int, device: torch.device) -> None:
        self.device = device
        self.num_clients = num_clients
        self.home = device
        if device.type == "cuda":  # (meta: a shape-only copy, to check a checkpoint against)
            budget = DEVICE_FRACTION * torch.cuda.get_device_properties(device).total_memory
            self.home = device if table_bytes(initial, num_clients) <= budget else torch.device("cpu")
        self.pin = self.home.type == "cpu" and device.type == "cuda"
        self.initial = initial
        self.written = False  # until then every row is the initial one
        self.tables: dict[str, list[Tensor]] = {name: [self._table(t) for t in ts] for name, ts in initial.items()}

    def _table(self, row: Tensor, order: list[int] | None = None, fill: bool = True) -> Tensor:
        """Every client's copy of `row` (uninitialised with `fill` False), dims nested in
        `order` (outermost first; default contiguous)."""
        shape = (self.num_clients, *row.shape)
        order = order or list(range(len(shape)))
        new = torch.zeros if fill else torch.empty
        table = new([shape[d] for d in order], dtype=row.dtype, device=self.home, pin_memory=self.pin)
        table = table.permute(*(order.index(d) for d in range(len(shape))))
        if fill and row.device.type != "meta" and bool(row.any()):  # zeros, the common start, need no pass
            table.copy_(row.to(self.home).expand_as(table))
        return table

    def rows(self, ids: Sequence[int]) -> Stacked:
        """The clients' rows, (M, ...) on the training device, in the order of `ids`."""
        index = host_to_device(torch.tensor(list(ids), dtype=torch.long), self.home)
        # t[index], not index_select: it keeps the table's row layout
        return {name: [t[index].to(self.device, non_blocking=True) for t in ts] for name, ts in self.tables.items()}

    def write(self, ids: Tensor, rows: Stacked) -> None:
        index = ids.to(self.home, torch.long)
        for name, ts in self.tables.items():
            if len(rows[name]) != len(ts):
                raise ValueError(f"{name}: {len(rows[name])} tensors written to a table of {len(ts)}")
            for j, new in enumerate(rows[name]):
                order = layout_to_adopt(ts[j], new)
                if order is not None:
                    self._relay(name, j, order)
                ts[j].index_copy_(0, index, new.to(self.home, ts[j].dtype))
        self.written = True

    def _relay(self, name: str, j: int, order: list[int]) -> None:
        """Lay table j of `name` out with its dims nested in `order`. Before the first
        write every row is the initial one: the old table goes first and the new one is
        built from that row, so a large table never exists twice. After it (a resumed
        run whose checkpoint kept another layout), one copy."""
        ts = self.tables[name]
        if self.written:
            ts[j] = self._table(self.initial[name][j], order, fill=False).copy_(ts[j])
        else:
            ts[j] = None  # type: ignore[call-overload]
            ts[j] = self._table(self.initial[name][j], order)

    def state_dict(self) -> dict[str, list[Tensor]]:
        """The tables on the host: on CPU the live tables themselves (a copy of K clients'
        state can be gigabytes), to be saved before the next round changes them."""
        return {name: [t.detach().cpu() for t in ts] for name, ts in self.tables.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The saved tables' values, in the saved layout (torch.save keeps strides): a
        resumed run's first write then needs no relayout."""
        for name, ts in self.tables.items():
            for j, saved in enumerate(state[name]):
                order = layout_to_adopt(ts[j], saved)
                if order is not None:
                    ts[j] = None  # type: ignore[call-overload]
                    ts[j] = self._table(self.initial[name][j], order, fill=False)
                ts[j].copy_(saved)
        self.written = True


def layout_to_adopt(table: Tensor, rows: Tensor) -> list[int] | None:
    """The dims of `rows` (M, ...) from outermost to innermost in memory, where a table
    laid out so would differ from `table`; else None: `rows` contiguous (the sequential
    engine's, or joined under `launch`; a table never goes back, so mixed writers cannot
    make it flip every round), overlapping or with gaps, or laid out like the table."""
    if rows.dim() < 3 or rows.is_contiguous():
        return None
    order = sorted(range(rows.dim()), key=lambda d: -rows.stride(d))  # outermost first
    if order[0] != 0 or not _dense_in_order(rows, order):
        return None
    if _dense_in_order(table, order):
        return None
    return order


def _dense_in_order(t: Tensor, order: list[int]) -> bool:
    """Whether t's elements fill one block, dims nested in `order` (outermost first)."""
    expected = 1
    for d in reversed(order):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True
