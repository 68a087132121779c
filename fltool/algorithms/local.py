"""The client update rule: E epochs of minibatch SGD, optionally with FedProx's term.

FedAvg, FedSGD and FedProx differ only in the `LocalRule` they build (see `rule_for`).
Functions here are pure: they take tensors and return tensors; they never print or
touch files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fltool.config.schema import FederatedConfig

# apply_fn(params, x) -> logits; params in the order of model.parameters()
ApplyFn = Callable[[Sequence[Tensor], Tensor], Tensor]


@dataclass(frozen=True)
class LocalRule:
    epochs: int
    batch_size: int | None  # None: full batch
    lr: float
    mu: float = 0.0  # FedProx: adds mu/2 * ||w - w_global||^2 to the local loss


def rule_for(mode: str, fed: FederatedConfig) -> LocalRule:
    if mode == "fedsgd":  # one full-batch gradient step per client
        return LocalRule(epochs=1, batch_size=None, lr=fed.lr)
    mu = fed.mu if mode == "fedprox" else 0.0
    return LocalRule(epochs=fed.local_epochs, batch_size=fed.batch_size, lr=fed.lr, mu=mu)


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


def proximal_term(params: Sequence[Tensor], anchor: Sequence[Tensor], mu: float) -> Tensor:
    """mu/2 * ||w - w_global||^2; its gradient is mu * (w - w_global)."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))


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


def add_proximal_gradient_(
    grads: list[Tensor], params: Sequence[Tensor], anchor: Sequence[Tensor], mu: float, active: Tensor | None = None
) -> None:
    """grads += mu * (w - w_global), the gradient of `proximal_term`, without an autograd
    graph. For client-stacked params (client dim 0, anchor without it), `active` (one
    0/1 per client) keeps the term off clients whose schedule has ended."""
    if active is None:
        torch._foreach_add_(grads, torch._foreach_sub(list(params), list(anchor)), alpha=mu)
        return
    for g, p, a in zip(grads, params, anchor, strict=True):
        g.add_((p - a) * active.view(-1, *[1] * a.dim()), alpha=mu)


def local_objective(
    apply_fn: ApplyFn,
    params: Sequence[Tensor],
    anchor: Sequence[Tensor],
    x: Tensor,
    y: Tensor,
    mu: float,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(loss to differentiate, plain cross-entropy for reporting): the definition the
    engines implement. They differentiate only the cross-entropy and add the proximal
    term's gradient directly (`add_proximal_gradient_`); tests check the two agree."""
    ce = masked_cross_entropy(apply_fn(params, x), y, mask)
    return (ce + proximal_term(params, anchor, mu) if mu > 0 else ce), ce


def client_update(
    apply_fn: ApplyFn,
    global_params: Sequence[Tensor],
    x: Tensor,
    y: Tensor,
    rule: LocalRule,
    batches: Sequence[Tensor],
) -> tuple[list[Tensor], Tensor]:
    """Run the local rule from `global_params` on one client's (x, y).

    Returns the client's new parameters and the sum of its minibatch cross-entropies
    (a tensor, so no host sync happens here).
    """
    anchor = [p.detach() for p in global_params]
    params = [p.detach().clone().requires_grad_(True) for p in global_params]
    loss_sum = torch.zeros((), device=x.device)
    for idx in batches:
        idx = idx.to(x.device, non_blocking=True)
        ce = masked_cross_entropy(apply_fn(params, x[idx]), y[idx])
        grads = list(torch.autograd.grad(ce, params))
        with torch.no_grad():
            if rule.mu > 0:
                add_proximal_gradient_(grads, params, anchor, rule.mu)
            torch._foreach_add_(params, grads, alpha=-rule.lr)
        loss_sum = loss_sum + ce.detach()
    return [p.detach() for p in params], loss_sum
