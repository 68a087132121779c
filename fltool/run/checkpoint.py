"""Checkpoints: on disk a plain dict of tensors and primitives, loadable with
`torch.load(..., weights_only=True)`; in the code a typed `Checkpoint`."""

from __future__ import annotations

import pickle
import re
import reprlib
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fltool.config import Config, config_from_dict, config_to_dict
from fltool.config.load import upgrade_stored
from fltool.data import data_shape
from fltool.run.atomic import atomic_torch_save
from fltool.errors import FltoolError
from fltool.models import build_model

FORMAT = "fltool.checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    config: Config  # the config the run was trained with
    round: int  # the last completed round (epoch, for DDP)
    model: dict[str, Tensor]  # the global model's state dict, on the CPU
    metrics: list[dict[str, Any]]  # every metrics row up to `round`
    best_accuracy: float | None
    # DDP: optimizer and scheduler state; federated: the vectorized engine's chunk_cap
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "config": config_to_dict(self.config),
            "round": self.round,
            "model": self.model,
            "metrics": self.metrics,
            "best_accuracy": self.best_accuracy,
            "extra": self.extra,
        }


def make_checkpoint(
    cfg: Config,
    model: nn.Module,
    round_: int,
    metrics: list[dict[str, Any]],
    best_accuracy: float | None,
    extra: dict[str, Any] | None = None,
) -> Checkpoint:
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return Checkpoint(cfg, round_, weights, list(metrics), best_accuracy, extra or {})


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> None:
    atomic_torch_save(ckpt.to_dict(), path)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check a checkpoint file: anything that is not one written by fltool (a
    text or foreign file, a corrupt one, one with a field of the wrong type) fails here
    in one line naming the file and what is wrong, before any of it is used."""
    path = Path(path)
    state, caught = _read_torch_file(path)
    if not isinstance(state, dict) or not isinstance(state.get("format"), str) or state["format"] != FORMAT:
        raise FltoolError(f"{path}: not an fltool checkpoint (missing format marker '{FORMAT}')")
    version = state.get("version")
    if type(version) is not int or version != VERSION:
        raise FltoolError(f"{path}: checkpoint version {_show(version)} is not supported (expected {VERSION})")
    missing = [k for k in ("config", "round", "model", "metrics", "best_accuracy") if k not in state]
    if missing:
        raise FltoolError(f"{path}: checkpoint lacks {', '.join(missing)}")
    _check_fields(state, path)
    ckpt = Checkpoint(
        config=config_from_dict(upgrade_stored(state["config"]), f"{path} (stored config)"),
        round=state["round"],
        model=state["model"],
        metrics=state["metrics"],
        best_accuracy=None if state["best_accuracy"] is None else float(state["best_accuracy"]),
        extra=state.get("extra", {}),
    )
    for w in caught:  # what torch.load warned about, now that the file is known to be a checkpoint
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return ckpt


def _check_fields(state: dict[str, Any], path: Path) -> None:
    """Every field has the type the trainers and `fltool eval` rely on; the first that
    has not is named. (Whether the weights fit the model is `check_weights_fit`'s.)"""

    def bad(key: str, wanted: str, value: Any, got: str | None = None) -> FltoolError:
        return FltoolError(f"{path}: checkpoint field '{key}' must be {wanted}, got {got or _show(value)}")

    config, round_, model = state["config"], state["round"], state["model"]
    metrics, best, extra = state["metrics"], state["best_accuracy"], state.get("extra", {})
    if not isinstance(config, dict) or not config:
        raise bad("config", "the run's config (a non-empty mapping)", config)
    if type(round_) is not int or round_ < 0:
        raise bad("round", "the last completed round (an integer >= 0)", round_)
    if not isinstance(model, dict):
        raise bad("model", "a state dict (a mapping of names to tensors)", model)
    for key, value in model.items():
        if not isinstance(key, str):
            raise bad("model", "a state dict (a mapping of names to tensors)", key, f"the key {_show(key)}")
        if not _is_plain_tensor(value):
            raise bad(f"model[{key!r}]", "a dense real tensor", value)
    if not isinstance(metrics, list):
        raise bad("metrics", "a list of metric rows (mappings)", metrics)
    for i, row in enumerate(metrics):
        if not isinstance(row, dict):
            raise bad("metrics", "a list of metric rows (mappings)", row, f"row {i + 1}: {_show(row)}")
    if best is not None and (type(best) not in (int, float) or not 0 <= best <= 1):
        raise bad("best_accuracy", "an accuracy in [0, 1] or null", best)
    if not isinstance(extra, dict):
        raise bad("extra", "a mapping", extra)
    cap = extra.get("chunk_cap")
    if cap is not None and (type(cap) is not int or cap < 1):
        raise bad("extra['chunk_cap']", "a number of clients >= 1 or null", cap)


def _is_plain_tensor(value: Any) -> bool:
    """A tensor load_state_dict can copy into a parameter: dense, real, with data (on the
    CPU, where torch.load put it; a meta tensor has none)."""
    return (
        isinstance(value, Tensor)
        and value.layout == torch.strided
        and value.device.type == "cpu"
        and not value.is_complex()
        and not value.is_quantized
    )


def _show(value: Any) -> str:
    """A value for an error line: short, and a tensor by its kind rather than its numbers."""
    if isinstance(value, Tensor):
        where = "" if value.device.type == "cpu" else f" {value.device.type}"
        layout = "" if value.layout == torch.strided else f" {str(value.layout).removeprefix('torch.')}"
        kind = f"{where}{layout} {str(value.dtype).removeprefix('torch.')}".lstrip()
        return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} tensor of shape {list(value.shape)}"
    return _SHORT.repr(value)


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxstring, _SHORT.maxother = 2, 3, 3, 3, 40, 40


def _keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_weights_fit(ckpt: Checkpoint, path: Path, cfg: Config | None = None) -> None:
    """The checkpoint's weights are a state dict of the model that `cfg` (by default its
    own config) builds: the same names with the same shapes. The model is built on the
    meta device, so nothing is allocated, and no data is needed."""
    cfg = cfg or ckpt.config
    shape, classes = data_shape(cfg.data)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a Linear of zero inputs warns when built
        wanted = {k: tuple(v.shape) for k, v in build_model(cfg.model, shape, classes).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ckpt.model.items()}
    problems = []
    if missing := [k for k in wanted if k not in got]:
        problems.append(f"missing {_keys(missing)}")
    if unexpected := [k for k in got if k not in wanted]:
        problems.append(f"unexpected {_keys(unexpected)}")
    problems += [
        f"{k} has shape {list(got[k])}, the model's is {list(wanted[k])}" for k in wanted if k in got and got[k] != wanted[k]
    ][:3]
    if problems:
        raise FltoolError(f"{path}: model weights do not match model '{cfg.model.name}': {'; '.join(problems)}")


def not_a_file(path: Path) -> str:
    """The error line for a checkpoint path that exists but is no regular file (which
    torch.load would fail on, or, for a FIFO, wait on forever)."""
    return f"{path}: is a directory, not a checkpoint file" if path.is_dir() else f"{path}: not a regular file, not a checkpoint"


# torch.save's zip archive, and its legacy format (a protocol-2 pickle of its magic number first)
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]  # without the STOP opcode

# What torch.load raised on garbage (a fuzzer's text files, foreign pickles, truncated and
# bit-flipped checkpoints): its own errors, and whatever its unpickler trips over in
# corrupt data. Only the torch.load call is guarded, so none of these hides a bug of ours.
_LOAD_ERRORS = (
    RuntimeError,  # the zip reader: "failed finding central directory", "unexpected EOF", ...
    pickle.UnpicklingError,  # the weights-only unpickler: bad opcodes, globals it refuses
    zipfile.BadZipFile,
    EOFError,
    OSError,  # a seek to a corrupt offset: [Errno 22] Invalid argument
    ValueError,  # UnicodeDecodeError in a corrupt string, "Unknown endianness type", ...
    KeyError,  # a memo reference to nothing (a text file: KeyError: 101)
    IndexError,  # "pop from empty list"
    struct.error,  # a truncated BINFLOAT: "unpack requires a buffer of 8 bytes"
    AssertionError,  # "storage key ... not found in deserialized_objects"
    TypeError,  # "unhashable type: 'dict'"
    AttributeError,  # "'str' object has no attribute 'dtype'"
)


def _read_torch_file(path: Path) -> tuple[Any, list[warnings.WarningMessage]]:
    """torch.load's result for a file torch.save wrote; a one-line FltoolError for any
    other (a text, YAML or plain pickle file is refused before torch.load sees it)."""
    if not path.is_file():
        raise FltoolError(not_a_file(path) if path.exists() else f"{path}: no such checkpoint file")
    try:
        with path.open("rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
    except OSError as exc:
        raise FltoolError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not head:
        raise FltoolError(f"{path}: not a readable checkpoint (the file is empty)")
    if not head.startswith(_ZIP_MAGIC) and head != _LEGACY_MAGIC:
        raise FltoolError(f"{path}: not a readable checkpoint (not a torch checkpoint file)")
    # Warnings torch.load gives (an unusual pickle protocol, sparse tensors) are shown only
    # for a checkpoint that then passes every check; a refused file gets its one line.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except _LOAD_ERRORS as exc:
            raise FltoolError(_load_failure(path, exc)) from None
    return state, caught


def _load_failure(path: Path, exc: BaseException) -> str:
    text = str(exc).strip()
    # a global the weights-only unpickler blocks: pickled code or objects, whatever torch's wording
    # ("Unsupported global: GLOBAL x.y" before 2.14, "unsupported GLOBAL x.y whose module ..." since)
    if isinstance(exc, pickle.UnpicklingError) and (m := re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", text)):
        return f"{path}: refused: it holds a pickled Python object ({m[1]}), not plain tensors"
    if isinstance(exc, pickle.UnpicklingError) and "WeightsUnpickler error:" in text:
        # torch's advice to load with weights_only=False is wrong here: a checkpoint of
        # fltool's holds only tensors and plain values, which a weights-only load reads
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0]
        if m := re.match(r"Unsupported global: GLOBAL (\S+)", detail):
            return f"{path}: not an fltool checkpoint (it holds an object of type {m[1]}; fltool's hold only tensors and plain values)"
        return f"{path}: not a readable checkpoint (corrupt data: {first_sentence(detail, 120)})"
    if isinstance(exc, (RuntimeError, zipfile.BadZipFile)) and text:
        # torch's zip reader adds "This is an internal miniz error. If you are seeing this ..."
        return f"{path}: not a readable checkpoint (corrupt or truncated: {first_sentence(text, 160)})"
    # an unpickler's internal error (KeyError: 101) explains nothing by itself
    detail = f"{type(exc).__name__}: {first_sentence(text, 80)}" if text else type(exc).__name__
    return f"{path}: not a readable checkpoint (corrupt or truncated data; {detail})"


def first_sentence(text: str, limit: int) -> str:
    """The first sentence of an error's first line, cut at a word (not mid-word) past `limit`."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    sentence = re.split(r"(?<=[a-z0-9)])\. ", line, maxsplit=1)[0].rstrip(".")
    if len(sentence) <= limit:
        return sentence
    return sentence[:limit].rsplit(" ", 1)[0] + " ..."
