"""One client's local training, as the sequential engine runs it: E epochs of minibatch
SGD on the masked cross-entropy, each step's gradients handed to the algorithm's
`adjust_gradients_` first. Pure: tensors in, tensors out; nothing printed or written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fltool.algorithms.api import LocalRule, Stacked
from fltool.algorithms.fedavg import FedAvg

# apply_fn(params, x) -> logits; params in the order of model.parameters()
ApplyFn = Callable[[Sequence[Tensor], Tensor], Tensor]


def steps_per_epoch(n: int, batch_size: int | None) -> int:
    return 1 if batch_size is None else -(-n // batch_size)


def epoch_orders(n: int, rule: LocalRule, generator: torch.Generator) -> Tensor:
    """(epochs, n): the order in which each local epoch visits the n examples, a fresh
    permutation per epoch (in order for full-batch steps, which draw nothing)."""
    if rule.batch_size is None:
        return torch.arange(n).expand(rule.epochs, n)
    return torch.stack([torch.randperm(n, generator=generator) for _ in range(rule.epochs)])


def batch_schedule(n: int, rule: LocalRule, generator: torch.Generator) -> list[Tensor]:
    """Index batches for all local epochs: each epoch's order cut into batches, last batch partial."""
    orders = epoch_orders(n, rule, generator)
    if rule.batch_size is None:
        return list(orders)
    return [batch for order in orders for batch in order.split(rule.batch_size)]


def masked_cross_entropy(logits: Tensor, y: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean cross-entropy over the real examples of a batch.

    logits (..., B, K), y and mask (..., B): any leading dims are clients, each reduced
    on its own. `mask` (0/1 per example) lets a batched engine pad a partial last batch:
    the mean is over the real examples only, so its gradient equals the unpadded one. An
    all-zero mask gives zero.
    """
    if mask is None and logits.dim() == 2:
        return F.cross_entropy(logits, y)
    per_example = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view(y.shape)
    if mask is None:
        return per_example.mean(-1)
    return (per_example * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def full_gradient(apply_fn: ApplyFn, params: Sequence[Tensor], x: Tensor, y: Tensor) -> list[Tensor]:
    """The gradient of the mean cross-entropy over all of (x, y) at `params`."""
    weights = [p.detach().requires_grad_(True) for p in params]
    return [g.detach() for g in torch.autograd.grad(masked_cross_entropy(apply_fn(weights, x), y), weights)]


def client_update(
    apply_fn: ApplyFn,
    global_params: Sequence[Tensor],
    x: Tensor,
    y: Tensor,
    algorithm: FedAvg,
    batches: Sequence[Tensor],
    context: Stacked,
) -> tuple[list[Tensor], Tensor]:
    """Run the local rule from `global_params` on one client's (x, y).

    Returns the client's new parameters and the sum of its minibatch cross-entropies
    (a tensor, so no host sync happens here). The algorithm's hooks see the client as a
    stack of one (client dim 0), as the vectorized engine's see a chunk.
    """
    anchor = [p.detach() for p in global_params]
    params = [p.detach().clone().requires_grad_(True) for p in global_params]
    loss_sum = torch.zeros((), device=x.device)
    active = torch.ones(1, device=x.device)
    for idx in batches:
        idx = idx.to(x.device, non_blocking=True)
        ce = masked_cross_entropy(apply_fn(params, x[idx]), y[idx])
        grads = list(torch.autograd.grad(ce, params))
        with torch.no_grad():
            if algorithm.adjusts_gradients:
                one = [p.unsqueeze(0) for p in params]
                algorithm.adjust_gradients_([g.unsqueeze(0) for g in grads], one, anchor, context, active)
            torch._foreach_add_(params, grads, alpha=-algorithm.rule.lr)
        loss_sum = loss_sum + ce.detach()
    return [p.detach() for p in params], loss_sum
