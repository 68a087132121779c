"""`fltool eval`: rebuild the model from a checkpoint's own config and test it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fltool.data import load_dataset
from fltool.devices import keep_freed_host_memory
from fltool.run.checkpoint import check_weights_fit, load_checkpoint
from fltool.trainers.evaluate import evaluate
from fltool.run.rundir import last_checkpoint
from fltool.devices import resolve_device
from fltool.errors import FltoolError
from fltool.models import build_model


def evaluate_checkpoint(path: Path, data_root: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Test a checkpoint file, or a run directory's latest model (its `last.pt`)."""
    dev = resolve_device(device, key="--device")
    keep_freed_host_memory(dev)  # as the trainers do: the test pass's activations are reused, not page-faulted in
    if path.is_dir():
        last = last_checkpoint(path)
        if not last.exists():
            raise FltoolError(f"{path}: a directory without {last_checkpoint(Path())}: not a run, or one stopped before its first checkpoint")
        path = last  # load_checkpoint says what it is if it is no file
    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    if data_root is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=data_root))
    check_weights_fit(ckpt, path, cfg)  # before the data is loaded: it needs none
    dataset = load_dataset(cfg.data, cfg.seed).to(dev)
    model = build_model(cfg.model, dataset.input_shape, dataset.num_classes).to(dev)
    model.load_state_dict(ckpt.model)
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
