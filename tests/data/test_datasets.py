from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fltool.config.schema import DataConfig, SyntheticConfig
from fltool.data import load_dataset
from fltool.data.datasets import make_synthetic
from fltool.errors import FltoolError


def snapshot(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in root.rglob("*")}


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_dataset_loads_as_normalised_tensors(name: str, mnist_root: Path, tmp_path: Path):
    before = snapshot(mnist_root)
    ds = load_dataset(DataConfig(dataset=name, root=str(mnist_root), cache=str(tmp_path / "cache")))
    assert snapshot(mnist_root) == before, "the shared data root must never be written"
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    assert abs(ds.train.x.mean().item()) < 0.01 and abs(ds.train.x.std().item() - 1) < 0.01
    counts = torch.bincount(ds.train.y, minlength=10)
    if name == "mnist":  # class counts from the data README
        assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    else:
        assert counts.tolist() == [6000] * 10


def test_missing_archives_give_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("FLTOOL_DATA", raising=False)
    cfg = DataConfig(dataset="mnist", root=str(tmp_path / "empty"), cache=str(tmp_path / "cache"))
    with pytest.raises(FltoolError, match="MNIST/raw"):
        load_dataset(cfg)


def test_synthetic_is_deterministic_and_shaped():
    cfg = SyntheticConfig(train_size=50, test_size=20, shape=[3, 4, 5], num_classes=3)
    a, b = make_synthetic(cfg, seed=1), make_synthetic(cfg, seed=1)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert a.train.x.shape == (50, 3, 4, 5) and a.input_shape == (3, 4, 5)
    assert int(a.train.y.max()) < 3
    assert not torch.equal(make_synthetic(cfg, seed=2).train.x, a.train.x)


def test_data_root_comes_from_env(mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLTOOL_DATA", str(mnist_root))
    ds = load_dataset(DataConfig(dataset="mnist", cache=str(tmp_path / "c")))
    assert len(ds.test) == 10000
    assert (tmp_path / "c" / "MNIST" / "raw").is_dir()
    assert os.environ["FLTOOL_DATA"] == str(mnist_root)


def test_a_half_extracted_cache_is_extracted_afresh(mnist_root: Path, tmp_path: Path):
    cfg = DataConfig(dataset="mnist", root=str(mnist_root), cache=str(tmp_path / "cache"))
    whole = load_dataset(cfg)
    raw = tmp_path / "cache" / "MNIST" / "raw"
    assert oct((raw / "train-images-idx3-ubyte.gz").stat().st_mode & 0o777) == "0o644"  # a cache may be shared
    extracted = raw / "train-images-idx3-ubyte"
    extracted.write_bytes(extracted.read_bytes()[: 20_000_000])  # as an interrupted extraction leaves it
    again = load_dataset(cfg)
    assert torch.equal(again.train.x, whole.train.x)


def test_an_unwritable_cache_is_a_user_error(mnist_root: Path, tmp_path: Path):
    (tmp_path / "afile").write_text("")
    cfg = DataConfig(dataset="mnist", root=str(mnist_root), cache=str(tmp_path / "afile"))
    with pytest.raises(FltoolError, match=r"^data.cache: cannot write the archives to .*afile/MNIST/raw: Not a directory$"):
        load_dataset(cfg)
