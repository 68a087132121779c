"""Your model (`model.class_path` + `model.init_args`) from a package outside fltool:
it trains on both engines alike; `engine: auto` probes it and says what it chose; every
mistake is one line naming the key, exit 2, before any run directory exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fltool.cli import app
from fltool.config import load_config
from fltool.config.schema import ModelConfig
from fltool.models import build_model

from ..plugins.userpkg import DATA, make_package

NETS = '''
import torch
from torch import nn


class ResidualNet(nn.Module):
    """Not an nn.Sequential: the vectorized engine runs it under vmap."""

    def __init__(self, num_classes, width=8, channels=1):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.block = nn.Sequential(nn.GroupNorm(2, width), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.block(h)
        return self.head(h.mean(dim=(2, 3)))


class LSTMClassifier(nn.Module):
    def __init__(self, num_classes, features=3, hidden=8):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def sequences(n_train=120, n_test=40, steps=6):
    g = torch.Generator().manual_seed(0)
    def split(n):
        y = torch.randint(3, (n,), generator=g)
        return torch.randn(n, steps, 3, generator=g) + y[:, None, None], y
    return split(n_train), split(n_test)


def not_a_module(num_classes):
    return "a string"


def wrong_outputs():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def broken(num_classes):
    raise ValueError("width must be even")
'''

SYNTHETIC = ["data.dataset=synthetic", "data.synthetic.train_size=200", "data.synthetic.test_size=50", "data.synthetic.shape=[1,8,8]"]


@pytest.fixture
def pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    return make_package(tmp_path, monkeypatch, {"nets": NETS, "data": DATA})


def train(tmp_path: Path, name: str, *overrides: str):
    run_dir = tmp_path / name
    (tmp_path / "user.yaml").write_text("name: user\n")
    args = [
        "train", str(tmp_path / "user.yaml"), "device=cpu", "federated.num_clients=6", "federated.fraction=0.5",
        "federated.rounds=2", "federated.batch_size=8", "federated.lr=0.05", f"output.run_dir={run_dir}", *overrides,
    ]
    return CliRunner().invoke(app, args), run_dir


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_a_user_model_trains_alike_on_both_engines(pkg: str, tmp_path: Path):
    model = [f"model.class_path={pkg}.nets:ResidualNet", "model.init_args.width=6", *SYNTHETIC]
    seq, seq_dir = train(tmp_path, "seq", *model, "federated.engine=sequential")
    vec, vec_dir = train(tmp_path, "vec", *model, "federated.engine=vectorized")
    assert seq.exit_code == 0, seq.output
    assert vec.exit_code == 0, vec.output
    a, b = weights(seq_dir), weights(vec_dir)
    assert a.keys() == b.keys() and a["stem.weight"].shape == (6, 1, 3, 3)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    ran = load_config(seq_dir / "config.yaml")
    assert ran.model.class_path == f"{pkg}.nets:ResidualNet" and ran.model.init_args == {"width": 6}


def test_auto_trains_an_lstm_sequentially_and_says_why(pkg: str, tmp_path: Path):
    result, run_dir = train(
        tmp_path, "lstm", f"data.class_path={pkg}.nets:sequences", f"model.class_path={pkg}.nets.LSTMClassifier",
        "federated.engine=auto",
    )
    assert result.exit_code == 0, result.output
    assert "federated.engine: auto chose sequential: a batched step fails on it" in result.output
    assert "lstm" in result.output.lower()
    assert (run_dir / "checkpoints" / "last.pt").is_file()


def test_auto_keeps_the_vectorized_engine_where_a_batched_step_runs(pkg: str, tmp_path: Path):
    result, _ = train(tmp_path, "res", f"model.class_path={pkg}.nets:ResidualNet", *SYNTHETIC, "federated.engine=auto")
    assert result.exit_code == 0, result.output
    assert "federated.engine: auto chose vectorized: a batched step of 2 clients runs (vmap)" in result.output


def test_builtin_names_are_aliases():
    torch.manual_seed(0)
    a = build_model(ModelConfig(class_path="cnn_cifar"), (3, 32, 32), 10)
    torch.manual_seed(0)
    b = build_model(ModelConfig(name="cnn_cifar"), (3, 32, 32), 10)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.class_path=nosuchpkg_q.nets:Net"], "model.class_path: cannot import module 'nosuchpkg_q.nets' (ModuleNotFoundError: No module named 'nosuchpkg_q')"),
        (["model.class_path={pkg}.nets:Missing"], "model.class_path: module '{pkg}.nets' has no attribute 'Missing'"),
        (["model.class_path={pkg}.nets:not_a_module"], "model.class_path: {pkg}.nets:not_a_module(**model.init_args) returned a str, not a torch nn.Module"),
        (["model.class_path={pkg}.nets:broken"], "model.class_path: {pkg}.nets:broken(**model.init_args) raised ValueError: width must be even"),
        (["model.class_path={pkg}.nets:ResidualNet", "model.init_args.depth=3"], "model.class_path: {pkg}.nets:ResidualNet(**model.init_args) raised TypeError"),
        (["model.class_path={pkg}.nets:wrong_outputs"], "model.class_path: {pkg}.nets:wrong_outputs returns [2, 3] for a batch of 2; expected [2, 10]"),
        (["model.class_path={pkg}.nets:LSTMClassifier"], "model.class_path: {pkg}.nets:LSTMClassifier fails on a batch of inputs [2, 1, 8, 8]"),
        (["model.class_path={pkg}"], "model.class_path: '{pkg}' is not 'package.module:Name'"),
        (["model.init_args=3"], "model.init_args: must be a mapping of names to values, got 3"),
    ],
)
def test_bad_model_is_one_line_before_training(pkg: str, tmp_path: Path, overrides: list[str], fragment: str):
    result, run_dir = train(tmp_path, "bad", *SYNTHETIC, *(o.format(pkg=pkg) for o in overrides))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and fragment.format(pkg=pkg) in lines[0], result.output
    assert not run_dir.exists()
