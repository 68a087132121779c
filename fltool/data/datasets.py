"""Datasets held as normalised tensors: no per-sample PIL or Python in the training path.

The data root (config `data.root` or `$FLTOOL_DATA`) is treated as read-only: its raw
archives are copied into a cache (`data.cache`, `$FLTOOL_CACHE` or ~/.cache/fltool),
where MNIST and FashionMNIST are checked against their published MD5s, extracted and
read without torchvision (`fltool.data.mnist`); torchvision is imported only to
download what is found in neither place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from fltool.config.schema import DataConfig, SyntheticConfig
from fltool.data.mnist import read_local
from fltool.data.types import Dataset, TensorSplit
from fltool.data.user import load_user_dataset
from fltool.data.vision import VISION, load_vision, normalise_per_channel
from fltool.errors import FltoolError

# name -> (torchvision class name, folder, mean, std) of the training images
_TORCHVISION = {
    "mnist": ("MNIST", "MNIST", 0.1307, 0.3081),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST", 0.2860, 0.3530),
}


def data_shape(cfg: DataConfig) -> tuple[tuple[int, ...], int]:
    """(input shape, number of classes) of the configured dataset, without loading it
    (a `data.class_path` dataset is loaded once, and kept for `load_dataset`)."""
    if cfg.class_path:
        ds = load_user_dataset(cfg)
        return ds.input_shape, ds.num_classes
    if cfg.dataset == "synthetic":
        return tuple(cfg.synthetic.shape), cfg.synthetic.num_classes
    if cfg.dataset in VISION:
        return VISION[cfg.dataset].shape, VISION[cfg.dataset].num_classes
    return (1, 28, 28), 10  # MNIST and FashionMNIST


def load_dataset(cfg: DataConfig, seed: int = 0) -> Dataset:
    if cfg.class_path:
        return load_user_dataset(cfg)
    if cfg.dataset == "synthetic":
        return make_synthetic(cfg.synthetic, seed)
    if cfg.dataset in VISION:
        x_train, y_train, x_test, y_test = load_vision(cfg.dataset, data_root(cfg), cache_root(cfg))
        x_train_f, x_test_f = normalise_per_channel(x_train, x_test)
        train, test = TensorSplit(x_train_f, y_train), TensorSplit(x_test_f, y_test)
        return Dataset(cfg.dataset, train, test, num_classes=VISION[cfg.dataset].num_classes)
    return _load_mnist_like(cfg)


def data_root(cfg: DataConfig) -> Path | None:
    root = cfg.root or os.environ.get("FLTOOL_DATA")
    return Path(root).expanduser() if root else None


def cache_root(cfg: DataConfig) -> Path:
    cache = cfg.cache or os.environ.get("FLTOOL_CACHE") or Path.home() / ".cache" / "fltool" / "data"
    return Path(cache).expanduser()


def _load_mnist_like(cfg: DataConfig) -> Dataset:
    cls_name, folder, mean, std = _TORCHVISION[cfg.dataset]
    cache = cache_root(cfg)
    source = data_root(cfg)
    raw = cache / folder / "raw"
    if source is not None:
        try:
            _copy_raw_archives(source / folder / "raw", raw)
        except OSError as exc:
            raise FltoolError(f"data.cache: cannot write the archives to {raw}: {exc.strerror or exc}") from None
    local = read_local(cfg.dataset, folder, raw, source / folder / "raw" if source is not None else None)
    if local is None:
        local = _download_with_torchvision(cfg.dataset, cls_name, folder, cache, source)
    x_train, y_train, x_test, y_test = local
    train, test = _normalise(x_train, y_train, mean, std), _normalise(x_test, y_test, mean, std)
    return Dataset(cfg.dataset, train, test, num_classes=10)


def _download_with_torchvision(
    name: str, cls_name: str, folder: str, cache: Path, source: Path | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    import torchvision

    raw = cache / folder / "raw"
    cls = getattr(torchvision.datasets, cls_name)
    for attempt in (1, 2):
        try:
            splits = [cls(str(cache), train=train, download=True) for train in (True, False)]
            break
        except Exception as exc:  # torchvision raises RuntimeError/URLError when offline and missing
            # torchvision extracts in place and trusts what it finds: a file left half-extracted
            # by an interrupted run would fail every later run, so extract afresh once
            if attempt == 1 and _remove_extracted(raw):
                continue
            where = f"{source / folder / 'raw'}" if source else "$FLTOOL_DATA (unset)"
            reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise FltoolError(
                f"data.dataset: {name}: no readable archives in {where} or the cache {raw}, "
                f"and the download failed ({reason[:120]}); set data.root or FLTOOL_DATA to a folder holding "
                f"{folder}/raw/*.gz"
            ) from None
    train, test = splits
    return train.data, train.targets, test.data, test.targets


def _copy_raw_archives(src: Path, dst: Path) -> None:
    if not src.is_dir():
        return
    dst.mkdir(parents=True, exist_ok=True)
    for archive in src.glob("*.gz"):
        target = dst / archive.name
        if target.exists() and target.stat().st_size == archive.stat().st_size:
            continue
        # A unique temp name: several processes may fill a fresh cache at once.
        fd, tmp = tempfile.mkstemp(dir=dst, prefix=f".{archive.name}.", suffix=".tmp")
        os.close(fd)
        shutil.copyfile(archive, tmp)
        os.chmod(tmp, 0o644)  # not mkstemp's 0600: a cache may be shared
        os.replace(tmp, target)


def _remove_extracted(raw: Path) -> bool:
    """Delete what torchvision extracted from the archives in `raw` (the .gz stay); True if any."""
    extracted = [p for p in raw.glob("*") if p.is_file() and not p.name.endswith(".gz") and not p.name.startswith(".")]
    for path in extracted:
        path.unlink(missing_ok=True)
    return bool(extracted)


def _normalise(images: torch.Tensor, labels: torch.Tensor, mean: float, std: float) -> TensorSplit:
    x = images.to(torch.float32).div_(255.0).sub_(mean).div_(std).unsqueeze(1).contiguous()
    return TensorSplit(x, labels.to(torch.int64).contiguous())


def make_synthetic(cfg: SyntheticConfig, seed: int = 0) -> Dataset:
    """Class-conditional Gaussians around random prototypes: learnable, deterministic, tiny."""
    g = torch.Generator().manual_seed(10_007 + seed)
    shape = tuple(cfg.shape)
    prototypes = torch.randn((cfg.num_classes, *shape), generator=g)

    def split(n: int) -> TensorSplit:
        y = torch.randint(cfg.num_classes, (n,), generator=g)
        x = prototypes[y] + cfg.noise * torch.randn((n, *shape), generator=g)
        return TensorSplit(x.contiguous(), y)

    return Dataset("synthetic", split(cfg.train_size), split(cfg.test_size), cfg.num_classes)
