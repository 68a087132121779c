"""federated.amp: bf16 autocast of the clients' forward passes, fp32 everywhere else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fltool.cli import app
from fltool.config import load_config
from fltool.engines.base import make_apply_fn, with_amp
from fltool.engines.sequential import SequentialEngine
from fltool.engines.vectorized import batched_nets
from fltool.engines.vectorized.engine import VectorizedEngine
from fltool.models import build_model
from fltool.run.metrics import read_metrics

from .helpers import BASIC, SIZES, cohort_mean, global_params, make_algorithm, make_clients, relative_update_error

MODELS = [("mlp", (1, 8, 8)), ("cnn", (1, 12, 12)), ("cnn_cifar", (3, 10, 10))]


def model_without_dropout(name: str, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    for layer in model.modules():
        if isinstance(layer, nn.Dropout):  # the engines' draws differ by design
            layer.p = 0.0
    return model


def onednn_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions in oneDNN (avx512/AMX: fp32 accumulation
    whatever the layout); elsewhere (e.g. AVX2) PyTorch falls back to its own
    `_slow_conv2d`, im2col + bf16 GEMM + col2im, whose rounding depends on the layout."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported and supported())


@pytest.mark.parametrize("mode", BASIC)
@pytest.mark.parametrize("model_name,shape", MODELS)
def test_bf16_engines_agree_and_differ_from_fp32(
    mode: str, model_name: str, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """Both engines cast the same tensors, so with the same kernels their bf16 cohorts
    agree to float summation order; and bf16 really ran.

    Same kernels: the vectorized engine's convolutions take the sequential engine's
    (contiguous) layout here. Its CPU default, channels-last, is a kernel choice that
    changes bf16 rounding on CPUs without oneDNN bf16 (AVX2: `_slow_conv2d` in both
    engines, whose bf16 input gradients then differ by ~0.7% a step between layouts,
    as much as each differs from fp64): that layout is tested below for accuracy.
    One local epoch (up to 8 steps): bf16 rounding is discontinuous, so over longer
    schedules a rare 1-ulp difference in a dense layer's bf16 GEMM (batched against
    per client) grows to bf16's own noise (measured on an AVX2 CPU: 7.5e-5 after E=1,
    2.8e-2 after E=2 for the CNN)."""
    monkeypatch.setattr(batched_nets, "conv_layout", lambda device: torch.contiguous_format)
    model = model_without_dropout(model_name, shape)
    clients, params = make_clients(shape), global_params(model)
    algorithm = make_algorithm(mode, epochs=1)
    fp32 = cohort_mean(SequentialEngine(model, seed=3), params, clients, algorithm, 2)
    seq = cohort_mean(SequentialEngine(model, seed=3, amp="bf16"), params, clients, algorithm, 2)
    vec = cohort_mean(VectorizedEngine(model, seed=3, amp="bf16"), params, clients, algorithm, 2)
    assert vec.total_weight == sum(SIZES)
    assert all(d.dtype == torch.float32 for d in vec.delta + seq.delta)  # fp32 weights, not a bf16 model
    # measured: <= 1.2e-3 on an AVX2 CPU (AMD EPYC); <= 1e-3 on an AMX CPU over E=2
    assert relative_update_error(vec.delta, seq.delta) < 1e-2
    torch.testing.assert_close(vec.loss_sum, seq.loss_sum, rtol=1e-3, atol=1e-3)
    # and bf16 really ran: on these random-label batches it moves the update by 5-35%
    assert relative_update_error(fp32.delta, seq.delta) > 1e-2


@pytest.mark.parametrize("mode", ["fedavg", "fedprox"])
@pytest.mark.parametrize("model_name,shape", MODELS)
def test_bf16_vectorized_in_its_own_layout_is_as_accurate_as_sequential(
    mode: str, model_name: str, shape: tuple[int, ...], one_thread: None
) -> None:
    """The vectorized engine as it runs by default on CPU (channels-last convolutions),
    over two local epochs: its bf16 update is as close to the fp32 update as the
    sequential engine's is, on every CPU (measured on AVX2: 0.92-1.11 times as far).
    Where oneDNN runs the bf16 convolutions, both layouts accumulate in fp32 and the two
    engines also agree with each other (<= 1e-3 measured on an AMX CPU); on AVX2 CPUs
    they differ by bf16 noise, as far from each other as each is from fp32."""
    assert batched_nets.conv_layout(torch.device("cpu")) == torch.channels_last
    model = model_without_dropout(model_name, shape)
    clients, params = make_clients(shape), global_params(model)
    algorithm = make_algorithm(mode, epochs=2)
    fp32 = cohort_mean(SequentialEngine(model, seed=3), params, clients, algorithm, 2)
    seq = cohort_mean(SequentialEngine(model, seed=3, amp="bf16"), params, clients, algorithm, 2)
    vec = cohort_mean(VectorizedEngine(model, seed=3, amp="bf16"), params, clients, algorithm, 2)
    seq_error = relative_update_error(fp32.delta, seq.delta)
    vec_error = relative_update_error(fp32.delta, vec.delta)
    assert 1e-2 < vec_error < 1.5 * seq_error
    torch.testing.assert_close(vec.loss_sum, seq.loss_sum, rtol=1e-2, atol=1e-2)
    if onednn_bf16():
        # a small fraction of bf16's own noise: a rare 1-ulp difference between batched
        # and per-client GEMMs grows over two epochs (measured: <= 1e-3 on an AMX CPU;
        # on an AVX512-BF16 AMD EPYC 0 for five cases, 1.05e-2 for cnn_cifar/fedprox,
        # whose bf16 update is 0.32 from fp32)
        assert relative_update_error(vec.delta, seq.delta) < 0.1 * seq_error


def test_autocast_apply_returns_fp32_logits_from_a_bf16_forward() -> None:
    model = model_without_dropout("cnn", (1, 12, 12))
    x = torch.randn(4, 1, 12, 12)
    params = global_params(model)
    seen: list[torch.dtype] = []
    model[0].register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    logits = make_apply_fn(model, "bf16")(params, x)
    assert seen == [torch.bfloat16] and logits.dtype == torch.float32
    plain = make_apply_fn(model)(params, x)
    assert plain.dtype == torch.float32 and not torch.equal(plain, logits)
    plain_fn = make_apply_fn(model)
    assert with_amp(plain_fn, "none") is plain_fn


@pytest.mark.parametrize("bias", [True, False])
def test_large_dense_layers_stay_fp32_under_autocast(bias: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """BatchedLinear (CPU, large layers) runs in fp32 under bf16 autocast: the same
    output and gradients as outside it, for a bf16 input (what a bf16 conv hands it)."""
    monkeypatch.setattr(batched_nets, "BATCHED_LINEAR_MIN_WEIGHTS", 0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=g).bfloat16().requires_grad_(True)
    w = torch.randn(3, 4, 7, generator=g).requires_grad_(True)
    b = torch.randn(3, 4, generator=g).requires_grad_(True) if bias else None
    inputs = [x, w] + ([b] if bias else [])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = batched_nets._linear(x, w, b)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    ref = batched_nets.autograd_linear(x.float(), w, b)
    ref_grads = torch.autograd.grad(ref.square().sum(), inputs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    assert grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_cpu_dropout_under_bf16_keeps_1_minus_p_exactly_in_distribution() -> None:
    """Uniforms are drawn in fp32: bf16 ones (a grid of 1/256) would bias the keep rate."""
    torch.manual_seed(0)
    h = torch.ones(400, 1000, dtype=torch.bfloat16)
    out = batched_nets._dropout(h, 0.3, training=True)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.7) < 0.003
    torch.testing.assert_close(out[out != 0].float(), torch.full_like(out[out != 0].float(), 1 / 0.7))


def test_bf16_cnn_learns_real_mnist(mnist_root: Path, tmp_path: Path) -> None:
    # McMahan CNN, IID, E=1, B=10, one round (seed 0, CPU, torch 2.14.1). 10 clients:
    # observed 0.8653 with bf16 and 0.8611 in fp32 on an AMX CPU, 0.8451 with bf16 and
    # 0.8532 in fp32 on an AVX2 CPU (AMD EPYC), whose kernels round differently. 5 clients
    # (bf16 on an AVX2 CPU is emulated and slow: half the cohort halves the test's time):
    # 0.8575 with bf16 on the AMD EPYC. Chance is 0.1; a bf16 step that did not learn
    # would stay far below the bound.
    config = Path(__file__).resolve().parents[2] / "configs" / "fedavg_mnist_cnn.yaml"
    overrides = ["federated.rounds=1", "federated.local_epochs=1", "federated.fraction=0.05", "federated.amp=bf16",
                 f"output.dir={tmp_path}"]
    result = CliRunner().invoke(app, ["train", str(config), *overrides])
    assert result.exit_code == 0, result.output
    (run_dir,) = list(tmp_path.glob("*/*"))
    assert load_config(run_dir / "config.yaml").federated.amp == "bf16"
    (row,) = read_metrics(run_dir)
    assert row["test_accuracy"] >= 0.82


def test_bf16_on_cpu_sizes_chunks_to_twice_the_working_set() -> None:
    """The McMahan CNN on 28x28 inputs: 3 clients a chunk in fp32 (48 MiB), 5 under bf16
    (96 MiB), the size the 2026-12-01 CPU runs favoured."""
    from fltool.engines.vectorized.chunking import CPU_BF16_WORKING_SET_BYTES, CPU_WORKING_SET_BYTES, device_memory_budget

    cpu = torch.device("cpu")
    assert device_memory_budget(cpu, "bf16") == CPU_BF16_WORKING_SET_BYTES == 2 * CPU_WORKING_SET_BYTES
    assert device_memory_budget(cpu) == CPU_WORKING_SET_BYTES
    model = build_model("cnn", (1, 28, 28), 10)
    clients = make_clients((1, 28, 28), sizes=[30] * 12)
    params, rule = global_params(model), make_algorithm("fedavg").rule
    assert VectorizedEngine(model, seed=0, amp="bf16").chunk_size(params, clients, rule) == 5
    assert VectorizedEngine(model, seed=0).chunk_size(params, clients, rule) == 3
