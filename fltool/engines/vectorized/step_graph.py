"""The vectorized local step captured once as a CUDA graph and replayed once per step.

A round of small clients is launch-bound on a GPU: ten clients times ten examples is
microseconds of arithmetic, while the eager step launches a hundred-odd kernels from
Python. A graph replays the whole step -- gather the batch, forward, backward, the
algorithm's gradient terms, SGD update, loss sum -- as one launch.

Everything the step touches lives in static buffers that the graph reads in place:
the chunk's data, its whole step plan (index, mask, active; see `plan_chunk`), a step
counter on the device that the graph advances itself, the stacked parameters, the
anchor, the algorithm's context (what its `adjust_gradients_` reads, e.g. SCAFFOLD's
correction) and the loss sums. Running a chunk is: copy its data, plan and the global
model into the buffers, then replay the graph once per step. Nothing in between
waits for the host.

The graph runs the same kernels as the eager step, so it computes the same thing;
dropout draws from the CUDA generator as seeded before the replays (graph-safe RNG),
so a graphed run is deterministic for its seed but draws other masks than an eager one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fltool.algorithms import FedAvg, Stacked
from fltool.engines.vectorized.batched_step import BatchedCrossEntropy, ChunkPlan, match_layout, step_grads, step_update

WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuBLAS/cuDNN handles, autograd)
MAX_CACHED = 4  # graphs kept per engine: a cohort's chunks take at most two shapes


def capacity(n: int) -> int:
    """Buffers grow to the next power of two, so that cohorts of varying size reuse a
    graph instead of capturing a new one every round."""
    return 1 << max(0, n - 1).bit_length()


class StepGraph:
    """One chunk shape's local step (M clients, batch width, sample shape, rule)."""

    def __init__(
        self,
        cross_entropy: BatchedCrossEntropy,
        algorithm: FedAvg,
        global_params: Sequence[Tensor],
        x: Tensor,
        y: Tensor,
        plan: ChunkPlan,
        context: Stacked,
    ) -> None:
        device = x.device
        steps, m, width = plan.index.shape
        self.cross_entropy = cross_entropy
        self.algorithm = algorithm
        self.rows, self.steps = capacity(x.shape[0]), capacity(steps)
        self.x = torch.zeros((self.rows, *x.shape[1:]), dtype=x.dtype, device=device)
        self.y = torch.zeros(self.rows, dtype=y.dtype, device=device)
        self.index = torch.zeros((self.steps, m, width), dtype=plan.index.dtype, device=device)
        self.mask = torch.zeros((self.steps, m, width), dtype=plan.mask.dtype, device=device)
        self.active = torch.zeros((self.steps, m), dtype=plan.active.dtype, device=device)
        self.counter = torch.zeros(1, dtype=torch.long, device=device)
        self.anchor = [torch.zeros_like(p) for p in global_params]
        self.ce_sums = torch.zeros(m, device=device)
        self.context = {name: [torch.zeros_like(t) for t in ts] for name, ts in context.items()}
        self.params = [p.detach().unsqueeze(0).repeat(m, *([1] * p.dim())).requires_grad_(True) for p in global_params]
        self.load(global_params, x, y, plan, context)
        self.graph = self.capture()

    def fits(self, x: Tensor, plan: ChunkPlan) -> bool:
        return x.shape[0] <= self.rows and plan.index.shape[0] <= self.steps

    def load(self, global_params: Sequence[Tensor], x: Tensor, y: Tensor, plan: ChunkPlan, context: Stacked) -> None:
        """Put a chunk into the static buffers and reset the parameters to the global model."""
        steps, rows = plan.index.shape[0], x.shape[0]
        with torch.no_grad():
            self.x[:rows].copy_(x)
            self.y[:rows].copy_(y)
            self.index[:steps].copy_(plan.index)
            self.mask[:steps].copy_(plan.mask)
            self.active[:steps].copy_(plan.active)
            for p, a, g in zip(self.params, self.anchor, global_params, strict=True):
                p.copy_(g.unsqueeze(0).expand_as(p))
                a.copy_(g)
            for name, ts in self.context.items():
                torch._foreach_copy_(ts, context[name])
            self.ce_sums.zero_()
            self.counter.zero_()

    def step(self, relayout: bool = False) -> None:
        """One eager step on the batch at the device-side step counter."""
        s = self.counter
        active = self.active.index_select(0, s).squeeze(0)
        ce, grads = step_grads(
            self.cross_entropy,
            self.params,
            self.x,
            self.y,
            self.index.index_select(0, s).squeeze(0),
            self.mask.index_select(0, s).squeeze(0),
            active,
        )
        if relayout:
            self.params = match_layout(self.params, grads)
        step_update(self.params, grads, self.anchor, self.algorithm, self.context, active)
        with torch.no_grad():
            self.ce_sums.add_(ce.detach())
            self.counter.add_(1)

    def capture(self) -> torch.cuda.CUDAGraph:
        """Warm up, then capture one step. Warm-up leaves the buffers dirty; `run` reloads them."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # the warm-up steps advance the generator; the caller seeds it afresh per chunk
        with torch.random.fork_rng(devices=[self.x.device]), torch.cuda.stream(side):
            for i in range(WARMUP_STEPS):
                self.counter.zero_()  # a plan can be a single step long
                self.step(relayout=i == 0)
            self.counter.zero_()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.random.fork_rng(devices=[self.x.device]), torch.cuda.graph(graph):
            self.step()
        return graph

    def run(
        self, global_params: Sequence[Tensor], x: Tensor, y: Tensor, plan: ChunkPlan, context: Stacked
    ) -> tuple[list[Tensor], Tensor]:
        """Train one chunk: the stacked client parameters and per-client loss sums. Both
        are the graph's own buffers, valid until its next run."""
        self.load(global_params, x, y, plan, context)
        for _ in range(plan.index.shape[0]):
            self.graph.replay()
        return [p.detach() for p in self.params], self.ce_sums


class StepGraphCache:
    """Captured step graphs by chunk shape, the most recently used last."""

    def __init__(self, cross_entropy: BatchedCrossEntropy) -> None:
        self.cross_entropy = cross_entropy
        self.graphs: dict[tuple, StepGraph] = {}

    def clear(self) -> None:
        self.graphs.clear()

    def get(
        self, algorithm: FedAvg, global_params: Sequence[Tensor], x: Tensor, y: Tensor, plan: ChunkPlan, context: Stacked
    ) -> StepGraph:
        """The graph for this chunk's shape, captured now if there is none that fits."""
        _, m, width = plan.index.shape
        shapes = tuple((name, tuple(t.shape for t in ts)) for name, ts in sorted(context.items()))
        key = (id(algorithm), algorithm.rule, m, width, tuple(x.shape[1:]), x.dtype, tuple((p.shape, p.dtype) for p in global_params), shapes)
        graph = self.graphs.pop(key, None)
        if graph is not None and graph.fits(x, plan):
            self.graphs[key] = graph
            return graph
        del graph  # its buffers go before a larger one is allocated
        while len(self.graphs) >= MAX_CACHED:
            self.graphs.pop(next(iter(self.graphs)))
        self.graphs[key] = StepGraph(self.cross_entropy, algorithm, global_params, x, y, plan, context)
        return self.graphs[key]
