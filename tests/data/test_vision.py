"""CIFAR and EMNIST through the real loader, from small archives in each dataset's own
on-disk format, generated here (no network). torchvision checks the extracted files'
MD5s; the tests point its table at the generated files, as the published ones would match."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from fltool.config.schema import DataConfig
from fltool.data import data_shape, load_dataset
from fltool.errors import FltoolError

CIFAR = {  # name -> (torchvision class, folder, train files, test file, meta file, label key, classes)
    "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta", "labels", 10),
    "cifar100": (torchvision.datasets.CIFAR100, "cifar-100-python", ["train"], "test", "meta", "fine_labels", 100),
}


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def make_cifar(root: Path, name: str, per_file: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """`<root>/<name>-python.tar.gz` as published: pickled dicts of uint8 rows [N, 3072]."""
    cls, folder, train_files, test_file, meta_file, label_key, classes = CIFAR[name]
    rng = np.random.default_rng(0)
    files: dict[str, bytes] = {}
    for fname in [*train_files, test_file]:
        batch = {"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8), label_key: rng.integers(0, classes, per_file).tolist()}
        files[fname] = pickle.dumps(batch)
    meta_key = "label_names" if name == "cifar10" else "fine_label_names"
    files[meta_file] = pickle.dumps({meta_key: [f"class{i}" for i in range(classes)]})
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / f"{name.replace('cifar', 'cifar-')}-python.tar.gz", "w:gz") as tar:
        for fname, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{fname}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(cls, "train_list", [[f, _md5(files[f])] for f in train_files])
    monkeypatch.setattr(cls, "test_list", [[test_file, _md5(files[test_file])]])
    monkeypatch.setattr(cls, "meta", {"filename": meta_file, "key": meta_key, "md5": _md5(files[meta_file])})


def _idx(array: np.ndarray) -> bytes:
    magic = 0x0803 if array.ndim == 3 else 0x0801
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def make_emnist(root: Path, split: str, n_train: int, n_test: int, classes: int) -> None:
    """`<root>/EMNIST/raw/emnist-<split>-<part>-<kind>-ubyte.gz`, big-endian IDX files."""
    rng = np.random.default_rng(1)
    raw = root / "EMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, classes, n, dtype=np.uint8)
        (raw / f"emnist-{split}-{part}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
        (raw / f"emnist-{split}-{part}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_from_its_archive(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    make_cifar(tmp_path / "root", name, 40, monkeypatch)
    cfg = DataConfig(dataset=name, root=str(tmp_path / "root"), cache=str(tmp_path / "cache"))
    ds = load_dataset(cfg)
    n_train = 200 if name == "cifar10" else 40
    assert ds.train.x.shape == (n_train, 3, 32, 32) and ds.test.x.shape == (40, 3, 32, 32)
    assert ds.train.x.dtype == torch.float32 and ds.train.y.dtype == torch.int64
    assert ds.num_classes == CIFAR[name][6] and data_shape(cfg) == ((3, 32, 32), ds.num_classes)
    per_channel = ds.train.x.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-4)
    assert torch.allclose(per_channel.std(1), torch.ones(3), atol=1e-3)
    assert load_dataset(cfg).train.x.equal(ds.train.x)  # a second load reads the extracted cache


def test_cifar_pixels_keep_their_channels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A CIFAR row is 1024 red, 1024 green, 1024 blue values: the tensor's channels."""
    make_cifar(tmp_path / "root", "cifar10", 10, monkeypatch)
    raw = torchvision.datasets.CIFAR10  # torchvision's own reading, the reference
    load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path / "root"), cache=str(tmp_path / "c")))
    ref = raw(str(tmp_path / "c"), train=False, download=False)
    ds = load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path / "root"), cache=str(tmp_path / "c")))
    red = torch.as_tensor(ref.data[..., 0]).float()
    assert torch.corrcoef(torch.stack([red.flatten(), ds.test.x[:, 0].flatten()]))[0, 1] > 0.999


@pytest.mark.parametrize(("name", "split", "classes"), [("emnist_byclass", "byclass", 62), ("emnist_balanced", "balanced", 47)])
def test_emnist_loads_from_its_idx_files(name: str, split: str, classes: int, tmp_path: Path):
    make_emnist(tmp_path / "root", split, 60, 20, classes)
    cfg = DataConfig(dataset=name, root=str(tmp_path / "root"), cache=str(tmp_path / "cache"))
    ds = load_dataset(cfg)
    assert ds.train.x.shape == (60, 1, 28, 28) and ds.test.x.shape == (20, 1, 28, 28)
    assert ds.num_classes == classes and data_shape(cfg) == ((1, 28, 28), classes)
    assert abs(ds.train.x.mean().item()) < 1e-4 and abs(ds.train.x.std().item() - 1) < 1e-3
    assert int(ds.train.y.max()) < classes


def test_emnist_reads_the_published_zip(tmp_path: Path):
    """NIST's gzip.zip holds the .gz files under gzip/; it may sit in EMNIST/raw as it is."""
    import zipfile

    make_emnist(tmp_path / "loose", "balanced", 30, 10, 47)
    raw = tmp_path / "root" / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    with zipfile.ZipFile(raw / "gzip.zip", "w") as bundle:
        for gz in (tmp_path / "loose" / "EMNIST" / "raw").glob("*.gz"):
            bundle.write(gz, f"gzip/{gz.name}")
    ds = load_dataset(DataConfig(dataset="emnist_balanced", root=str(tmp_path / "root"), cache=str(tmp_path / "cache")))
    loose = load_dataset(DataConfig(dataset="emnist_balanced", root=str(tmp_path / "loose"), cache=str(tmp_path / "c2")))
    assert ds.train.x.shape == (30, 1, 28, 28) and torch.equal(ds.train.x, loose.train.x) and torch.equal(ds.test.y, loose.test.y)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "emnist_byclass", "emnist_balanced"])
def test_a_missing_archive_says_how_to_get_the_data(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("FLTOOL_DATA", raising=False)

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    cfg = DataConfig(dataset=name, root=str(tmp_path / "empty"), cache=str(tmp_path / "cache"))
    with pytest.raises(FltoolError) as err:
        load_dataset(cfg)
    (line,) = err.value.lines
    assert line.startswith(f"data.dataset: {name}: no readable") and "internet" in line and "data.root" in line
