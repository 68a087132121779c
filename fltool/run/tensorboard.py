"""TensorBoard output (`output.tensorboard: true`): the metric rows as scalars per round
(epoch for DDP) and the run's config as hyperparameters, in <run_dir>/tensorboard/.

Written by `MetricsLog.flush` after metrics.jsonl/csv, which stay the source of truth.
The first write of a process writes every row it holds (a resumed run's earlier rows
too) after a purge marker at the first row's step, so events an earlier, interrupted
process wrote past its last checkpoint are dropped by TensorBoard's reader and each
step holds the numbers metrics.csv holds."""

from __future__ import annotations

import math
import weakref
from pathlib import Path
from typing import Any

from fltool.errors import FltoolError

TB_DIR = "tensorboard"


def check_installed() -> None:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise FltoolError(
            "output.tensorboard: true needs the tensorboard package: pip install 'fltool[tensorboard]' "
            "(or pip install tensorboard), or set output.tensorboard=false"
        ) from None


class TensorBoardLog:
    def __init__(self, run_dir: Path) -> None:
        check_installed()
        self.run_dir = Path(run_dir)
        self.writer: Any = None
        self.written = 0

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=step_of(rows[0]))
            weakref.finalize(self, self.writer.close)
            self._write_hparams()
        for row in rows[self.written :]:
            step = step_of(row)
            for key, value in scalars(row).items():
                self.writer.add_scalar(key, value, step)
        self.written = len(rows)
        self.writer.flush()

    def _write_hparams(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        params = run_hparams(self.run_dir)
        if not params:
            return
        for summary in hparams(params, {"test_accuracy": 0.0}):
            self.writer.file_writer.add_summary(summary)


def step_of(row: dict[str, Any]) -> int:
    return int(row["round"] if "round" in row else row["epoch"])


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numeric columns but its step; a NaN/inf or missing value is left out."""
    return {
        k: float(v)
        for k, v in row.items()
        if k not in ("round", "epoch")
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


def run_hparams(run_dir: Path) -> dict[str, Any]:
    """The run's config.yaml, flattened to dotted keys with TensorBoard's value types."""
    import yaml

    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    out: dict[str, Any] = {}
    for key, value in flatten(raw if isinstance(raw, dict) else {}).items():
        if isinstance(value, (bool, str)) or (isinstance(value, (int, float)) and math.isfinite(value)):
            out[key] = value
        else:
            out[key] = "null" if value is None else str(value)
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
