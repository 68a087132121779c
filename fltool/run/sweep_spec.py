"""The sweep's plan: its axes from Hydra's comma syntax (`lr=0.01,0.1`, `seed=range(3)`),
the grid (their cross product, the last axis fastest), each grid point's overrides and
run directory name, and sweep.yaml, which a rerun checks it against. Everything is
validated before anything runs (see `fltool.run.sweep`)."""

from __future__ import annotations

import itertools
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fltool.config.messages import cut
from fltool.errors import FltoolError

SWEEP_FILE = "sweep.yaml"
SEED = "seed"
# where the runs go is the sweep's to decide
RESERVED = ("output.run_dir", "output.dir", "name")

_RANGE = re.compile(r"^range\(\s*(-?\d+)\s*(?:,\s*(-?\d+)\s*)?(?:,\s*(-?\d+)\s*)?\)$")
# a grid is counted before it is built: `seed=range(10**8)` would otherwise fill memory
# (every point's config is validated up front) long before anything ran
MAX_RUNS = 10_000


@dataclass
class Axis:
    key: str
    values: list[str]


@dataclass
class SweepPlan:
    config: Path
    axes: list[Axis]
    points: list[list[str]]  # each run's overrides, key=value
    names: list[str]  # each run's directory name
    dir: Path

    def run_dir(self, i: int) -> Path:
        return self.dir / self.names[i]


def _shown(text: str) -> str:
    """A token as an error line shows it: a 5,000-digit range is cut, not printed."""
    return cut(text, len(text), "characters")


def split_values(text: str) -> list[str]:
    """`a,b,[1,2],range(3)` -> its items, the commas inside brackets or quotes kept."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items]


def expand_item(key: str, item: str) -> list[str]:
    match = _RANGE.match(item)
    if not match:
        return [item]
    if any(len(g.lstrip("-")) > 18 for g in match.groups() if g is not None):
        raise FltoolError(f"sweep: {_shown(f'{key}={item}')}: a range's numbers must have at most 18 digits")
    numbers = [int(g) for g in match.groups() if g is not None]
    if len(numbers) == 3 and numbers[2] == 0:
        raise FltoolError(f"sweep: {_shown(f'{key}={item}')}: a range's step must not be 0")
    values = range(*numbers)
    if len(values) > MAX_RUNS:
        raise FltoolError(f"sweep: {_shown(f'{key}={item}')}: {len(values):,} values; a sweep runs at most {MAX_RUNS:,}")
    return [str(v) for v in values]


def parse_axes(tokens: list[str]) -> list[Axis]:
    axes: list[Axis] = []
    for token in tokens:
        key, eq, text = token.partition("=")
        key = key.strip()
        if not eq or not key:
            raise FltoolError(f"sweep: {_shown(repr(token))}: expected key=value[,value...]")
        if key in RESERVED:
            raise FltoolError(f"sweep: {_shown(key)}: the sweep sets it for each run (use --dir for where the runs go)")
        if any(a.key == key for a in axes):
            raise FltoolError(f"sweep: {_shown(key)}: given twice")
        if not text.strip():
            raise FltoolError(f"sweep: {_shown(token)}: no values; write {_shown(key)}=a,b,... or {_shown(key)}=range(n)")
        items = split_values(text)
        if any(item == "" for item in items):
            raise FltoolError(f"sweep: {_shown(token)}: an empty value in the list")
        values = [v for item in items for v in expand_item(key, item)]
        if not values:
            raise FltoolError(f"sweep: {_shown(token)}: an empty list of values")
        if len(set(values)) != len(values):
            raise FltoolError(f"sweep: {_shown(token)}: a value repeats")
        axes.append(Axis(key, values))
    runs = math.prod(len(a.values) for a in axes)
    if runs > MAX_RUNS:
        sizes = " x ".join(str(len(a.values)) for a in axes)
        raise FltoolError(f"sweep: {sizes} = {runs:,} runs; a sweep runs at most {MAX_RUNS:,}")
    return axes


def grid(axes: list[Axis]) -> list[list[str]]:
    """The cross product, as override lists (the last axis varies fastest)."""
    return [[f"{a.key}={v}" for a, v in zip(axes, combo)] for combo in itertools.product(*(a.values for a in axes))]


def run_names(axes: list[Axis], points: list[list[str]]) -> list[str]:
    """`003-lr=0.1-seed=1`: the index, then the values of the axes that vary."""
    varying = [i for i, a in enumerate(axes) if len(a.values) > 1]
    names = []
    for n, point in enumerate(points):
        parts = [f"{axes[i].key.rsplit('.', 1)[-1]}={point[i].partition('=')[2]}" for i in varying]
        slug = re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))[:80]
        names.append(f"{n:03d}" + (f"-{slug}" if slug else ""))
    return names


def plan_sweep(config: str | Path, tokens: list[str], sweep_dir: Path | None = None) -> SweepPlan:
    """Parse and validate the whole sweep (every grid point's config) before anything
    runs or is written."""
    from fltool.config import load_config

    if not tokens:
        raise FltoolError("sweep: no axes; usage: fltool sweep CONFIG.yaml key=a,b,c [seed=range(3)] ...")
    axes = parse_axes(tokens)
    base = load_config(config, [])
    points = grid(axes)
    for point in points:
        load_config(config, point)  # an unknown key or a bad value: its one line, exit 2
    if sweep_dir is None:
        sweep_dir = Path(base.output.dir) / f"{base.name}-sweep" / time.strftime("%Y%m%d-%H%M%S")
    return SweepPlan(Path(config).resolve(), axes, points, run_names(axes, points), Path(sweep_dir))


def sweep_record(plan: SweepPlan) -> dict[str, Any]:
    return {
        "config": str(plan.config),
        "axes": {a.key: a.values for a in plan.axes},
        "runs": [{"dir": name, "overrides": point} for name, point in zip(plan.names, plan.points)],
    }


def prepare_dir(plan: SweepPlan) -> None:
    """Write sweep.yaml, or check that the one there is this sweep's (a rerun)."""
    import yaml

    from fltool.run.atomic import atomic_write_text

    record = sweep_record(plan)
    path = plan.dir / SWEEP_FILE
    if path.is_file():
        try:
            old = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            old = None
        if old != record:
            raise FltoolError(f"{plan.dir}: holds another sweep (its {SWEEP_FILE} differs from this one's); give another --dir")
        return
    if plan.dir.exists() and any(plan.dir.iterdir()):
        raise FltoolError(f"{plan.dir}: exists and is not a sweep directory (no {SWEEP_FILE}); give another --dir")
    try:
        (plan.dir / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FltoolError(f"{plan.dir}: cannot create the sweep directory: {exc.strerror or exc}") from None
    atomic_write_text(path, yaml.safe_dump(record, sort_keys=False))
