"""MNIST read without torchvision: the IDX parser against torchvision's own reader on the
real files, corrupt files as one-line errors, and no torchvision import on load."""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision.datasets.mnist as tv_mnist
from typer.testing import CliRunner

from fltool.cli import app
from fltool.config.schema import DataConfig
from fltool.data import load_dataset
from fltool.data.idx import IdxError, read_idx
from fltool.data.mnist import FILES
from fltool.errors import FltoolError

GOOD = Path(__file__).resolve().parents[2] / "configs" / "fedavg_mnist.yaml"


def gunzip(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(src, "rb") as f, open(dst, "wb") as out:
        shutil.copyfileobj(f, out)
    return dst


def idx_bytes(values: list, code: int, fmt: str, dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + struct.pack(f">{len(values)}{fmt}", *values)


@pytest.mark.parametrize("folder", ["MNIST", "FashionMNIST"])
def test_read_idx_equals_torchvisions_reading_of_the_real_files(folder: str, mnist_root: Path, tmp_path: Path):
    for stem in FILES:
        path = gunzip(mnist_root / folder / "raw" / f"{stem}.gz", tmp_path / stem)
        ours, theirs = read_idx(path), tv_mnist.read_sn3_pascalvincent_tensor(str(path), strict=True)
        assert ours.dtype == theirs.dtype == torch.uint8 and ours.shape == theirs.shape
        assert torch.equal(ours, theirs), stem


@pytest.mark.parametrize(
    ("code", "fmt", "dtype", "values"),
    [(0x0B, "h", torch.int16, [1, -2, 300]), (0x0C, "i", torch.int32, [7, -70_000, 2**30]), (0x0E, "d", torch.float64, [0.5, -1e300, 3.25])],
)
def test_read_idx_swaps_big_endian_values(code: int, fmt: str, dtype: torch.dtype, values: list, tmp_path: Path):
    path = tmp_path / "f.idx"
    path.write_bytes(idx_bytes(values * 2, code, fmt, (2, 3)))
    ours = read_idx(path)
    assert ours.dtype == dtype and torch.equal(ours, torch.tensor(values * 2, dtype=dtype).view(2, 3))
    assert torch.equal(ours, tv_mnist.read_sn3_pascalvincent_tensor(str(path)))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not an IDX file (magic number missing)"),
        (b"\x1f\x8b\x08\x00rest", "not an IDX file (magic number 1f8b0800)"),  # a .gz not decompressed
        (b"\x00\x00\x08\x03\x00\x00", "truncated: 6 bytes, shorter than its 16-byte header"),
        (idx_bytes([1, 2, 3], 0x08, "B", (2, 2)), "truncated: 15 bytes, expected 16 for shape [2, 2]"),
        (idx_bytes([1, 2, 3], 0x08, "B", (2,)), "trailing bytes: 11 bytes, expected 10 for shape [2]"),
    ],
)
def test_read_idx_rejects_what_is_not_a_whole_idx_file(data: bytes, message: str, tmp_path: Path):
    (tmp_path / "f").write_bytes(data)
    with pytest.raises(IdxError) as info:
        read_idx(tmp_path / "f")
    assert str(info.value) == message


def test_uncompressed_files_in_the_root_load_like_the_archives(mnist_root: Path, tmp_path: Path):
    for stem in FILES:
        gunzip(mnist_root / "MNIST" / "raw" / f"{stem}.gz", tmp_path / "root" / "MNIST" / "raw" / stem)
    plain = load_dataset(DataConfig(dataset="mnist", root=str(tmp_path / "root"), cache=str(tmp_path / "c1")))
    archived = load_dataset(DataConfig(dataset="mnist", root=str(mnist_root), cache=str(tmp_path / "c2")))
    assert torch.equal(plain.train.x, archived.train.x) and torch.equal(plain.test.y, archived.test.y)
    assert not (tmp_path / "c1" / "MNIST" / "raw" / FILES[0]).exists(), "read in place, not copied"


def test_a_truncated_idx_file_is_a_one_line_error(mnist_root: Path, tmp_path: Path):
    raw = tmp_path / "root" / "MNIST" / "raw"
    for stem in FILES:
        gunzip(mnist_root / "MNIST" / "raw" / f"{stem}.gz", raw / stem)
    images = raw / FILES[0]
    images.write_bytes(images.read_bytes()[:1_000_000])  # as a copy cut short leaves it
    cache = tmp_path / "cache"
    with pytest.raises(FltoolError) as info:
        load_dataset(DataConfig(dataset="mnist", root=str(raw.parents[1]), cache=str(cache)))
    assert str(info.value) == (
        f"data.dataset: mnist: {images}: truncated: 1000000 bytes, expected 47040016 for shape [60000, 28, 28]; "
        "replace it with the published file"
    )
    result = CliRunner().invoke(
        app, ["train", str(GOOD), f"data.root={raw.parents[1]}", f"data.cache={cache}", f"output.dir={tmp_path / 'runs'}"]
    )
    assert result.exit_code == 2, result.output
    assert [line for line in result.stderr.splitlines() if line] == [f"error: {info.value}"]


def test_a_corrupt_archive_is_a_one_line_error_naming_the_roots_file(mnist_root: Path, tmp_path: Path):
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in FILES:
        shutil.copyfile(mnist_root / "MNIST" / "raw" / f"{stem}.gz", raw / f"{stem}.gz")
    bad = raw / f"{FILES[2]}.gz"
    bad.write_bytes(bad.read_bytes()[:100_000])
    cfg = DataConfig(dataset="mnist", root=str(raw.parents[1]), cache=str(tmp_path / "cache"))
    with pytest.raises(FltoolError) as info:
        load_dataset(cfg)
    assert str(info.value) == (
        f"data.dataset: mnist: {bad} is not the published archive (MD5 differs); replace it, "
        "or remove it for torchvision to download it"
    )
    assert not (tmp_path / "cache" / "MNIST" / "raw" / bad.name).exists(), "the bad copy leaves the cache"
    shutil.copyfile(mnist_root / "MNIST" / "raw" / bad.name, bad)  # repaired, the next run loads
    assert len(load_dataset(cfg).test) == 10_000


def test_loading_mnist_does_not_import_torchvision(mnist_root: Path, tmp_path: Path):
    # a fresh process: this one imported torchvision above; the first load extracts the
    # archives into the cache, the second reads the cache
    code = (
        "import sys; from fltool.config.schema import DataConfig; from fltool.data import load_dataset\n"
        f"cfg = DataConfig(dataset='mnist', root={str(mnist_root)!r}, cache={str(tmp_path / 'cache')!r})\n"
        "sizes = [len(load_dataset(cfg).train) for _ in range(2)]\n"
        "print(sizes, 'torchvision' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "[60000, 60000] False"
