"""`fltool runs DIR`: the run directories under DIR, one row each.

A run directory is one holding config.yaml (a mapping with fltool's `mode`); the search
does not descend into one. Its status, from what is on disk:

- finished: metrics.jsonl reaches the planned rounds (epochs), or a row met
  eval.target_accuracy (the run stops there);
- interrupted: fewer rows than planned and a checkpoint (checkpoints/last.pt) to
  continue from: `fltool train --resume RUN_DIR` goes on from it;
- stopped: ended before its planned end by a rule, which its last row's `stopped`
  names: the model diverged (NaN or inf), or the privacy budget (dp.max_epsilon) would
  be overspent by the next round; a resume trains no further;
- failed: fewer rows than planned and no checkpoint (killed or crashed before its first
  checkpoint); `--resume` starts it again.

A run still training shows as interrupted. Other directories with a config.yaml that is
not an fltool run's are skipped and named in `skipped`, never a traceback. Reads only
YAML and JSON: no torch."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"


@dataclass
class RunInfo:
    path: str
    name: str
    mode: str
    algorithm: str
    done: int
    planned: int | None
    final_accuracy: float | None
    best_accuracy: float | None
    target_round: int | None
    wall_s: float | None
    status: str
    stopped: str | None = None  # why a stopped run ended (its last row's `stopped`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_run_dirs(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(run directories under `root`, sorted; (directory, why) for each foreign one)."""
    root = Path(root)
    runs: list[Path] = []
    foreign: list[tuple[Path, str]] = []
    for here, dirs, files in os.walk(root, onerror=None):
        path = Path(here)
        if CONFIG_FILE in files:
            why = foreign_reason(path)
            if why is None:
                runs.append(path)
                dirs[:] = []  # (checkpoints/, tensorboard/: nothing more below a run)
                continue
            foreign.append((path, why))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(runs), foreign


def read_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    raw = yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text())
    if not isinstance(raw, dict):
        raise ValueError("config.yaml is not a mapping")
    return raw


def foreign_reason(path: Path) -> str | None:
    import yaml

    try:
        raw = read_config(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as exc:
        return f"config.yaml unreadable ({type(exc).__name__})"
    if raw.get("mode") not in ("federated", "ddp") or not isinstance(raw.get("name"), str):
        return "config.yaml is not an fltool run's (no mode/name)"
    return None


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows; a torn or foreign line ends them (what precedes it counts)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows: list[dict[str, Any]] = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return rows
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(row, dict):
            break
        rows.append(row)
    return rows


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def run_info(run_dir: Path, root: Path | None = None) -> RunInfo:
    cfg = read_config(run_dir)
    rows = read_rows(run_dir)
    mode = str(cfg.get("mode"))
    unit = "epoch" if mode == "ddp" else "round"
    planned = _get(cfg, "ddp.epochs" if mode == "ddp" else "federated.rounds")
    planned = planned if isinstance(planned, int) else None
    algorithm = "ddp" if mode == "ddp" else str(_get(cfg, "algorithm.name") or "fedavg")
    steps = [r.get(unit) for r in rows if isinstance(r.get(unit), int)]
    done = max(steps, default=0)
    accuracies = [(r.get(unit), _number(r.get("test_accuracy"))) for r in rows]
    evaluated = [(s, a) for s, a in accuracies if a is not None]
    target = _number(_get(cfg, "eval.target_accuracy"))
    target_round = next((s for s, a in evaluated if target is not None and a >= target), None)
    walls = [_number(r.get("elapsed_s")) for r in rows]
    wall = next((w for w in reversed(walls) if w is not None), None)
    reason = rows[-1].get("stopped") if rows else None
    stopped = reason if isinstance(reason, str) and reason else None
    if (planned is not None and done >= planned) or target_round is not None:
        status = "finished"
    elif stopped is not None:
        status = "stopped"
    elif (Path(run_dir) / "checkpoints" / "last.pt").is_file():
        status = "interrupted"
    else:
        status = "failed"
    shown = Path(run_dir)
    if root is not None:
        try:
            shown = Path(run_dir).relative_to(root)
        except ValueError:
            pass
    return RunInfo(
        path=str(shown) if str(shown) != "." else str(run_dir),
        name=str(cfg.get("name")),
        mode=mode,
        algorithm=algorithm,
        done=done,
        planned=planned,
        final_accuracy=evaluated[-1][1] if evaluated else None,
        best_accuracy=max((a for _, a in evaluated), default=None),
        target_round=target_round,
        wall_s=wall,
        status=status,
        stopped=stopped if status == "stopped" else None,
    )


def collect(root: Path) -> tuple[list[RunInfo], list[tuple[Path, str]]]:
    from fltool.errors import FltoolError

    root = Path(root)
    if not root.is_dir():
        raise FltoolError(f"{root}: not a directory")
    dirs, foreign = find_run_dirs(root)
    return [run_info(d, root) for d in dirs], foreign


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(infos: list[RunInfo]) -> str:
    header = ["run", "name", "mode/algorithm", "rounds", "best acc", "target round", "wall s", "status"]
    body = [
        [
            i.path,
            i.name,
            f"{i.mode}/{i.algorithm}" if i.mode != "ddp" else "ddp",
            f"{i.done}/{_fmt(i.planned)}",
            _fmt(i.best_accuracy, 4),
            _fmt(i.target_round),
            _fmt(i.wall_s, 1),
            i.status,
        ]
        for i in infos
    ]
    return render(header, body)


def render(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body]]
    return "\n".join(lines) + "\n"


def runs_json(infos: list[RunInfo], foreign: list[tuple[Path, str]]) -> str:
    return json.dumps(
        {"runs": [i.to_dict() for i in infos], "skipped": [{"path": str(p), "why": why} for p, why in foreign]}, indent=2
    )
