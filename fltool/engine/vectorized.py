"""The vectorized engine: every client of a chunk takes its local step at the same time.

Client parameters are stacked along a leading client dim, and one local step is one
batched forward plus one backward for all clients of the chunk: hand-batched (grouped
conv + baddbmm, see `batched_nets`) for plain Sequential conv/MLP models, vmap over
`functional_call` for anything else. Federated simulation is launch-bound (10 clients
x 10 examples is microseconds of work), so fusing M clients into one kernel sequence
is where the speed comes from on a GPU. On CPU the gain is removing per-client Python
and optimizer overhead; conv-heavy models stay compute-bound there.

The math is `client_update`'s: the masked cross-entropy of `local_objective`, FedProx's
gradient added directly, a plain SGD step. Only the batching differs from
`SequentialEngine`:
- Every client follows exactly its `client_batches` schedule (same seed, same order).
- Clients differ in size, so each step's batches are padded to the widest one and
  masked: the cross-entropy is the mean over real examples only, so a partial last
  batch gets the same gradient as in the sequential engine.
- A client whose schedule has ended gets a zero step size (FedProx's term alone would
  otherwise still move it).
- Dropout draws independent masks per client (one dropout over the stacked
  activations, or vmap randomness="different") from a per-chunk seed, so dropout
  models match the sequential engine in distribution, not bit for bit; they are still
  deterministic for a given seed and chunk size.
- A cohort is trained in chunks of clients. `max_parallel_clients` fixes the chunk
  size; null sizes chunks to a memory budget (see `chunking`). A chunk that still runs
  out of device memory is split in two and retried. Chunks change only float
  summation order (and dropout draws).

The whole schedule of a chunk is built on the host once (the same CPU generators as
the sequential engine, so the two agree) and moved to the device in one copy; the step
loop then never synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.nn.utils.rnn import pad_sequence

from fltool.algorithms import LocalRule, WeightedSum, derive_seed
from fltool.algorithms.local import add_proximal_gradient_, masked_cross_entropy
from fltool.devices import host_to_device
from fltool.engine.batched_nets import make_batched_apply, supports
from fltool.engine.chunking import auto_chunk_size
from fltool.engine.cohort import ClientData, CohortResult, client_epoch_orders, make_apply_fn
from fltool.engine.setup import has_running_stats
from fltool.errors import FltoolError

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
        rows.append(padded.view(-1, width))
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


def chunks(clients: Sequence[ClientData], size: int | None) -> list[list[ClientData]]:
    """Split a cohort into chunks of at most `size`; clients of similar size share a chunk
    so that little of each chunk's batch is padding."""
    ordered = sorted(clients, key=lambda c: c.n)
    size = size or max(1, len(ordered))
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


class VectorizedEngine:
    """Trains a cohort chunk by chunk; within a chunk, all clients step together."""

    name = "vectorized"

    def __init__(
        self,
        model: nn.Module,
        seed: int,
        max_parallel_clients: int | None = None,
        hand_batched: bool = True,
        memory_budget: int | None = None,
    ) -> None:
        if has_running_stats(model):
            raise FltoolError(
                "federated.engine: vectorized cannot train models with BatchNorm running statistics; "
                "use engine: sequential or auto"
            )
        self.model = model
        self.seed = seed
        self.max_parallel_clients = max_parallel_clients
        self.memory_budget = memory_budget  # bytes per chunk when sizing automatically; None: per device
        self._chunk_sizes: dict[tuple[int, ...], int] = {}
        self.oom_cap: int | None = None  # set when a chunk ran out of device memory
        self.apply_fn = make_apply_fn(model)
        # plain conv/MLP stacks get the hand-batched forward (see batched_nets); others vmap
        self.batched_apply = make_batched_apply(model) if hand_batched and supports(model) else None
        self.batched_cross_entropy = self.cross_entropy()

    def cross_entropy(self) -> BatchedCrossEntropy:
        """`masked_cross_entropy` of every client of the stack, (M,)."""
        if self.batched_apply is not None:
            # hand-batched network, and a loss that reduces per client on its own: no
            # vmap, whose per-call dispatch cost more than a whole launch-bound step
            batched_apply = self.batched_apply
            return lambda params, x, y, mask: masked_cross_entropy(batched_apply(params, x), y, mask)

        def one_client(params, x, y, mask):
            return masked_cross_entropy(self.apply_fn(params, x), y, mask)

        return vmap(one_client, randomness="different")

    def train_cohort(
        self, global_params: Sequence[Tensor], clients: Sequence[ClientData], rule: LocalRule, round_: int
    ) -> CohortResult:
        weighted = WeightedSum(global_params)
        loss_sum = torch.zeros((), device=global_params[0].device)
        self.model.train()
        pending = chunks(clients, self.chunk_size(global_params, clients, rule))
        while pending:
            chunk = pending.pop(0)
            try:
                params, ce_sums, plan = self.train_chunk(global_params, chunk, rule, round_)
            except torch.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                out_of_memory = True
            else:
                out_of_memory = False
            if out_of_memory:  # outside the handler, so the failed step's tensors are freed
                pending = self.rechunk_after_oom(chunk, pending)
                continue
            weighted.add_stacked(params, plan.n)
            # as in the sequential engine: n_k * (mean minibatch cross-entropy of client k)
            per_step = host_to_device(torch.tensor([n / s for n, s in zip(plan.n, plan.steps)]), ce_sums.device)
            loss_sum = loss_sum + (ce_sums * per_step).sum()
        return CohortResult(weighted, loss_sum)

    def rechunk_after_oom(self, failed: list[ClientData], pending: list[list[ClientData]]) -> list[list[ClientData]]:
        """The size estimate was too generous (other tenants, fragmentation): halve the
        chunk size for the failed chunk, the rest of the round and the rest of the run.
        Nothing of the failed chunk was added to the sums, so the math is unchanged."""
        self.oom_cap = (len(failed) + 1) // 2
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return chunks([c for part in (failed, *pending) for c in part], self.oom_cap)

    def chunk_size(self, global_params: Sequence[Tensor], clients: Sequence[ClientData], rule: LocalRule) -> int:
        """`max_parallel_clients`, or as many clients as the memory budget holds at the
        cohort's widest batch (measured once per batch shape)."""
        if self.max_parallel_clients is not None:
            return min(self.max_parallel_clients, self.oom_cap or self.max_parallel_clients)
        widest = max(clients, key=lambda c: c.n)
        width = widest.n if rule.batch_size is None else min(rule.batch_size, widest.n)
        key = (width, *widest.x.shape[1:])
        if key not in self._chunk_sizes:
            x, y = widest.x[:width], widest.y[:width]
            self._chunk_sizes[key] = auto_chunk_size(self.apply_fn, global_params, x, y, self.memory_budget)
        return min(self._chunk_sizes[key], self.oom_cap or len(clients), len(clients))

    def train_chunk(
        self, global_params: Sequence[Tensor], clients: Sequence[ClientData], rule: LocalRule, round_: int
    ) -> tuple[list[Tensor], Tensor, ChunkPlan]:
        """Run the local rule for every client of `clients` at once.

        Returns the stacked client parameters (client dim 0), each client's sum of
        minibatch cross-entropies, and the plan used.
        """
        device = global_params[0].device
        plan = plan_chunk(self.seed, round_, clients, rule, device)
        x = torch.cat([c.x for c in clients])
        y = torch.cat([c.y for c in clients])
        m = len(clients)
        anchor = tuple(p.detach() for p in global_params)
        params = [p.detach().unsqueeze(0).repeat(m, *([1] * p.dim())).requires_grad_(True) for p in global_params]
        ce_sums = torch.zeros(m, device=device)
        torch.manual_seed(derive_seed(self.seed, "dropout-chunk", round_, clients[0].id))
        for s in range(plan.index.shape[0]):
            idx = plan.index[s]
            ce = self.batched_cross_entropy(tuple(params), x[idx], y[idx], plan.mask[s])
            # Clients' parameters are independent, so the gradient of the summed loss
            # w.r.t. the stack is every client's own gradient; weighting by `active`
            # zeroes the step of a finished client.
            grads = list(torch.autograd.grad((ce * plan.active[s]).sum(), params))
            if s == 0:
                params = match_layout(params, grads)
            with torch.no_grad():
                if rule.mu > 0:  # FedProx's term alone would still move a finished client
                    add_proximal_gradient_(grads, params, anchor, rule.mu, plan.active[s])
                sgd_step(params, grads, rule.lr)
            ce_sums = ce_sums + ce.detach()  # a finished client's ce is 0 (all-masked)
        return [p.detach() for p in params], ce_sums, plan


def match_layout(params: list[Tensor], grads: Sequence[Tensor]) -> list[Tensor]:
    """Give each stacked parameter the memory layout of its gradient.

    The batched matmul behind a vmap'd Linear returns weight gradients as transposed
    views; adding a transposed tensor in place is a cache-hostile strided loop that cost
    more than the whole forward pass on CPU. With equal layouts the update is one linear
    sweep. Values are unchanged, only strides.
    """
    out = []
    for p, g in zip(params, grads, strict=True):
        if p.stride() != g.stride():
            # empty_like keeps g's strides when they are dense, else falls back to contiguous
            p = torch.empty_like(g, dtype=p.dtype).copy_(p.detach()).requires_grad_(True)
        out.append(p)
    return out


def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float) -> None:
    """w_k <- w_k - lr * g_k for every client k in place (one fused foreach kernel).

    Plain SGD keeps no state. A stateful optimizer would keep its state stacked like the
    parameters (client dim 0) and also skip finished clients (a zero gradient is not
    enough once there is momentum).
    """
    torch._foreach_add_(list(params), list(grads), alpha=-lr)
