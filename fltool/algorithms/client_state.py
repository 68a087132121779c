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
        pin = self.home.type == "cpu" and device.type == "cuda"
        self.tables: dict[str, list[Tensor]] = {
            name: [self._table(t, pin) for t in ts] for name, ts in initial.items()
        }

    def _table(self, row: Tensor, pin: bool) -> Tensor:
        table = torch.zeros((self.num_clients, *row.shape), dtype=row.dtype, device=self.home, pin_memory=pin)
        if row.device.type != "meta" and bool(row.any()):  # zeros, the common start, need no pass
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
            for j, (table, new) in enumerate(zip(ts, rows[name], strict=True)):
                relaid = in_row_layout_of(table, new, pin=table.device.type == "cpu" and self.device.type == "cuda")
                if relaid is not None:
                    table = ts[j] = relaid
                table.index_copy_(0, index, new.to(self.home, table.dtype))

    def state_dict(self) -> dict[str, list[Tensor]]:
        """The tables on the host: on CPU the live tables themselves (a copy of K clients'
        state can be gigabytes), to be saved before the next round changes them."""
        return {name: [t.detach().cpu() for t in ts] for name, ts in self.tables.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, ts in self.tables.items():
            for table, saved in zip(ts, state[name], strict=True):
                table.copy_(saved)


def in_row_layout_of(table: Tensor, rows: Tensor, pin: bool = False) -> Tensor | None:
    """A copy of `table` whose rows have the memory layout of `rows` (M, ...), or None
    when there is nothing to change: `rows` contiguous (the sequential engine's, or
    joined under `launch`; a table never goes back, so mixed writers cannot make it
    flip every round), overlapping or with gaps, or already laid out alike."""
    if rows.dim() < 3 or rows.is_contiguous():
        return None
    order = sorted(range(rows.dim()), key=lambda d: -rows.stride(d))  # outermost first
    if order[0] != 0 or not _dense_in_order(rows, order):
        return None
    relaid = torch.empty([table.shape[d] for d in order], dtype=table.dtype, device=table.device, pin_memory=pin)
    relaid = relaid.permute(*(order.index(d) for d in range(rows.dim())))
    if relaid.stride() == table.stride():
        return None
    return relaid.copy_(table)


def _dense_in_order(t: Tensor, order: list[int]) -> bool:
    """Whether t's elements fill one block, dims nested in `order` (outermost first)."""
    expected = 1
    for d in reversed(order):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True
