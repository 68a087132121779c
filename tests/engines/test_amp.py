"""federated.amp: bf16 autocast of the clients' forward passes, fp32 everywhere else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fltool.cli import app
from fltool.config import load_config
from fltool.engines.vectorized import batched_nets
from fltool.engines.sequential import SequentialEngine, make_apply_fn, with_amp
from fltool.run.metrics import read_metrics
from fltool.engines.vectorized.engine import VectorizedEngine
from fltool.models import build_model

from .test_vectorized import RULES, SIZES, global_params, make_clients

MODELS = [("mlp", (1, 8, 8)), ("cnn", (1, 12, 12)), ("cnn_cifar", (3, 10, 10))]


def model_without_dropout(name: str, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    for layer in model.modules():
        if isinstance(layer, nn.Dropout):  # the engines' draws differ by design
            layer.p = 0.0
    return model


def relative_update_error(a: list[torch.Tensor], b: list[torch.Tensor], start: list[torch.Tensor]) -> float:
    """The largest ||a - b|| / ||a - start|| over the tensors: how far apart two updates are."""
    return max(((x - y).norm() / (x - s).norm()).item() for x, y, s in zip(a, b, start, strict=True))


@pytest.mark.parametrize("mode", RULES)
@pytest.mark.parametrize("model_name,shape", MODELS)
def test_bf16_engines_agree_and_differ_from_fp32(mode: str, model_name: str, shape: tuple[int, ...]) -> None:
    model = model_without_dropout(model_name, shape)
    clients, params = make_clients(shape), global_params(model)
    fp32 = SequentialEngine(model, seed=3).train_cohort(params, clients, RULES[mode], 2)
    seq = SequentialEngine(model, seed=3, amp="bf16").train_cohort(params, clients, RULES[mode], 2)
    vec = VectorizedEngine(model, seed=3, amp="bf16").train_cohort(params, clients, RULES[mode], 2)
    seq_avg, vec_avg = seq.weighted.average(), vec.weighted.average()
    assert vec.weighted.total == sum(SIZES)
    assert all(p.dtype == torch.float32 for p in vec_avg + seq_avg)  # fp32 weights, not a bf16 model
    # both engines cast the same tensors, so they agree to ~1e-4 (measured: <= 1e-3)
    assert relative_update_error(vec_avg, seq_avg, params) < 1e-2
    torch.testing.assert_close(vec.loss_sum, seq.loss_sum, rtol=1e-3, atol=1e-3)
    # and bf16 really ran: on these random-label batches it moves the update by 1-80%
    assert relative_update_error(seq_avg, fp32.weighted.average(), params) > 1e-2


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
    # McMahan CNN, IID, 10 clients x E=1, B=10, one round: observed 0.8653 with bf16 and
    # 0.8611 in fp32 (seed 0, CPU, torch 2.14.1); 0.9369 and 0.9389 after two rounds
    config = Path(__file__).resolve().parents[2] / "configs" / "fedavg_mnist_cnn.yaml"
    overrides = ["federated.rounds=1", "federated.local_epochs=1", "federated.amp=bf16", f"output.dir={tmp_path}"]
    result = CliRunner().invoke(app, ["train", str(config), *overrides])
    assert result.exit_code == 0, result.output
    (run_dir,) = list(tmp_path.glob("*/*"))
    assert load_config(run_dir / "config.yaml").federated.amp == "bf16"
    (row,) = read_metrics(run_dir)
    assert row["test_accuracy"] >= 0.85


def test_bf16_on_cpu_sizes_chunks_to_twice_the_working_set() -> None:
    """The McMahan CNN on 28x28 inputs: 3 clients a chunk in fp32 (48 MiB), 5 under bf16
    (96 MiB), the size the 2026-12-01 CPU runs favoured."""
    from fltool.engines.vectorized.chunking import CPU_BF16_WORKING_SET_BYTES, CPU_WORKING_SET_BYTES, device_memory_budget

    cpu = torch.device("cpu")
    assert device_memory_budget(cpu, "bf16") == CPU_BF16_WORKING_SET_BYTES == 2 * CPU_WORKING_SET_BYTES
    assert device_memory_budget(cpu) == CPU_WORKING_SET_BYTES
    model = build_model("cnn", (1, 28, 28), 10)
    clients = make_clients((1, 28, 28), sizes=[30] * 12)
    params, rule = global_params(model), RULES["fedavg"]
    assert VectorizedEngine(model, seed=0, amp="bf16").chunk_size(params, clients, rule) == 5
    assert VectorizedEngine(model, seed=0).chunk_size(params, clients, rule) == 3
