"""Per-round metrics, rewritten atomically as CSV and JSON lines after every round.

The trainers flush a round's row after that round's checkpoint, so with a checkpoint
every round the files on disk never run ahead of it. A diverged run's NaN or infinite
values are written as null (an empty cell in the CSV): JSON has no NaN, and strict
parsers reject Python's."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from fltool.run.atomic import atomic_write_text


class MetricsLog:
    """A run's metric rows. With `tensorboard`, each flush also writes the rows not yet
    written to <run_dir>/tensorboard/ (see fltool.run.tensorboard); the files here stay
    the source of truth."""

    def __init__(self, run_dir: Path, rows: list[dict[str, Any]] | None = None, tensorboard: bool = False) -> None:
        self.run_dir = run_dir
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.tensorboard = None
        if tensorboard:
            from fltool.run.tensorboard import TensorBoardLog

            self.tensorboard = TensorBoardLog(run_dir)

    def flush(self) -> None:
        lines = (strict_json(r) + "\n" for r in self.rows)
        atomic_write_text(self.run_dir / "metrics.jsonl", "".join(lines))
        atomic_write_text(self.run_dir / "metrics.csv", to_csv(self.rows))
        if self.tensorboard is not None:
            self.tensorboard.write(self.rows)


def mark_stopped(log: MetricsLog, reason: str, write: bool) -> None:
    """Say in the last row why the run ended before its planned end (a privacy budget
    spent before the next round): `fltool runs` and `fltool sweep` read it from there,
    and a sweep does not resume such a run. A diverged round's row carries it from the
    start; this one is added after the row's checkpoint, and a resume, which restores
    the checkpoint's rows, decides the stop and adds it again."""
    if log.rows:
        log.rows[-1]["stopped"] = reason
        if write:
            log.flush()


def to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return buf.getvalue()


def strict_json(value: Any) -> str:
    """JSON with every NaN or infinity (at any depth) as null."""
    return json.dumps(_finite_or_none(value), allow_nan=False)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _cell(value: Any) -> Any:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    value = _finite_or_none(value)
    return "" if value is None else value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
