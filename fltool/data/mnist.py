"""MNIST and FashionMNIST read from disk without torchvision (its import costs seconds).

The cache's `<folder>/raw/` holds the .gz archives copied from the read-only data root
and the IDX files extracted from them, in torchvision's layout, so a cache built by
either is read by the other. An archive's MD5 is checked against the published one
(torchvision's table) once, when it is extracted; an extracted file is written under a
temporary name and renamed, so an interrupted run leaves no half file behind. Uncompressed
IDX files in the data root are read where they are. Only when a file is found in none of
these forms is torchvision needed (to download): `read_local` then returns None.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch

from fltool.data.idx import IdxError, read_idx
from fltool.errors import FltoolError

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# folder -> archive -> MD5, as in torchvision.datasets.MNIST/FashionMNIST.resources (0.29)
MD5 = {
    "MNIST": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "FashionMNIST": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}


def read_local(
    name: str, folder: str, raw: Path, source_raw: Path | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(train images uint8 [N, 28, 28], train labels, test images, test labels) from the
    cache `raw` or the data root's `source_raw`, or None if some file is in neither."""
    if not all(_available(stem, raw, source_raw) for stem in FILES):
        return None
    x_train, y_train, x_test, y_test = (_read(name, folder, stem, raw, source_raw) for stem in FILES)
    for images, labels, stem in ((x_train, y_train, FILES[0]), (x_test, y_test, FILES[2])):
        if images.dtype != torch.uint8 or images.ndim != 3 or labels.dtype != torch.uint8 or labels.ndim != 1:
            raise FltoolError(
                f"data.dataset: {name}: {raw / stem} and its labels are not uint8 images [N, H, W] and labels [N]: "
                f"got {images.dtype} {list(images.shape)} and {labels.dtype} {list(labels.shape)}"
            )
        if images.shape[0] != labels.shape[0] or (len(labels) and int(labels.max()) > 9):
            raise FltoolError(
                f"data.dataset: {name}: {raw / stem}: {images.shape[0]} images but {labels.shape[0]} labels "
                f"(labels 0..{int(labels.max()) if len(labels) else '-'}, expected 0..9)"
            )
    return x_train, y_train, x_test, y_test


def _available(stem: str, raw: Path, source_raw: Path | None) -> bool:
    return (raw / stem).is_file() or (raw / f"{stem}.gz").is_file() or (source_raw is not None and (source_raw / stem).is_file())


def _read(name: str, folder: str, stem: str, raw: Path, source_raw: Path | None) -> torch.Tensor:
    extracted = raw / stem
    if extracted.is_file():
        try:
            return read_idx(extracted)
        except IdxError:
            # cut short by an interrupted extraction (torchvision's is not atomic): extract afresh
            extracted.unlink(missing_ok=True)
    if source_raw is not None and (source_raw / stem).is_file():
        return _read_or_fail(name, source_raw / stem)
    _extract(name, raw / f"{stem}.gz", MD5[folder].get(f"{stem}.gz"), extracted, source_raw)
    return _read_or_fail(name, extracted)


def _read_or_fail(name: str, path: Path) -> torch.Tensor:
    try:
        return read_idx(path)
    except (IdxError, OSError) as exc:
        raise FltoolError(f"data.dataset: {name}: {path}: {exc}; replace it with the published file") from None


def _extract(name: str, archive: Path, md5: str | None, target: Path, source_raw: Path | None) -> None:
    # the user knows the data root's file, not our cache's copy of it
    shown = source_raw / archive.name if source_raw is not None and (source_raw / archive.name).is_file() else archive
    if md5 is not None and _md5(archive) != md5:
        archive.unlink(missing_ok=True)  # the cache's copy: a later run copies the root's afresh
        raise FltoolError(
            f"data.dataset: {name}: {shown} is not the published archive (MD5 differs); replace it, "
            f"or remove it for torchvision to download it"
        )
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(archive, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
        os.chmod(tmp, 0o644)  # not mkstemp's 0600: a cache may be shared
        os.replace(tmp, target)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        Path(tmp).unlink(missing_ok=True)
        raise FltoolError(f"data.dataset: {name}: cannot extract {shown} into {target.parent}: {exc}") from None


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
