"""One local step of a chunk of clients, shared by the eager loop and the CUDA graph.

A chunk's whole schedule is planned on the host first (`plan_chunk`): every client
follows exactly its `client_batches` schedule, padded to the widest batch and masked,
so the masked mean cross-entropy gives a partial last batch the same gradient as in
the sequential engine, and a client whose schedule has ended takes a zero step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from fltool.algorithms import FedAvg, LocalRule, Stacked
from fltool.devices import host_to_device
from fltool.engines.base import ClientData, client_epoch_orders
from fltool.engines.vectorized.batched_nets import LowRankGrad, collect_low_rank_grads

# (stacked params, x (M,B,...), y (M,B), mask (M,B)) -> cross-entropy per client (M,)
BatchedCrossEntropy = Callable[[tuple[Tensor, ...], Tensor, Tensor, Tensor], Tensor]


@dataclass
class ChunkPlan:
    """One chunk's local steps, built on the host and moved to the device in one go."""

    index: Tensor  # (steps, M, width) rows of the chunk's concatenated data
    mask: Tensor  # (steps, M, width) 1.0 for a real example, 0.0 for padding
    active: Tensor  # (steps, M) 1.0 while client m still has a batch at this step, else 0.0
    n: list[int]  # examples per client
    steps: list[int]  # local steps per client


def plan_chunk(seed: int, round_: int, clients: Sequence[ClientData], rule: LocalRule, device: torch.device) -> ChunkPlan:
    n_max = max(c.n for c in clients)
    width = n_max if rule.batch_size is None else min(rule.batch_size, n_max)
    rows, offset = [], 0  # per client (steps_m, width): its batches, -1 padding a partial last one
    for client in clients:
        orders = client_epoch_orders(seed, round_, client.id, client.n, rule)
        padded = torch.full((rule.epochs, -(-client.n // width) * width), -1, dtype=torch.long)
        padded[:, : client.n] = orders + offset
        rows.append(padded.view(-1, width)[: client.steps])  # a straggler stops early
        offset += client.n
    index = pad_sequence(rows, padding_value=-1)  # (steps, M, width)
    mask = index >= 0
    active = mask.any(dim=2)
    return ChunkPlan(
        index=host_to_device(index.clamp_min(0), device),
        mask=host_to_device(mask.float(), device),
        active=host_to_device(active.float(), device),
        n=[c.n for c in clients],
        steps=[r.shape[0] for r in rows],
    )


def full_batch_plan(clients: Sequence[ClientData], device: torch.device) -> ChunkPlan:
    """One step over every client's whole data, in order (no draws)."""
    return plan_chunk(0, 0, clients, LocalRule(epochs=1, batch_size=None, lr=0.0), device)


def step_grads(
    cross_entropy: BatchedCrossEntropy, params: Sequence[Tensor], x: Tensor, y: Tensor, idx: Tensor, mask: Tensor, active: Tensor
) -> tuple[Tensor, list[Tensor | LowRankGrad]]:
    """Each client's cross-entropy on its batch `idx` and its gradient, (M,) and stacked
    (a large dense layer's weight gradient as a `LowRankGrad`, see `BatchedLinear`).

    Clients' parameters are independent, so the gradient of the summed loss w.r.t. the
    stack is every client's own gradient; weighting by `active` zeroes the step of a
    finished client (whose all-masked ce is already 0)."""
    with collect_low_rank_grads() as low_rank:
        ce = cross_entropy(tuple(params), x[idx], y[idx], mask)
    dense = [p for p in params if p not in low_rank]
    grads = iter(torch.autograd.grad((ce * active).sum(), dense))
    return ce, [low_rank.pop(p) if p in low_rank else next(grads) for p in params]


@torch.no_grad()
def step_update(
    params: Sequence[Tensor],
    grads: list[Tensor | LowRankGrad],
    anchor: Sequence[Tensor],
    algorithm: FedAvg,
    context: Stacked,
    active: Tensor,
) -> None:
    """One local step in place: the algorithm's gradient terms (FedProx's, SCAFFOLD's;
    on materialised gradients), then plain SGD."""
    if algorithm.adjusts_gradients:
        grads = [g.materialize() if isinstance(g, LowRankGrad) else g for g in grads]
        algorithm.adjust_gradients_(grads, params, anchor, context, active)  # type: ignore[arg-type]
    sgd_step(params, grads, algorithm.rule.lr)


def match_layout(params: list[Tensor], grads: Sequence[Tensor | LowRankGrad]) -> list[Tensor]:
    """Give each stacked parameter the memory layout of its gradient.

    The batched matmul behind a vmap'd Linear returns weight gradients as transposed
    views; adding a transposed tensor in place is a cache-hostile strided loop that cost
    more than the whole forward pass on CPU. With equal layouts the update is one linear
    sweep. Values are unchanged, only strides. (A `LowRankGrad` is added by a GEMM into
    the weights as they are.)
    """
    out = []
    for p, g in zip(params, grads, strict=True):
        if isinstance(g, Tensor) and p.stride() != g.stride():
            # empty_like keeps g's strides when they are dense, else falls back to contiguous
            p = torch.empty_like(g, dtype=p.dtype).copy_(p.detach()).requires_grad_(True)
        out.append(p)
    return out


def in_layout_of(tensors: list[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
    """The algorithm's parameter-shaped context (SCAFFOLD's correction) in the memory
    layout the stacked parameters took (`match_layout`), so that adding it to each
    step's gradients is a linear sweep, not a strided one with a temporary."""
    if len(tensors) != len(params):
        return tensors
    return [
        torch.empty_like(p, dtype=t.dtype).copy_(t) if t.shape == p.shape and t.stride() != p.stride() else t
        for t, p in zip(tensors, params, strict=True)
    ]


def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor | LowRankGrad], lr: float) -> None:
    """w_k <- w_k - lr * g_k for every client k in place: one fused foreach kernel, and
    for a `LowRankGrad` one GEMM that accumulates -lr * left @ right into the weights.

    Plain SGD keeps no state. A stateful optimizer would keep its state stacked like the
    parameters (client dim 0) and also skip finished clients (a zero gradient is not
    enough once there is momentum).
    """
    full = [(p, g) for p, g in zip(params, grads, strict=True) if isinstance(g, Tensor)]
    torch._foreach_add_([p for p, _ in full], [g for _, g in full], alpha=-lr)
    for p, g in zip(params, grads, strict=True):
        if isinstance(g, LowRankGrad):
            p.baddbmm_(g.left, g.right, alpha=-lr)
