"""Your data: `data.class_path` names a function or class that returns the data.

It is called once as `class_path(**data.init_args)` and returns one of
- `(train, test)` or `(train, test, client_ids)`, or
- a mapping with keys `train`, `test` and optionally `clients` and `num_classes`,

where `train` and `test` are each `(x, y)` tensors or a torch `Dataset` of `(x, y)`
pairs (materialised once into tensors here, so the training loop never calls
`__getitem__`), `y` holds integer class labels (the loss is classification
cross-entropy), and `client_ids` gives each training example's natural client (a
writer, a user, a hospital) for `data.partition: natural`. The number of classes is
`num_classes` or else the largest label + 1.

The result is kept per (class_path, init_args), so `data_shape` (checked before a run)
and `load_dataset` (the run) call the user's code once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fltool.class_path import call, resolve
from fltool.config.schema import DataConfig
from fltool.data.types import Dataset, TensorSplit
from fltool.errors import FltoolError

KEY = "data.class_path"
_LOADED: dict[tuple[str, str], Dataset] = {}


def load_user_dataset(cfg: DataConfig) -> Dataset:
    assert cfg.class_path is not None
    cache_key = (cfg.class_path, repr(sorted(cfg.init_args.items())))
    if cache_key not in _LOADED:
        fn = resolve(KEY, cfg.class_path)
        _LOADED[cache_key] = _to_dataset(cfg.class_path, call(KEY, cfg.class_path, fn, cfg.init_args))
    return _LOADED[cache_key]


def _to_dataset(path: str, out: Any) -> Dataset:
    expected = "(train, test), (train, test, client_ids) or a mapping with 'train' and 'test'"
    num_classes = None
    if isinstance(out, Mapping):
        if not {"train", "test"} <= set(out):
            raise FltoolError(f"{KEY}: {path} returned a mapping without 'train' and 'test'; expected {expected}")
        train, test, clients, num_classes = out["train"], out["test"], out.get("clients"), out.get("num_classes")
    elif isinstance(out, (tuple, list)) and len(out) in (2, 3):
        train, test, clients = out[0], out[1], (out[2] if len(out) == 3 else None)
    else:
        raise FltoolError(f"{KEY}: {path} returned {_describe(out)}; expected {expected}")
    tr, te = _split(path, "train", train), _split(path, "test", test)
    if tr.x.shape[1:] != te.x.shape[1:]:
        raise FltoolError(f"{KEY}: {path}: train inputs are {list(tr.x.shape[1:])} but test inputs {list(te.x.shape[1:])}")
    if clients is not None:
        ids = torch.as_tensor(clients)
        if ids.ndim != 1 or ids.shape[0] != len(tr) or ids.is_floating_point() or ids.is_complex():
            raise FltoolError(
                f"{KEY}: {path}: client ids must be integers, one per training example ({len(tr)}); got {_describe(ids)}"
            )
        tr.client = ids.to(torch.int64).cpu()
    labels_max = int(max(tr.y.max(), te.y.max())) if len(tr) and len(te) else 0
    classes = int(num_classes) if num_classes is not None else labels_max + 1
    if classes < 2 or labels_max >= classes or int(min(tr.y.min(), te.y.min())) < 0:
        raise FltoolError(f"{KEY}: {path}: labels must be in [0, num_classes) with num_classes >= 2; got 0..{labels_max}")
    return Dataset(path, tr, te, classes)


def _split(path: str, which: str, data: Any) -> TensorSplit:
    """(x, y) tensors, or a Dataset of (x, y) pairs stacked once, as a TensorSplit."""
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, (tuple, list)):
        try:
            pairs = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
            x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
            y = torch.as_tensor([int(p[1]) for p in pairs])
        except Exception as exc:
            raise FltoolError(
                f"{KEY}: {path}: the {which} Dataset's items must be (input tensor, integer label) of one shape "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''})"
            ) from None
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    else:
        raise FltoolError(f"{KEY}: {path}: {which} is {_describe(data)}; expected (x, y) tensors or a torch Dataset")
    if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise FltoolError(
            f"{KEY}: {path}: {which} x must be [N, ...] and y [N] with N >= 1; got x {list(x.shape)}, y {list(y.shape)}"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise FltoolError(f"{KEY}: {path}: {which} y must hold integer class labels; got {y.dtype}")
    if x.dtype in (torch.float64, torch.float16, torch.bfloat16):
        x = x.float()  # the model's weights are float32
    return TensorSplit(x.detach().cpu().contiguous(), y.detach().cpu().to(torch.int64).contiguous())


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"
