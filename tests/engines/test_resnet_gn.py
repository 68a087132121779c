"""ResNet-8 with GroupNorm: the hand-batched forward runs its GroupNorm (as one
GroupNorm of M*G groups over the grouped layout) and residual blocks, so the vectorized
engine trains it without vmap, CUDA graphs included, and equals the sequential engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fltool.engines import SequentialEngine, VectorizedEngine
from fltool.engines.base import make_apply_fn
from fltool.engines.vectorized.batched_nets import make_batched_apply, supports
from fltool.models import build_model
from fltool.models.nets import Residual

from .helpers import assert_same_outcome, cohort_mean, global_params, initial_state, make_algorithm, make_clients

SHAPE = (3, 8, 8)


@pytest.fixture(autouse=True)
def _tiny_tensors(one_thread):
    """One torch thread (see `one_thread`)."""


def test_resnet8_gn_is_hand_batched_and_small() -> None:
    model = build_model("resnet8_gn", (3, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == 78_042
    assert supports(model) and VectorizedEngine(model, seed=0).batched_apply is not None
    assert not supports(nn.Sequential(Residual(nn.Sequential(nn.Conv2d(3, 3, 3), nn.Tanh()))))


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda: build_model("resnet8_gn", SHAPE, 10), id="resnet8_gn"),
        pytest.param(  # GroupNorm without affine parameters, a pooled head, a shortcut with a bias
            lambda: nn.Sequential(
                nn.GroupNorm(1, 3, affine=False),
                Residual(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), nn.Sequential(nn.Conv2d(3, 4, 1))),
                nn.AdaptiveAvgPool2d(2),
                nn.Flatten(),
                nn.Linear(16, 10),
            ),
            id="odd",
        ),
    ],
)
def test_hand_batched_forward_equals_per_client_forward(model) -> None:
    torch.manual_seed(0)
    net = model()
    assert supports(net)
    stacked = [torch.stack([p.detach() + 0.05 * torch.randn_like(p) for _ in range(3)]) for p in net.parameters()]
    x = torch.randn(3, 5, *SHAPE)
    batched = make_batched_apply(net)(stacked, x)
    apply_fn = make_apply_fn(net)
    for k in range(3):
        torch.testing.assert_close(batched[k], apply_fn([p[k] for p in stacked], x[k]), atol=1e-5, rtol=1e-4)


def both_engines(mode: str, shape: tuple[int, ...], dtype: torch.dtype):
    torch.manual_seed(0)
    model = build_model("resnet8_gn", shape, 10).to(dtype)
    params = global_params(model)
    algorithm = make_algorithm(mode)
    clients = make_clients(shape)
    for c in clients:
        c.x = c.x.to(dtype)
    seq = cohort_mean(SequentialEngine(model, seed=3), params, clients, algorithm, 2, initial_state(algorithm, params, scale=0.01))
    vec = cohort_mean(VectorizedEngine(model, seed=3), params, clients, algorithm, 2, initial_state(algorithm, params, scale=0.01))
    return seq, vec


@pytest.mark.parametrize("mode", ["fedavg", "fedprox", "scaffold"])
def test_vectorized_equals_sequential_in_float64(mode: str) -> None:
    """The same math: equal to float64 rounding over a round of unequal clients (E=2)."""
    seq, vec = both_engines(mode, SHAPE, torch.float64)
    assert_same_outcome(vec, seq, atol=1e-10, rtol=1e-9)
    assert all(d.abs().sum() > 0 for d in vec.delta)


def test_vectorized_matches_sequential_in_float32() -> None:
    """In float32 the two sum in different orders (one GroupNorm over M*G groups, not M of
    G). A group whose inputs are nearly constant (dead ReLUs on a small feature map) has a
    variance near 0, where rounding is scaled by up to 1/sqrt(eps) and two float32 runs
    can drift apart by percents in a few steps (float64 agrees); at 16x16 this round's
    clients stay within the engines' usual tolerance."""
    seq, vec = both_engines("fedavg", (3, 16, 16), torch.float32)
    assert_same_outcome(vec, seq)
