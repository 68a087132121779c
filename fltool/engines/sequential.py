"""Cohort trainers: run the client update rule for a round's sampled clients.

An engine returns the n_k-weighted sum of client models (not the average), so that
partial sums from several ranks can be all-reduced before the server divides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fltool.algorithms import LocalRule, WeightedSum, batch_schedule, client_update, derive_seed
from fltool.algorithms.local import ApplyFn, epoch_orders
from fltool.algorithms.sampling import generator_for
from fltool.devices import autocast_for, host_to_device

if TYPE_CHECKING:
    from fltool.engines.vectorized.engine import VectorizedEngine


@dataclass
class ClientData:
    id: int
    x: Tensor
    y: Tensor

    @property
    def n(self) -> int:
        return self.y.shape[0]


@dataclass
class CohortResult:
    weighted: WeightedSum  # sum_k n_k * w_k over this process's clients
    loss_sum: Tensor  # sum_k n_k * (mean minibatch cross-entropy of client k)


def client_batches(seed: int, round_: int, client_id: int, n: int, rule: LocalRule) -> list[Tensor]:
    """The minibatch schedule of one client in one round; every engine uses exactly this."""
    return batch_schedule(n, rule, generator_for(seed, "batches", round_, client_id))


def client_epoch_orders(seed: int, round_: int, client_id: int, n: int, rule: LocalRule) -> Tensor:
    """(epochs, n): the same draws as `client_batches`, before they are cut into batches."""
    return epoch_orders(n, rule, generator_for(seed, "batches", round_, client_id))


def client_dropout_seed(seed: int, round_: int, client_id: int) -> int:
    return derive_seed(seed, "dropout", round_, client_id)


def make_apply_fn(model: nn.Module, amp: str = "none") -> ApplyFn:
    names = [name for name, _ in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def apply_fn(params: Sequence[Tensor], x: Tensor) -> Tensor:
        return functional_call(model, {**dict(zip(names, params)), **buffers}, (x,))

    return with_amp(apply_fn, amp)


def with_amp(apply: ApplyFn, amp: str) -> ApplyFn:
    """`apply` with its forward pass under bf16 autocast for amp "bf16" (else `apply`).

    The logits come back in fp32, so the loss and everything after it (gradients of the
    fp32 weights, FedProx's term, the SGD update, the average) stay fp32: mixed precision,
    not a bf16 model."""
    if amp == "none":
        return apply

    def apply_amp(params: Sequence[Tensor], x: Tensor) -> Tensor:
        with autocast_for(amp, x.device):
            out = apply(params, x)
        return out.float()

    return apply_amp


class SequentialEngine:
    """One client after another, each a plain functional SGD loop."""

    name = "sequential"

    def __init__(self, model: nn.Module, seed: int, amp: str = "none") -> None:
        self.model = model
        self.seed = seed
        self.apply_fn = make_apply_fn(model, amp)

    def train_cohort(
        self, global_params: Sequence[Tensor], clients: Sequence[ClientData], rule: LocalRule, round_: int
    ) -> CohortResult:
        weighted = WeightedSum(global_params)
        loss_sum = torch.zeros((), device=global_params[0].device)
        self.model.train()
        for client in clients:
            batches = batches_on(client_batches(self.seed, round_, client.id, client.n, rule), client.x.device)
            torch.manual_seed(client_dropout_seed(self.seed, round_, client.id))
            params, client_loss = client_update(self.apply_fn, global_params, client.x, client.y, rule, batches)
            weighted.add(params, client.n)
            loss_sum = loss_sum + client_loss * (client.n / len(batches))
        return CohortResult(weighted, loss_sum)


def batches_on(batches: list[Tensor], device: torch.device) -> list[Tensor]:
    """A client's whole schedule on `device` in one copy, not one blocking copy per step."""
    if device.type == "cpu":
        return batches
    flat = host_to_device(torch.cat(batches), device)
    return list(flat.split([b.numel() for b in batches]))


def make_engine(
    name: str,
    model: nn.Module,
    seed: int,
    max_parallel_clients: int | None = None,
    cuda_graphs: bool = True,
    amp: str = "none",
) -> SequentialEngine | VectorizedEngine:
    """`sequential`, `vectorized`, or `auto`: vectorized unless the model keeps BatchNorm
    running statistics (which one stacked forward pass cannot update per client).
    `amp` "bf16" runs the clients' forward passes under bf16 autocast."""
    from fltool.models.setup import has_running_stats
    from fltool.engines.vectorized.engine import VectorizedEngine  # imports this module

    if name == "auto":
        name = "sequential" if has_running_stats(model) else "vectorized"
    if name == "vectorized":
        return VectorizedEngine(model, seed, max_parallel_clients, cuda_graphs=cuda_graphs, amp=amp)
    if name == "sequential":
        return SequentialEngine(model, seed, amp)
    raise ValueError(f"unknown engine {name!r}")
