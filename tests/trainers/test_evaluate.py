"""Test-set evaluation against a hand computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fltool.data import TensorSplit
from fltool.trainers.evaluate import evaluate


def test_loss_accuracy_and_per_class_accuracy_match_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(103, 5, generator=g)
    y = torch.randint(0, 4, (103,), generator=g)
    y[y == 3] = 2  # class 3 absent from the test set: no accuracy (None), not 0 or a division by zero
    model = nn.Linear(5, 4)
    model.train()
    result = evaluate(model, TensorSplit(x, y), batch_size=10, num_classes=4)  # a partial last batch
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1)
    assert result.examples == 103
    assert result.loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert result.accuracy == (pred == y).sum().item() / 103
    for c in range(3):
        assert result.per_class[c] == pytest.approx(((pred == y) & (y == c)).sum().item() / (y == c).sum().item())
    assert result.per_class[3] is None
    assert model.training  # left in the mode it was in


def test_a_diverged_model_scores_zero_not_the_share_of_class_zero() -> None:
    """argmax of all-NaN logits is class 0: counted as hits, a NaN model would score
    class 0's share and could become a run's best accuracy."""
    x = torch.randn(20, 5)
    y = torch.zeros(20, dtype=torch.long)
    y[10:] = torch.arange(10) % 4
    model = nn.Linear(5, 4)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    assert model(x).argmax(1).eq(0).all()  # what the old count took for hits
    result = evaluate(model, TensorSplit(x, y), batch_size=8, num_classes=4)
    assert result.accuracy == 0.0
    assert result.per_class == [0.0, 0.0, 0.0, 0.0]
    assert result.loss != result.loss  # NaN, reported as null downstream


def test_a_row_with_an_infinite_logit_is_not_a_hit_even_where_argmax_is_right() -> None:
    x = torch.tensor([[float("inf"), 0.0, 0.0], [2.0, 1.0, 0.0]])
    y = torch.tensor([0, 0])
    result = evaluate(nn.Identity(), TensorSplit(x, y), batch_size=2, num_classes=3)
    assert result.accuracy == 0.5


def test_eval_prints_a_class_without_test_examples_as_unmeasured(capsys) -> None:
    from fltool.ui import print_eval

    report = {"checkpoint": "c.pt", "mode": "federated", "model": "mlp", "dataset": "synthetic", "round": 2,
              "examples": 3, "accuracy": 0.5, "loss": 0.7, "per_class_accuracy": [0.5, None]}
    print_eval(report)
    out = capsys.readouterr().out
    assert "0.5000" in out and "- (no test examples)" in out


def test_a_conv_model_is_evaluated_as_a_channels_last_copy_on_cpu() -> None:
    """The copy gives the default layout's result; the model keeps its layout and mode."""
    from fltool.trainers import evaluate as evaluate_module
    from fltool.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn_cifar", (3, 10, 10), 10)
    model.train()
    split = TensorSplit(torch.randn(57, 3, 10, 10), torch.randint(0, 10, (57,)))
    assert evaluate_module.inference_layout(model, split) == torch.channels_last
    assert evaluate_module.inference_layout(nn.Linear(5, 4), TensorSplit(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))) == torch.contiguous_format
    result = evaluate(model, split, batch_size=20, num_classes=10)
    assert model.training and all(p.is_contiguous() for p in model.parameters())
    with torch.no_grad():
        logits = model.eval()(split.x)
    assert result.loss == pytest.approx(F.cross_entropy(logits, split.y).item(), rel=1e-5)
    assert result.accuracy == (logits.argmax(1) == split.y).sum().item() / 57
