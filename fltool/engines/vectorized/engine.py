"""The vectorized engine: every client of a chunk takes its local step at the same time.

Client parameters are stacked along a leading client dim, and one local step is one
batched forward plus one backward for all clients of the chunk: hand-batched (grouped
conv + batched matmuls, see `batched_nets`) for plain Sequential conv/MLP models, vmap over
`functional_call` for anything else. Federated simulation is launch-bound (10 clients
x 10 examples is microseconds of work), so fusing M clients into one kernel sequence
is where the speed comes from on a GPU. On CPU the gain is removing per-client Python
and optimizer overhead; conv-heavy models stay compute-bound there.

The math is `client_update`'s: the masked cross-entropy, the algorithm's
`adjust_gradients_` on each step's gradients, a plain SGD step, and `client_upload`
on the chunk's stacked result. Only the batching differs from `SequentialEngine`:
- Every client follows exactly its `client_batches` schedule (same seed, same order).
- Clients differ in size, so each step's batches are padded to the widest one and
  masked: the cross-entropy is the mean over real examples only, so a partial last
  batch gets the same gradient as in the sequential engine.
- A client whose schedule has ended gets a zero gradient, and `active` tells the
  algorithm's gradient terms to keep off it (FedProx's alone would still move it).
- Dropout draws independent masks per client (one dropout over the stacked
  activations, or vmap randomness="different") from a per-chunk seed, so dropout
  models match the sequential engine in distribution, not bit for bit; they are still
  deterministic for a given seed and chunk size.
- A large dense layer's weight gradient (CPU) stays as its rank-B factors, and the SGD
  step adds their product into the weights with one GEMM (`LowRankGrad`): the same
  update, without writing and re-reading a gradient the size of the weights.
- `amp="bf16"` runs the forward pass under bf16 autocast (`with_amp`), as the
  sequential engine does; weights, gradients and updates stay fp32.
- A cohort is trained in chunks of clients. `max_parallel_clients` fixes the chunk
  size; null sizes chunks to a memory budget (see `chunking`). A chunk that still runs
  out of device memory is split in two and retried. Chunks change only float
  summation order (and dropout draws).

The whole schedule of a chunk is built on the host once (the same CPU generators as
the sequential engine, so the two agree) and moved to the device in one copy; the step
loop then never synchronises with the host. On CUDA the step is captured once per chunk
shape as a CUDA graph and replayed once per step (`step_graph`; `cuda_graphs=False`
runs it eagerly).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import vmap

from fltool.algorithms import ClientInfo, FedAvg, LocalRule, Stacked, derive_seed
from fltool.algorithms.local import masked_cross_entropy
from fltool.devices import host_to_device
from fltool.engines.base import ClientData, CohortJob, empty_upload, make_apply_fn, with_amp
from fltool.engines.vectorized.batched_nets import make_batched_apply, supports
from fltool.engines.vectorized.batched_step import (
    BatchedCrossEntropy,
    ChunkPlan,
    full_batch_plan,
    in_layout_of,
    match_layout,
    plan_chunk,
    step_grads,
    step_update,
)
from fltool.engines.vectorized.chunking import auto_chunk_size, device_memory_budget
from fltool.models.setup import has_running_stats
from fltool.engines.vectorized.step_graph import StepGraphCache
from fltool.errors import FltoolError


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
        cuda_graphs: bool = True,
        amp: str = "none",
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
        self.amp = amp
        self._chunk_sizes: dict[tuple[int, ...], int] = {}
        self.oom_cap: int | None = None  # set when a chunk ran out of device memory
        self.apply_fn = make_apply_fn(model, amp)
        # plain conv/MLP stacks get the hand-batched forward (see batched_nets); others vmap
        hand = hand_batched and supports(model)
        self.batched_apply = with_amp(make_batched_apply(model), amp) if hand else None
        self.batched_cross_entropy = self.cross_entropy()
        # on CUDA, each chunk shape's step is captured once and replayed (see step_graph);
        # only the hand-batched step, the one tested under capture on a GPU
        graphed = cuda_graphs and self.batched_apply is not None
        self.graphs = StepGraphCache(self.batched_cross_entropy) if graphed else None

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

    def train_cohort(self, global_params: Sequence[Tensor], clients: Sequence[ClientData], job: CohortJob) -> Tensor:
        device = global_params[0].device
        loss_sum = torch.zeros((), device=device)
        if not clients:  # a rank whose share of a small cohort is empty still joins the collectives
            empty_upload(job, global_params)
            return loss_sum
        self.model.train()
        rule = job.algorithm.rule
        pending = chunks(clients, self.chunk_size(global_params, clients, rule))
        while pending:
            chunk = pending.pop(0)
            try:
                context = job.context_for([c.id for c in chunk])
                params, ce_sums, plan, context = self.train_chunk(global_params, chunk, job, context)
            except torch.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                out_of_memory = True
            else:
                out_of_memory = False
            if out_of_memory:  # outside the handler, so the failed step's tensors are freed
                pending = self.rechunk_after_oom(chunk, pending)
                continue
            info = ClientInfo(
                ids=host_to_device(torch.tensor([c.id for c in chunk]), device),
                n=host_to_device(torch.tensor([float(n) for n in plan.n]), device),
                steps=host_to_device(torch.tensor([float(s) for s in plan.steps]), device),
            )
            job.collect(info.ids, job.algorithm.client_upload(global_params, params, context, info))
            # as in the sequential engine: n_k * (mean minibatch cross-entropy of client k)
            per_step = host_to_device(torch.tensor([n / s for n, s in zip(plan.n, plan.steps)]), device)
            loss_sum = loss_sum + (ce_sums * per_step).sum()
        return loss_sum

    def rechunk_after_oom(self, failed: list[ClientData], pending: list[list[ClientData]]) -> list[list[ClientData]]:
        """The size estimate was too generous (other tenants, fragmentation): halve the
        chunk size for the failed chunk, the rest of the round and the rest of the run.
        Nothing of the failed chunk was added to the sums, so the math is unchanged."""
        self.oom_cap = (len(failed) + 1) // 2
        if self.graphs is not None:
            self.graphs.clear()
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
            budget = self.memory_budget
            if budget is None:
                budget = device_memory_budget(global_params[0].device, self.amp)
            self._chunk_sizes[key] = auto_chunk_size(self.apply_fn, global_params, x, y, budget)
        return min(self._chunk_sizes[key], self.oom_cap or len(clients), len(clients))

    def train_chunk(
        self, global_params: Sequence[Tensor], clients: Sequence[ClientData], job: CohortJob, context: Stacked
    ) -> tuple[list[Tensor], Tensor, ChunkPlan, Stacked]:
        """Run the local rule for every client of `clients` at once.

        Returns the stacked client parameters (client dim 0), each client's sum of
        minibatch cross-entropies, the plan used, and the context (with each client's
        full-data gradient at the global model added where the algorithm needs it).
        """
        algorithm = job.algorithm
        device = global_params[0].device
        plan = plan_chunk(self.seed, job.round, clients, algorithm.rule, device)
        x = torch.cat([c.x for c in clients])
        y = torch.cat([c.y for c in clients])
        if algorithm.needs_global_gradient:
            context = {**context, "global_grad": self.global_gradients(global_params, clients, x, y)}
        torch.manual_seed(derive_seed(self.seed, "dropout-chunk", job.round, clients[0].id))
        if self.graphs is not None and device.type == "cuda":
            graph = self.graphs.get(algorithm, global_params, x, y, plan, context)
            return (*graph.run(global_params, x, y, plan, context), plan, context)
        anchor = [p.detach() for p in global_params]
        params = [p.detach().unsqueeze(0).repeat(len(clients), *([1] * p.dim())).requires_grad_(True) for p in global_params]
        ce_sums = torch.zeros(len(clients), device=device)
        for s in range(plan.index.shape[0]):
            ce, grads = step_grads(self.batched_cross_entropy, params, x, y, plan.index[s], plan.mask[s], plan.active[s])
            if s == 0:
                params = match_layout(params, grads)
                context = {name: in_layout_of(ts, params) for name, ts in context.items()}
            step_update(params, grads, anchor, algorithm, context, plan.active[s])
            ce_sums = ce_sums + ce.detach()
        return [p.detach() for p in params], ce_sums, plan, context

    def global_gradients(self, global_params: Sequence[Tensor], clients: Sequence[ClientData], x: Tensor, y: Tensor) -> list[Tensor]:
        """Each client's gradient of the mean cross-entropy over all its data at the
        global model, stacked (M, ...): one full-batch step's gradients."""
        plan = full_batch_plan(clients, global_params[0].device)
        params = [p.detach().unsqueeze(0).expand(len(clients), *p.shape).clone().requires_grad_(True) for p in global_params]
        _, grads = step_grads(self.batched_cross_entropy, params, x, y, plan.index[0], plan.mask[0], plan.active[0])
        return [g.materialize() if not isinstance(g, Tensor) else g for g in grads]
