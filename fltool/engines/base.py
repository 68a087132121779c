"""What every engine shares: a client's data and schedules, the functional model, and
the job a trainer hands an engine for one round.

An engine runs the client side only: for each client (or chunk of clients) it takes
the algorithm's context, runs the local steps (calling `adjust_gradients_` on each
step's gradients), and hands `client_upload`'s result to `job.collect`. It never
aggregates: the trainer's aggregator does, so any algorithm and aggregator run on any
engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fltool.algorithms import ClientInfo, FedAvg, LocalRule, Stacked, Upload, derive_seed
from fltool.algorithms.local import ApplyFn, batch_schedule, epoch_orders
from fltool.algorithms.sampling import generator_for
from fltool.devices import autocast_for


@dataclass
class ClientData:
    id: int
    x: Tensor
    y: Tensor
    steps: int | None = None  # this round's cap on local steps (a straggler's partial work)

    @property
    def n(self) -> int:
        return self.y.shape[0]


@dataclass
class CohortJob:
    """One round's client work: the algorithm, its broadcast for a list of client ids
    (the chunk's context, rows in the order of the ids), and where uploads go."""

    algorithm: FedAvg
    round: int
    context_for: Callable[[list[int]], Stacked]
    collect: Callable[[Tensor, Upload], None]  # (client ids (M,), their upload)


class Engine(Protocol):
    name: str

    def train_cohort(self, global_params: Sequence[Tensor], clients: Sequence[ClientData], job: CohortJob) -> Tensor:
        """Train `clients` from `global_params`; returns sum_k n_k * (client k's mean
        minibatch cross-entropy), a device tensor (no host sync)."""
        ...


def client_batches(seed: int, round_: int, client: ClientData, rule: LocalRule) -> list[Tensor]:
    """The minibatch schedule of one client in one round, cut at its step cap; every
    engine uses exactly this (a straggler does the first steps of its full schedule)."""
    return batch_schedule(client.n, rule, generator_for(seed, "batches", round_, client.id))[: client.steps]


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
    fp32 weights, the algorithm's gradient terms, the SGD update, the aggregate) stay
    fp32: mixed precision, not a bf16 model."""
    if amp == "none":
        return apply

    def apply_amp(params: Sequence[Tensor], x: Tensor) -> Tensor:
        with autocast_for(amp, x.device):
            out = apply(params, x)
        return out.float()

    return apply_amp


def empty_upload(job: CohortJob, global_params: Sequence[Tensor]) -> None:
    """A rank whose share of a small cohort is empty still uploads (no clients), so
    that every rank's aggregator holds the same tensors for the collectives."""
    device = global_params[0].device
    none = torch.zeros(0, device=device)
    info = ClientInfo(ids=torch.zeros(0, dtype=torch.long, device=device), n=none, steps=none)
    params = [p.unsqueeze(0)[:0] for p in global_params]
    context = job.context_for([])
    if job.algorithm.needs_global_gradient:
        context = {**context, "global_grad": [p.clone() for p in params]}
    job.collect(info.ids, job.algorithm.client_upload(global_params, params, context, info))
