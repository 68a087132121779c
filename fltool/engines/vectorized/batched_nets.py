"""A hand-batched forward pass for plain `nn.Sequential` conv/MLP models.

vmap's batching rules move the client dim around after every conv and pool, which
costs a copy per layer; on CPU that made a vmap'd McMahan CNN step slower than running
the clients one by one. Here the client dim is folded into the layout once:
- conv stage: (B, M*C, H, W) -- one grouped convolution (groups=M) serves all clients,
  and pooling, ReLU and dropout act on it as they are;
- dense stage: (M, B, F) -- one batched matmul per Linear (`BatchedLinear`).

The alternatives measured for the conv stage (a convolution per client, im2col +
batched matmul) are in docs/engines.md.

Only the layer types below are supported; `supports` says whether a model qualifies,
otherwise the engine falls back to vmap. Numerically it is the same network as
`functional_call(model, ...)` per client.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fltool.models.nets import Residual

# (stacked params in model.parameters() order, x (M, B, ...)) -> logits (M, B, K)
BatchedApply = Callable[[Sequence[Tensor], Tensor], Tensor]

_ELEMENTWISE = (nn.ReLU, nn.Dropout, nn.MaxPool2d)
# layers that act on the grouped (B, M*C, H, W) layout as they are, or per channel group
_CONV_STAGE = (nn.ReLU, nn.Dropout, nn.MaxPool2d, nn.GroupNorm, nn.AdaptiveAvgPool2d)


def supports(model: nn.Module) -> bool:
    if not isinstance(model, nn.Sequential) or len(list(model.buffers())) > 0:
        return False
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.GroupNorm, nn.AdaptiveAvgPool2d, Residual)):
            if not _conv_stage_supported(layer):
                return False
        elif isinstance(layer, nn.Flatten):
            if (layer.start_dim, layer.end_dim) != (1, -1):
                return False
        elif not isinstance(layer, (nn.Linear, *_ELEMENTWISE)):
            return False
    return True


def _conv_stage_supported(layer: nn.Module) -> bool:
    """A layer the grouped layout runs: a plain Conv2d, a GroupNorm (with affine weights
    or none), pooling, or a `Residual` of such layers."""
    if isinstance(layer, nn.Conv2d):
        return layer.groups == 1 and layer.padding_mode == "zeros" and isinstance(layer.padding, tuple)
    if isinstance(layer, Residual):
        return all(_conv_stage_supported(sub) for part in (layer.body, layer.shortcut) for sub in part)
    return isinstance(layer, _CONV_STAGE)


@dataclass(frozen=True)
class LowRankGrad:
    """A batched weight gradient kept as its two factors, left @ right: (M, O, B) @ (M, B, I).

    A dense layer's weight gradient on a batch of B examples has rank B. Materialised, the
    CNN's 3136x512 one is 6.4 MB a client that the backward writes and the SGD update
    reads again, on top of the update's own pass over the weights; from the factors the
    update is one GEMM that accumulates into the weights (`sgd_step`): these layers are
    bound by memory traffic on CPU (docs/engines.md). An algorithm that adjusts
    gradients gets them materialised."""

    left: Tensor
    right: Tensor

    def materialize(self) -> Tensor:
        return torch.bmm(self.left, self.right)


class LowRankGrads:
    """Where `BatchedLinear` leaves its weight gradients as factors during one step
    (see `collect_low_rank_grads`), keyed by the weight tensor's identity."""

    def __init__(self) -> None:
        self._grads: dict[int, LowRankGrad | None] = {}

    def expect(self, w: Tensor) -> None:
        self._grads[id(w)] = None

    def put(self, w_id: int, grad: LowRankGrad) -> None:
        self._grads[w_id] = grad

    def __contains__(self, w: Tensor) -> bool:
        return id(w) in self._grads

    def pop(self, w: Tensor) -> LowRankGrad:
        grad = self._grads.pop(id(w))
        if grad is None:
            raise RuntimeError("a weight registered for a low-rank gradient got none: was the backward run?")
        return grad


_LOW_RANK: ContextVar[LowRankGrads | None] = ContextVar("fltool_low_rank_grads", default=None)


@contextlib.contextmanager
def collect_low_rank_grads() -> Iterator[LowRankGrads]:
    """Forward passes inside hand their `BatchedLinear` weight gradients to the yielded
    sink as `LowRankGrad`s (left there by the backward, which may run after the block),
    not to autograd: differentiate only the other parameters."""
    sink = LowRankGrads()
    token = _LOW_RANK.set(sink)
    try:
        yield sink
    finally:
        _LOW_RANK.reset(token)


class BatchedLinear(torch.autograd.Function):
    """y_m = x_m W_m^T + b_m for every client m: x (M, B, I), W (M, O, I), b (M, O) or None.

    The same math as `autograd_linear`, with the matmuls oriented by hand: y^T = W x^T
    (through autograd, `x @ W^T` ran MKL's slow transposed GEMM), and W's gradient as g^T x, in W's own layout,
    so the SGD update sweeps memory linearly. Inside `collect_low_rank_grads`, W's
    gradient is left as the factors (g^T, x) instead. Used on CPU for large layers (see
    `_linear`).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, sink: LowRankGrads | None = None) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        ctx.sink, ctx.weight_id = sink, id(w)
        if sink is not None:
            sink.expect(w)
        xt = x.transpose(1, 2)
        out = torch.bmm(w, xt) if b is None else torch.baddbmm(b.unsqueeze(2), w, xt)
        # contiguous: a transposed output made the next layers' kernels slower (2NN)
        return out.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, w = ctx.saved_tensors
        gx = torch.bmm(g, w) if ctx.needs_input_grad[0] else None
        if ctx.sink is not None:
            ctx.sink.put(ctx.weight_id, LowRankGrad(g.transpose(1, 2), x))
            gw = None
        else:
            gw = torch.bmm(g.transpose(1, 2), x)
        gb = g.sum(1) if ctx.has_bias else None
        return gx, gw, gb, None


def autograd_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """`BatchedLinear`'s math as plain batched matmuls, differentiated by autograd."""
    return torch.bmm(x, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


# BatchedLinear's Python cost (an autograd.Function a layer a step) pays off for large
# layers only (docs/engines.md)
BATCHED_LINEAR_MIN_WEIGHTS = 2**20  # per client


def uses_batched_linear(x: Tensor, w: Tensor) -> bool:
    # CUDA keeps autograd_linear: the form measured and tested under graph capture on the
    # H100, where BatchedLinear has not been timed yet (`bench_engines.py --variant`)
    return x.device.type == "cpu" and w[0].numel() >= BATCHED_LINEAR_MIN_WEIGHTS


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    if not uses_batched_linear(x, w):
        return autograd_linear(x, w, b)
    # only a layer with a bias: autograd runs a layer's backward only for a gradient it was
    # asked for, and the bias's is always asked; a bias-free first layer would hand none
    sink = _LOW_RANK.get() if b is not None else None
    if torch.is_autocast_enabled(x.device.type):
        # bf16 autocast leaves these layers in fp32: at a client's batch of 10 they are
        # bound by moving the weights (6.4 MB a client for the CNN's 3136x512), and a
        # bf16 copy of them and of their gradient only adds passes over that memory
        with torch.autocast(x.device.type, enabled=False):
            return BatchedLinear.apply(x.float(), w, b, sink)
    return BatchedLinear.apply(x, w, b, sink)


def conv_layout(device: torch.device) -> torch.memory_format:
    """Channels-last on CPU, where oneDNN's grouped convolution ran faster in it; the
    default layout on CUDA, where cuDNN's ran slower in it (docs/engines.md)."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def _dropout(h: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout, each element kept with probability 1 - p.

    On CPU the mask is drawn here (`_keep_mask`), cheaper than `F.dropout`'s bernoulli_
    (docs/engines.md). CUDA keeps F.dropout's one fused kernel, as tested under graph
    capture."""
    if h.device.type != "cpu" or not training or not 0 < p < 1:
        return F.dropout(h, p, training)
    return h * _keep_mask(h, p)


def _keep_mask(h: Tensor, p: float) -> Tensor:
    """fp32 0 or 1/(1-p) for every element of h, independently 1/(1-p) with probability
    1 - p, in h's memory layout (fp32 under bf16 autocast too, as the scale is).

    Where p is a multiple of 2^-n for an n <= 8 (0.5, 0.25: the shipped models'), each
    element takes n random bits, looked up a byte at a time (`_keep_table`): the CPU
    generator makes uniforms one Mersenne Twister draw each, which cost more than the
    bits (docs/engines.md). Other p compare fp32 uniforms with p (a grid of 2^-24)."""
    bits = next((n for n in range(1, 9) if (p * 2**n).is_integer()), None)
    if bits is None:
        return torch.rand_like(h, dtype=torch.float32).ge_(p).mul_(1 / (1 - p))
    table = _keep_table(p, bits)
    numel = h.numel()
    flat = table.index_select(0, _random_bytes(-(-numel // table.shape[1])).int()).view(-1)[:numel]
    # the elements are independent, so any order fills the mask: h's own if dense
    dense = h.is_contiguous() or (h.dim() == 4 and h.is_contiguous(memory_format=torch.channels_last))
    return flat.as_strided(h.shape, h.stride()) if dense else flat.view(h.shape)


@functools.lru_cache(maxsize=8)
def _keep_table(p: float, bits: int) -> Tensor:
    """(256, 8 // bits): row v holds the mask values of byte v's fields of `bits` bits, a
    field kept (1/(1-p)) when its value is at least p * 2^bits, so with probability
    exactly 1 - p for a uniform byte."""
    per_byte = 8 // bits
    fields = (torch.arange(256).unsqueeze(1) >> (torch.arange(per_byte) * bits)) & (2**bits - 1)
    return fields.ge(round(p * 2**bits)).float().mul_(1 / (1 - p))


# int64 random_() keeps the low 63 bits of two 32-bit Mersenne Twister draws, so 7 of a
# draw's 8 bytes are uniform (the one holding bit 63 is not)
_UNIFORM_BYTES = slice(0, 7) if sys.byteorder == "little" else slice(1, 8)


def _random_bytes(count: int) -> Tensor:
    """`count` independent uniform bytes (uint8) from the default CPU generator."""
    draws = torch.empty(-(-count // 7), dtype=torch.int64).random_()
    return draws.view(torch.uint8).view(-1, 8)[:, _UNIFORM_BYTES].reshape(-1)[:count]


class FlattenGrouped(torch.autograd.Function):
    """Grouped (B, M*C, H, W) in channels-last layout -> (M, B, C*H*W), each client's
    (C, H, W) flattened in PyTorch's order, with the gradient handed back channels-last.

    A plain reshape hands back a default-layout gradient, and the max-pool backward
    that receives it next, its indices being channels-last, took a slow mixed-layout
    path on CPU (docs/engines.md)."""

    @staticmethod
    def forward(ctx, h: Tensor, m: int) -> Tensor:
        ctx.shape = h.shape
        return _client_major(h, m)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        return g.transpose(0, 1).reshape(ctx.shape).contiguous(memory_format=torch.channels_last), None


def _client_major(h: Tensor, m: int) -> Tensor:
    """(B, M*C, H, W) -> (M, B, C*H*W): client m owns channels [m*C, (m+1)*C), so this
    keeps each client's (C, H, W) flattening order."""
    return h.reshape(h.shape[0], m, -1).transpose(0, 1)


def _flatten_grouped(h: Tensor, m: int) -> Tensor:
    # channels-last (CPU) needs its gradient back in that layout; CUDA's default layout
    # keeps the plain reshape, the form tested under graph capture
    if h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous():
        return FlattenGrouped.apply(h, m)
    return _client_major(h, m)


def _grouped(h: Tensor, m: int) -> Tensor:
    """(M, B, C, H, W) -> (B, M*C, H, W)."""
    return h.transpose(0, 1).reshape(h.shape[1], m * h.shape[2], *h.shape[3:])


def pool_before_relu(layers: Sequence[nn.Module]) -> list[nn.Module]:
    """Every ReLU directly followed by a MaxPool2d swapped with it.

    max-pooling commutes with ReLU (a nondecreasing map; padding is -inf), and the
    gradients agree too: where a window's maximum is positive both orders route it to
    the same (first) argmax, and elsewhere ReLU's gradient is 0 either way. So the
    result is bitwise the same, with ReLU's forward and backward on a quarter of the
    elements (measured in docs/engines.md)."""
    out = list(layers)
    for i in range(len(out) - 1):
        if isinstance(out[i], nn.ReLU) and isinstance(out[i + 1], nn.MaxPool2d):
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def make_batched_apply(model: nn.Sequential) -> BatchedApply:
    if not supports(model):
        raise ValueError("model is not a plain Sequential of Conv2d/Linear/ReLU/MaxPool2d/Dropout/Flatten")
    layers = pool_before_relu(model)

    def apply(params: Sequence[Tensor], x: Tensor) -> Tensor:
        m = x.shape[0]
        layout = conv_layout(x.device)
        it: Iterator[Tensor] = iter(params)
        h, grouped = x, False
        for layer in layers:
            if isinstance(layer, (nn.Conv2d, nn.GroupNorm, nn.AdaptiveAvgPool2d, Residual)):
                if not grouped:
                    h, grouped = _grouped(h, m).contiguous(memory_format=layout), True
                h = _conv_stage(layer, h, it, m, layout)
            elif isinstance(layer, nn.MaxPool2d):
                if not grouped:
                    h, grouped = _grouped(h, m), True
                h = F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.ceil_mode)
            elif isinstance(layer, nn.ReLU):
                h = F.relu(h)
            elif isinstance(layer, nn.Dropout):
                h = _dropout(h, layer.p, layer.training)
            elif isinstance(layer, nn.Flatten):
                h = _flatten_grouped(h, m) if grouped else h.flatten(2)
                grouped = False
            elif isinstance(layer, nn.Linear):
                w = next(it)
                b = next(it) if layer.bias is not None else None
                h = _linear(h, w, b)
        return h

    return apply


def _conv_stage(layer: nn.Module, h: Tensor, it: Iterator[Tensor], m: int, layout: torch.memory_format) -> Tensor:
    """One conv-stage layer on the grouped (B, M*C, H, W) activations of M clients,
    taking its parameters from `it` in `model.parameters()` order.

    - Conv2d: one convolution with groups=M.
    - GroupNorm(G, C): client m's channels are [m*C, (m+1)*C) and its groups contiguous
      runs of C/G of them, so GroupNorm(M*G, M*C) with the stacked affine parameters is
      every client's own GroupNorm.
    - Residual: body and shortcut each in this layout (an empty shortcut is the identity)."""
    if isinstance(layer, nn.Conv2d):
        w = next(it)
        b = next(it) if layer.bias is not None else None
        return F.conv2d(
            h,
            w.reshape(-1, *w.shape[2:]).contiguous(memory_format=layout),
            None if b is None else b.reshape(-1),
            layer.stride,
            layer.padding,
            layer.dilation,
            groups=m,
        )
    if isinstance(layer, nn.GroupNorm):
        w = next(it).reshape(-1) if layer.affine else None
        b = next(it).reshape(-1) if layer.affine else None
        return F.group_norm(h, m * layer.num_groups, w, b, layer.eps)
    if isinstance(layer, nn.AdaptiveAvgPool2d):
        return F.adaptive_avg_pool2d(h, layer.output_size)
    if isinstance(layer, nn.MaxPool2d):
        return F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.ceil_mode)
    if isinstance(layer, nn.ReLU):
        return F.relu(h)
    if isinstance(layer, nn.Dropout):
        return _dropout(h, layer.p, layer.training)
    if isinstance(layer, Residual):
        out = h
        for sub in layer.body:
            out = _conv_stage(sub, out, it, m, layout)
        skip = h
        for sub in layer.shortcut:
            skip = _conv_stage(sub, skip, it, m, layout)
        return out + skip
    raise ValueError(f"{type(layer).__name__} is not a conv-stage layer")
