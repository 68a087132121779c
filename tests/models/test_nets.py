from __future__ import annotations

import pytest
import torch

from fltool.models import build_model, count_parameters


@pytest.mark.parametrize(
    "name,shape,params",
    [
        ("mlp", (1, 28, 28), 199_210),  # McMahan 2NN
        ("cnn", (1, 28, 28), 1_663_370),  # McMahan CNN
        ("cnn_small", (1, 28, 28), 50_186),  # the seed article's DDP example
        ("cnn_cifar", (3, 32, 32), 1_626_442),  # pfl-research CIFAR-10 benchmark
    ],
)
def test_parameter_counts_match_the_papers(name, shape, params):
    model = build_model(name, shape, 10)
    assert count_parameters(model) == params
    assert model(torch.randn(2, *shape)).shape == (2, 10)
