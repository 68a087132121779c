"""The hand-batched network: per-client gradients and dropout statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fltool.engines.vectorized import batched_nets
from fltool.engines.vectorized.batched_nets import BatchedLinear, _dropout, autograd_linear, make_batched_apply, pool_before_relu
from fltool.engines.base import make_apply_fn
from fltool.models import build_model

BIAS_FREE_DENSE = nn.Sequential(  # a Linear without bias, and one whose input needs a gradient
    nn.Conv2d(2, 3, 3),
    nn.Flatten(),
    nn.Linear(3 * 4 * 4, 12, bias=False),
    nn.ReLU(),
    nn.Linear(12, 10),
)


@pytest.fixture
def every_dense_layer_batched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Use BatchedLinear on CPU however small the layer (the tests' models are tiny)."""
    monkeypatch.setattr(batched_nets, "BATCHED_LINEAR_MIN_WEIGHTS", 0)


@pytest.mark.parametrize("dense", ["BatchedLinear", "autograd_linear"])
@pytest.mark.parametrize(
    "model_name,shape", [("mlp", (1, 8, 8)), ("cnn", (1, 12, 12)), ("cnn_cifar", (3, 10, 10)), ("bias_free", (2, 6, 6))]
)
def test_batched_gradients_equal_each_clients_own(
    model_name: str, shape: tuple[int, ...], dense: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gradient of the summed per-client losses w.r.t. the stack is, slice by slice,
    each client's own gradient, with either form of the dense layers."""
    monkeypatch.setattr(batched_nets, "BATCHED_LINEAR_MIN_WEIGHTS", 0 if dense == "BatchedLinear" else 2**62)
    torch.manual_seed(0)
    model = BIAS_FREE_DENSE if model_name == "bias_free" else build_model(model_name, shape, 10)
    model.eval()  # no dropout: the batched and per-client passes must see the same network
    m = 3
    # distinct clients of a sane scale (a shift of every weight by the same step blows the logits up)
    stacked = [torch.stack([p.detach() * (1 + 0.05 * k) for k in range(m)]).requires_grad_(True) for p in model.parameters()]
    x, y = torch.randn(m, 5, *shape), torch.randint(10, (m, 5))
    logits = make_batched_apply(model)(stacked, x)
    batched = torch.autograd.grad(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"), stacked)
    apply_fn = make_apply_fn(model)
    for k in range(m):
        own = [p[k].detach().requires_grad_(True) for p in stacked]
        expected = torch.autograd.grad(F.cross_entropy(apply_fn(own, x[k]), y[k], reduction="sum"), own)
        for got, want in zip(batched, expected, strict=True):
            assert got[k].shape == want.shape
            torch.testing.assert_close(got[k], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)])
def test_pool_before_relu_is_bitwise_the_same(pool: nn.MaxPool2d) -> None:
    """Value and gradient, with ties among positive values and all-negative windows."""
    torch.manual_seed(0)
    x = torch.randint(-3, 3, (4, 5, 9, 9)).float().requires_grad_(True)  # integers: many ties
    g = torch.randn(pool(x).shape)
    relu_first = nn.Sequential(nn.ReLU(), pool)
    swapped = pool_before_relu(relu_first)
    assert [type(layer) for layer in swapped] == [nn.MaxPool2d, nn.ReLU]
    out_a, out_b = relu_first(x), nn.Sequential(*swapped)(x)
    assert torch.equal(out_a, out_b)
    assert torch.equal(*(torch.autograd.grad(out, x, g)[0] for out in (out_a, out_b)))


def test_pool_before_relu_leaves_other_orders_alone() -> None:
    layers = [nn.MaxPool2d(2), nn.ReLU(), nn.Dropout(), nn.ReLU(), nn.Linear(2, 2), nn.ReLU(), nn.MaxPool2d(2)]
    assert [type(x) for x in pool_before_relu(layers)] == [
        nn.MaxPool2d, nn.ReLU, nn.Dropout, nn.ReLU, nn.Linear, nn.MaxPool2d, nn.ReLU
    ]


@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_batched_linear_equals_autograd_linear(bias: bool, input_grad: bool) -> None:
    """The two forms of the dense layer agree in value and gradient."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, requires_grad=input_grad)
    w = torch.randn(3, 4, 7, requires_grad=True)
    b = torch.randn(3, 4, requires_grad=True) if bias else None
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    g = torch.randn(3, 5, 4)
    ours = BatchedLinear.apply(x, w, b)
    theirs = autograd_linear(x, w, b)
    torch.testing.assert_close(ours, theirs)
    for a, e in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(theirs, inputs, g), strict=True):
        torch.testing.assert_close(a, e)


def test_weight_gradients_come_in_the_weights_layout(every_dense_layer_batched) -> None:
    """So the SGD update sweeps memory linearly (see BatchedLinear)."""
    model = build_model("mlp", (1, 4, 4), 10)
    stacked = [torch.stack([p.detach()] * 2).requires_grad_(True) for p in model.parameters()]
    out = make_batched_apply(model)(stacked, torch.randn(2, 3, 1, 4, 4))
    grads = torch.autograd.grad(out.sum(), stacked)
    assert all(g.is_contiguous() for g in grads)


@pytest.mark.parametrize("bias", [True, False])
def test_inside_collect_low_rank_grads_the_weight_gradient_is_its_two_factors(bias: bool) -> None:
    """Autograd gets no gradient for the weight; the sink holds factors whose product is
    the gradient BatchedLinear computes outside it, and the other gradients are unchanged."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, requires_grad=True)
    w = torch.randn(3, 4, 7, requires_grad=True)
    b = torch.randn(3, 4, requires_grad=True) if bias else None
    g = torch.randn(3, 5, 4)
    others = [x] + ([b] if bias else [])
    want = torch.autograd.grad(BatchedLinear.apply(x, w, b), [w, *others], g)
    with batched_nets.collect_low_rank_grads() as sink:
        out = BatchedLinear.apply(x, w, b, batched_nets._LOW_RANK.get())
    assert w in sink and x not in sink
    got = torch.autograd.grad(out, others, g)
    low_rank = sink.pop(w)
    assert low_rank.left.shape == (3, 4, 5) and low_rank.right.shape == (3, 5, 7)
    torch.testing.assert_close(low_rank.materialize(), want[0])
    for a, e in zip(got, want[1:], strict=True):
        torch.testing.assert_close(a, e)


def test_a_registered_weight_whose_backward_never_ran_is_an_error() -> None:
    w = torch.randn(2, 3, 4, requires_grad=True)
    with batched_nets.collect_low_rank_grads() as sink:
        BatchedLinear.apply(torch.randn(2, 5, 4), w, None, batched_nets._LOW_RANK.get())
    with pytest.raises(RuntimeError, match="got none"):
        sink.pop(w)


def test_cpu_dropout_keeps_1_minus_p_and_rescales() -> None:
    torch.manual_seed(0)
    h = torch.ones(400_000)
    out = _dropout(h, 0.25, True)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.003  # 4 standard errors (0.0007)
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.75))
    assert torch.equal(_dropout(h, 0.25, False), h)  # eval: identity
    assert torch.equal(_dropout(h, 0.0, True), h)
    assert not _dropout(h, 1.0, True).any()


@pytest.mark.parametrize("p", [0.5, 0.25, 0.125, 0.75, 0.3])
def test_cpu_keep_mask_is_independent_with_rate_1_minus_p(p: float) -> None:
    """Dyadic p draws a few random bits per element (0.3 compares uniforms): the keep rate
    is 1 - p overall (a byte holding bit 63, which random_ leaves 0, would bias it by
    ~1/64) and at every position of a draw's 56 bits, and neighbours are independent."""
    torch.manual_seed(0)
    h = torch.ones(2_000_000)
    kept = (batched_nets._keep_mask(h, p) != 0).float()
    n, se = h.numel(), (p * (1 - p) / h.numel()) ** 0.5
    assert abs(kept.mean().item() - (1 - p)) < 5 * se
    per_position = kept[: n // 56 * 56].view(-1, 56).mean(0)  # 5 standard errors of a column
    assert (per_position - (1 - p)).abs().max().item() < 5 * se * 56**0.5
    both = (kept[:-1] * kept[1:]).mean().item()  # within a byte and across bytes
    assert abs(both - (1 - p) ** 2) < 5 * se
    scale = torch.tensor(1.0).mul_(1 / (1 - p))  # fp32, as the uniform path scales
    assert torch.equal(batched_nets._keep_mask(h, p).unique(), torch.stack([torch.tensor(0.0), scale]))


def test_cpu_keep_mask_follows_the_seed_and_the_layout() -> None:
    h = torch.randn(10, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(3)
    first = batched_nets._keep_mask(h, 0.25)
    torch.manual_seed(3)
    assert torch.equal(batched_nets._keep_mask(h, 0.25), first)
    assert first.is_contiguous(memory_format=torch.channels_last) and first.dtype == torch.float32
    strided = torch.randn(6, 4).t()  # neither layout: a plain contiguous mask
    assert batched_nets._keep_mask(strided, 0.5).shape == (4, 6)


def test_cpu_dropout_gradient_is_the_same_mask() -> None:
    torch.manual_seed(0)
    h = torch.randn(1000, requires_grad=True)
    out = _dropout(h, 0.5, True)
    (grad,) = torch.autograd.grad(out.sum(), h)
    torch.testing.assert_close(grad, torch.where(out != 0, 2.0, 0.0))


def test_grouped_flatten_matches_reshape_and_returns_a_channels_last_gradient() -> None:
    """Same values and gradient as the plain reshape, in the layout the pool backward wants."""
    h = torch.randn(5, 2 * 3, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    plain = h.reshape(5, 2, -1).transpose(0, 1)
    ours = batched_nets._flatten_grouped(h, 2)
    assert torch.equal(ours, plain)
    g = torch.randn_like(plain)
    (want,), (got,) = torch.autograd.grad(plain, h, g), torch.autograd.grad(ours, h, g)
    assert torch.equal(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last)
