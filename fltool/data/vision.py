"""CIFAR-10, CIFAR-100 and EMNIST through torchvision's own dataset classes, as tensors.

As for MNIST, the data root is read-only: its archives (in each dataset's own format)
are extracted into the cache, and torchvision reads them there with `download=False`,
checking its MD5s. Only when no archive is found does torchvision try to download
(`download=True`), which works with internet access and fails in one line without it.

- CIFAR: `<root>/cifar-10-python.tar.gz` (or `cifar-100-python.tar.gz`), the python
  pickle batches as published.
- EMNIST: `<root>/EMNIST/raw/emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte.gz`,
  the gzip'd IDX files, or the published `<root>/EMNIST/raw/gzip.zip` holding them;
  decompressed into the cache's `EMNIST/raw/`, where torchvision's EMNIST reads them.

Images are normalised per channel by the training set's own mean and std, so every
split is on the scale the model was trained on.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fltool.errors import FltoolError

if TYPE_CHECKING:  # torch is imported where data is loaded: validating a config needs only VISION
    import torch


@dataclass(frozen=True)
class VisionSet:
    """What fltool needs to know about a torchvision dataset without loading it."""

    cls_name: str
    shape: tuple[int, int, int]
    num_classes: int
    train_size: int
    archive: str  # what the user puts in the data root, for the error message
    split: str | None = None  # EMNIST's split


VISION = {
    "cifar10": VisionSet("CIFAR10", (3, 32, 32), 10, 50_000, "cifar-10-python.tar.gz"),
    "cifar100": VisionSet("CIFAR100", (3, 32, 32), 100, 50_000, "cifar-100-python.tar.gz"),
    "emnist_byclass": VisionSet("EMNIST", (1, 28, 28), 62, 697_932, "EMNIST/raw/emnist-byclass-*-ubyte.gz", "byclass"),
    "emnist_balanced": VisionSet("EMNIST", (1, 28, 28), 47, 112_800, "EMNIST/raw/emnist-balanced-*-ubyte.gz", "balanced"),
}


def load_vision(name: str, source: Path | None, cache: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train uint8 [N, C, H, W], y_train, x_test, y_test) of dataset `name`."""
    import torch
    import torchvision

    spec = VISION[name]
    try:
        if spec.split is None:
            _extract_cifar(spec, source, cache)
        else:
            _extract_emnist(spec, source, cache)
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise FltoolError(f"data.cache: cannot extract {spec.archive} into {cache}: {getattr(exc, 'strerror', None) or exc}") from None
    cls = getattr(torchvision.datasets, spec.cls_name)
    kwargs = {"split": spec.split} if spec.split else {}
    splits = []
    for train in (True, False):
        try:
            splits.append(cls(str(cache), train=train, download=False, **kwargs))
        except Exception:  # missing or corrupt: let torchvision download it, where there is internet
            try:
                splits.append(cls(str(cache), train=train, download=True, **kwargs))
            except Exception as exc:
                where = source if source is not None else "$FLTOOL_DATA (unset)"
                reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                raise FltoolError(
                    f"data.dataset: {name}: no readable {spec.archive} in {where} or the cache {cache}, and the "
                    f"download failed ({reason[:100]}); run once with internet (torchvision downloads it), or set "
                    f"data.root or FLTOOL_DATA to a folder holding {spec.archive}"
                ) from None
    out = []
    for s in splits:
        x = torch.as_tensor(s.data)
        if x.ndim == 4:  # CIFAR: numpy [N, H, W, C]
            x = x.permute(0, 3, 1, 2)
        else:  # EMNIST's IDX images are stored transposed; make them upright
            x = x.transpose(1, 2).unsqueeze(1)
        out += [x.contiguous(), torch.as_tensor(s.targets, dtype=torch.int64)]
    return out[0], out[1], out[2], out[3]


def _extract_cifar(spec: VisionSet, source: Path | None, cache: Path) -> None:
    """Unpack `<source>/<archive>` into the cache once; torchvision checks its files' MD5s."""
    if source is None or not (source / spec.archive).is_file():
        return
    folder = spec.archive.replace("-python.tar.gz", "-batches-py" if spec.cls_name == "CIFAR10" else "-python")
    if (cache / folder).is_dir():
        return
    cache.mkdir(parents=True, exist_ok=True)
    # into a temp folder first: a run interrupted mid-extraction leaves no half folder behind
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".extract."))
    try:
        with tarfile.open(source / spec.archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
        os.replace(tmp / folder, cache / folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_emnist(spec: VisionSet, source: Path | None, cache: Path) -> None:
    """Decompress the split's four IDX files into the cache, from `<source>/EMNIST/raw/*.gz`
    or else from the published `<source>/EMNIST/raw/gzip.zip` (which holds them in gzip/)."""
    if source is None:
        return
    src, raw = source / "EMNIST" / "raw", cache / "EMNIST" / "raw"
    bundle = src / "gzip.zip"
    for part in ("train", "test"):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"emnist-{spec.split}-{part}-{kind}-ubyte"
            if (raw / name).is_file():
                continue
            with contextlib.ExitStack() as stack:
                if (src / f"{name}.gz").is_file():
                    compressed = stack.enter_context((src / f"{name}.gz").open("rb"))
                elif bundle.is_file() and f"gzip/{name}.gz" in (zipped := stack.enter_context(zipfile.ZipFile(bundle))).namelist():
                    compressed = stack.enter_context(zipped.open(f"gzip/{name}.gz"))
                else:
                    continue
                raw.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=raw, prefix=f".{name}.", suffix=".tmp")
                with os.fdopen(fd, "wb") as out, gzip.open(compressed, "rb") as gz:
                    shutil.copyfileobj(gz, out)
            os.chmod(tmp, 0o644)
            os.replace(tmp, raw / name)


def normalise_per_channel(x_train: torch.Tensor, x_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images -> float32, each channel shifted and scaled by the training set's statistics."""
    import torch

    train = x_train.to(torch.float32).div_(255.0)
    dims = [0, *range(2, train.ndim)]
    mean = train.mean(dim=dims, keepdim=True)
    std = train.std(dim=dims, keepdim=True).clamp_min(1e-6)
    test = x_test.to(torch.float32).div_(255.0)
    return train.sub_(mean).div_(std), test.sub_(mean).div_(std)
