"""`fltool eval`: rebuild the model from a checkpoint's own config and test it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fltool.data import load_dataset
from fltool.engine.checkpoint import load_checkpoint
from fltool.engine.evaluate import evaluate
from fltool.engine.rundir import last_checkpoint
from fltool.engine.setup import resolve_device
from fltool.errors import FltoolError
from fltool.models import build_model


def evaluate_checkpoint(path: Path, data_root: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Test a checkpoint file, or a run directory's latest model (its `last.pt`)."""
    dev = resolve_device(device, key="--device")
    if path.is_dir():
        if not last_checkpoint(path).is_file():
            raise FltoolError(f"{path}: a directory without {last_checkpoint(Path())}: not a run, or one stopped before its first checkpoint")
        path = last_checkpoint(path)
    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    if data_root is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=data_root))
    dataset = load_dataset(cfg.data, cfg.seed).to(dev)
    model = build_model(cfg.model.name, dataset.input_shape, dataset.num_classes).to(dev)
    try:
        model.load_state_dict(ckpt.model)
    except (RuntimeError, KeyError) as exc:
        raise FltoolError(f"{path}: model weights do not match model '{cfg.model.name}': {str(exc).splitlines()[0]}") from None
    result = evaluate(model, dataset.test, cfg.eval.batch_size, dataset.num_classes)
    return {
        "checkpoint": str(path),
        "mode": cfg.mode,
        "model": cfg.model.name,
        "dataset": cfg.data.dataset,
        "epoch" if cfg.mode == "ddp" else "round": ckpt.round,
        "accuracy": result.accuracy,
        "loss": result.loss,
        "per_class_accuracy": result.per_class,
        "examples": result.examples,
    }
