"""Your data (`data.class_path`) and the natural partition: loaded from a package outside
fltool, trained through the CLI, and every mistake one line naming the key, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fltool.cli import app
from fltool.config import load_config
from fltool.config.schema import DataConfig
from fltool.data import load_dataset
from fltool.data.partition import natural_partition

from ..plugins.userpkg import DATA, make_package


@pytest.fixture
def pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    return make_package(tmp_path, monkeypatch, {"data": DATA})


def test_user_tensors_load_with_their_client_ids(pkg: str):
    ds = load_dataset(DataConfig(class_path=f"{pkg}.data:writers"))
    assert ds.train.x.shape == (85, 3, 4, 4) and ds.test.x.shape == (60, 3, 4, 4) and ds.num_classes == 5
    assert ds.train.client is not None and sorted(torch.unique(ds.train.client).tolist()) == [10, 20, 30, 40]


def test_a_torch_dataset_is_materialised_once_into_tensors(pkg: str):
    as_tensors = load_dataset(DataConfig(class_path=f"{pkg}.data.writers"))
    as_dataset = load_dataset(DataConfig(class_path=f"{pkg}.data:writers", init_args={"as_dataset": True}))
    assert torch.equal(as_dataset.train.x, as_tensors.train.x) and torch.equal(as_dataset.train.y, as_tensors.train.y)


def test_a_mapping_may_give_the_class_count(pkg: str):
    assert load_dataset(DataConfig(class_path=f"{pkg}.data:as_mapping")).num_classes == 7


def test_natural_partition_follows_the_ids():
    ids = torch.tensor([7, 3, 7, 7, 3, 9, 7])
    parts = natural_partition(ids)
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2, 3, 6], [5]]  # by id, examples in data order
    assert [p.tolist() for p in natural_partition(ids, min_examples=2)] == [[1, 4], [0, 2, 3, 6]]


def train(tmp_path: Path, pkg: str, *overrides: str):
    run_dir = tmp_path / "run"
    (tmp_path / "user.yaml").write_text("name: user\n")
    args = [
        "train", str(tmp_path / "user.yaml"), f"data.class_path={pkg}.data:writers", "model.name=mlp", "device=cpu",
        "federated.rounds=2", "federated.fraction=1.0", "federated.batch_size=10", "federated.lr=0.05",
        f"output.run_dir={run_dir}", *overrides,
    ]
    return CliRunner().invoke(app, args), run_dir


@pytest.mark.parametrize(("min_examples", "clients"), [(1, 4), (3, 3), (31, 1)])
def test_natural_clients_come_from_the_data(pkg: str, tmp_path: Path, min_examples: int, clients: int):
    result, run_dir = train(tmp_path, pkg, "data.partition=natural", f"data.min_examples={min_examples}")
    assert result.exit_code == 0, result.output
    ran = load_config(run_dir / "config.yaml")
    assert ran.federated.num_clients == clients  # K from the data, recorded for resume
    from fltool.run.metrics import read_metrics

    rows = read_metrics(run_dir)
    assert len(rows) == 2 and rows[-1]["clients"] == clients


def test_user_data_takes_the_other_partitions_too(pkg: str, tmp_path: Path):
    result, _ = train(tmp_path, pkg, "data.partition=dirichlet", "federated.num_clients=5")
    assert result.exit_code == 0, result.output


def test_no_client_large_enough_is_one_line(pkg: str, tmp_path: Path):
    result, run_dir = train(tmp_path, pkg, "data.partition=natural", "data.min_examples=51")
    assert result.exit_code == 2 and not run_dir.exists()
    assert result.output.strip().splitlines() == ["error: data.min_examples: no client has 51 or more examples"]


def test_natural_needs_client_ids(tmp_path: Path):
    (tmp_path / "user.yaml").write_text("name: user\n")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "user.yaml"), "data.partition=natural", "device=cpu", f"output.run_dir={tmp_path / 'r'}"])
    assert result.exit_code == 2 and "data.partition: natural needs each example's client id" in result.output


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("nosuchmodule_xyz:fn", "data.class_path: cannot import module 'nosuchmodule_xyz' (ModuleNotFoundError"),
        ("{pkg}.data:nothing", "data.class_path: module '{pkg}.data' has no attribute 'nothing'"),
        ("{pkg}.data:NOT_CALLABLE", "data.class_path: '{pkg}.data:NOT_CALLABLE' is a int, not a class or function"),
        ("{pkg}.data:wrong_return", "data.class_path: {pkg}.data:wrong_return returned a int; expected (train, test)"),
        ("{pkg}.data:wrong_shapes", "data.class_path: {pkg}.data:wrong_shapes: train x must be [N, ...] and y [N]"),
        ("{pkg}.data:writers", "data.class_path: {pkg}.data:writers(**data.init_args) raised TypeError"),
    ],
)
def test_bad_user_data_is_one_line_before_training(pkg: str, tmp_path: Path, target: str, fragment: str):
    extra = ["data.init_args.bogus=1"] if target.endswith(":writers") else []
    result, run_dir = train(tmp_path, pkg, f"data.class_path={target.format(pkg=pkg)}", *extra)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and fragment.format(pkg=pkg) in lines[0], result.output
    assert not run_dir.exists()


def test_init_args_without_a_class_path_are_refused_not_ignored(tmp_path: Path):
    """A built-in dataset or model takes no arguments: `model.init_args` beside
    `model.name: mlp` would otherwise run an experiment other than the one written."""
    (tmp_path / "user.yaml").write_text("name: user\nmodel:\n  init_args: {width: 3}\n")
    result = CliRunner().invoke(
        app, ["train", str(tmp_path / "user.yaml"), "data.init_args={n: 2}", f"output.run_dir={tmp_path / 'r'}"]
    )
    assert result.exit_code == 2 and not (tmp_path / "r").exists()
    assert result.output.strip().splitlines() == [
        "error: command line: data.init_args: only data.class_path takes arguments; the built-in mnist takes none",
        f"error: {tmp_path / 'user.yaml'}: model.init_args: only model.class_path takes arguments; the built-in mlp takes none",
    ]
