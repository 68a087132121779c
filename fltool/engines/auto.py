"""`federated.engine: auto`: choose the engine by trying it, before training.

The vectorized engine runs a model hand-batched (plain conv/MLP stacks) or under vmap
(anything else), and vmap has no batching rule for some ops (an LSTM's
`aten::lstm.input`): such a model used to crash in round 1. `auto` now builds the
vectorized engine and probes one batched forward and backward for 2 clients on a batch
of 2 of the model's `example_input_array` (set from the training data by
`seeded_model`), and falls back to the sequential engine when anything fails. The
choice and its reason are printed to stderr (stdout stays free for `train --json`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fltool.class_path import first_line
from fltool.engines.vectorized.batched_nets import supports
from fltool.engines.vectorized.engine import VectorizedEngine
from fltool.models.setup import has_running_stats

PROBE_CLIENTS = 2


def choose_engine(model: nn.Module, build_vectorized: Callable[[], VectorizedEngine]) -> tuple[VectorizedEngine | None, str]:
    """(the vectorized engine, or None for sequential; why), by the probe."""
    if has_running_stats(model):
        return None, "the model keeps BatchNorm running statistics, which one stacked forward cannot update per client"
    x = getattr(model, "example_input_array", None)
    if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[0] == 0:
        # nothing to probe with (a model built outside `seeded_model`): only the
        # hand-batched layers, which every input they take batches, are safe to assume
        if supports(model):
            return build_vectorized(), "its layers are all hand-batched (no example input to probe with)"
        return None, "no example input (model.example_input_array) to probe a batched step with"
    try:
        engine = build_vectorized()
        probe_step(engine, model, x[:2])
    except Exception as exc:  # whatever the batched step raises, sequential still trains the model
        return None, f"a batched step fails on it ({type(exc).__name__}: {first_line(exc)[:120]})"
    path = "hand-batched" if engine.batched_apply is not None else "vmap"
    return engine, f"a batched step of {PROBE_CLIENTS} clients runs ({path})"


def probe_step(engine: VectorizedEngine, model: nn.Module, x: Tensor) -> None:
    """One masked cross-entropy forward and backward for PROBE_CLIENTS stacked copies of
    the model; raises if the batched path cannot run it or its results are not finite."""
    params = [p.detach().unsqueeze(0).repeat(PROBE_CLIENTS, *([1] * p.ndim)).requires_grad_() for p in model.parameters()]
    xs = x.unsqueeze(0).expand(PROBE_CLIENTS, *x.shape).contiguous()
    y = torch.zeros((PROBE_CLIENTS, x.shape[0]), dtype=torch.int64, device=x.device)
    mask = torch.ones((PROBE_CLIENTS, x.shape[0]), device=x.device)
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[x.device.index or 0] if x.device.type == "cuda" else []):
            ce = engine.batched_cross_entropy(tuple(params), xs, y, mask)
            grads = torch.autograd.grad(ce.sum(), params, allow_unused=True)
    finally:
        model.train(was_training)
    if ce.shape != (PROBE_CLIENTS,) or not bool(torch.isfinite(ce).all()):
        raise RuntimeError(f"the batched loss is {list(ce.shape)}, finite: {bool(torch.isfinite(ce).all())}")
    if any(g is None for g in grads):
        raise RuntimeError("some parameters get no gradient from the batched step")


def announce(name: str, reason: str) -> None:
    print(f"federated.engine: auto chose {name}: {reason}", file=sys.stderr, flush=True)
