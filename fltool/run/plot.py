"""`fltool plot RUN_OR_SWEEP_DIR... [--metric test_accuracy] [--x round|elapsed_s|bytes_up] [-o plot.png]`.

Every run directory found under the arguments is read (config.yaml and metrics.jsonl).
Runs whose configs differ only in `seed` (and output.*) are one setting, drawn as the
mean over its seeds with a band of ± one (sample) standard deviation; the legend names
each setting by the config keys that differ between the plotted settings (by its `name`
alone when the settings' names differ). With --metric
test_accuracy, each eval.target_accuracy is a dashed horizontal line. --x bytes_up is
the cumulative bytes uploaded. The -o suffix picks the format: .png or .svg. matplotlib
is imported here only, with the Agg backend (install: pip install 'fltool[plot]')."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fltool.errors import FltoolError

X_AXES = ("round", "elapsed_s", "bytes_up")
FORMATS = (".png", ".svg")
IGNORED = ("seed",)  # a setting's seeds are one curve
IGNORED_PREFIXES = ("output.",)  # where a run went says nothing about it


@dataclass
class Run:
    dir: Path
    config: dict[str, Any]  # flattened, dotted keys
    rows: list[dict[str, Any]]


@dataclass
class Curve:
    label: str
    runs: list[Run]
    x: list[float]
    mean: list[float]
    std: list[float]


@dataclass
class PlotResult:
    path: Path
    labels: list[str]
    differing: list[str]
    curves: list[Curve]


def collect_runs(paths: list[Path]) -> list[Run]:
    from fltool.run.runs_table import find_run_dirs, foreign_reason, read_config, read_rows
    from fltool.run.tensorboard import flatten

    dirs: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FltoolError(f"{path}: no such file or directory")
        if (path / "config.yaml").is_file() and foreign_reason(path) is None:
            found = [path]
        else:
            found = find_run_dirs(path)[0] if path.is_dir() else []
        if not found:
            raise FltoolError(f"{path}: no fltool run directory (one with config.yaml) in it")
        dirs.extend(d for d in found if d not in dirs)
    return [Run(d, flatten(read_config(d)), read_rows(d)) for d in dirs]


def setting_key(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in IGNORED and not k.startswith(IGNORED_PREFIXES)}


def differing_keys(runs: list[Run]) -> list[str]:
    """The config keys (but seed and output.*) whose values are not the same in every run."""
    settings = [setting_key(r.config) for r in runs]
    keys: list[str] = []
    for s in settings:
        keys.extend(k for k in s if k not in keys)
    return [k for k in keys if len({repr(s.get(k)) for s in settings}) > 1]


def _short(value: Any) -> str:
    return "null" if value is None else str(value)


def series(run: Run, metric: str, x: str) -> dict[int, tuple[float, float]]:
    """step -> (x, metric) for the run's rows that have the metric."""
    out: dict[int, tuple[float, float]] = {}
    cumulative = 0.0
    for row in run.rows:
        step = row.get("round", row.get("epoch"))
        if x == "bytes_up":
            cumulative += float(row.get("bytes_up") or 0)
        y = row.get(metric)
        if not isinstance(step, int) or not isinstance(y, (int, float)) or isinstance(y, bool) or not math.isfinite(y):
            continue
        xs = {"round": float(step), "elapsed_s": row.get("elapsed_s"), "bytes_up": cumulative}[x]
        if isinstance(xs, (int, float)):
            out[step] = (float(xs), float(y))
    return out


def curves(runs: list[Run], metric: str, x: str) -> tuple[list[Curve], list[str]]:
    differing = differing_keys(runs)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(repr(sorted(setting_key(run.config).items(), key=lambda kv: kv[0])), []).append(run)
    # settings of differently named configs (one per paper cell, say) are told apart by name
    # alone: the keys that make them differ would crowd the plot out of the figure
    by_name = "name" in differing and len({repr(g[0].config.get("name")) for g in groups.values()}) == len(groups)
    out = []
    for members in groups.values():
        cfg = members[0].config
        label = ", ".join(f"{k}={_short(cfg.get(k))}" for k in differing) or str(cfg.get("name", members[0].dir.name))
        if by_name:
            label = str(cfg.get("name"))
        if len(members) > 1:
            label += f" (mean ± std, {len(members)} seeds)"
        per_run = [series(r, metric, x) for r in members]
        steps = sorted({s for p in per_run for s in p})
        xs, means, stds = [], [], []
        for step in steps:
            points = [p[step] for p in per_run if step in p]
            xs.append(statistics.fmean(pt[0] for pt in points))
            ys = [pt[1] for pt in points]
            means.append(statistics.fmean(ys))
            stds.append(statistics.stdev(ys) if len(ys) > 1 else 0.0)
        out.append(Curve(label, members, xs, means, stds))
    return out, differing


def plot_runs(paths: list[Path], metric: str = "test_accuracy", x: str = "round", out: Path = Path("plot.png")) -> PlotResult:
    out = Path(out)
    if x not in X_AXES:
        raise FltoolError(f"plot: --x {x}: expected one of {', '.join(X_AXES)}")
    if out.suffix.lower() not in FORMATS:
        raise FltoolError(f"plot: -o {out}: the suffix picks the format; expected .png or .svg")
    runs = collect_runs(paths)
    drawn, differing = curves(runs, metric, x)
    if not any(c.x for c in drawn):
        columns = sorted({k for r in runs for row in r.rows for k, v in row.items() if isinstance(v, (int, float))})
        raise FltoolError(f"plot: no run has values of {metric!r} (with --x {x}); numeric columns: {', '.join(columns) or 'none'}")
    try:
        import matplotlib
    except ImportError:
        raise FltoolError("plot: needs matplotlib: pip install 'fltool[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.add_subplot()
    for curve in drawn:
        (line,) = ax.plot(curve.x, curve.mean, label=curve.label, linewidth=1.5)
        if len(curve.runs) > 1:
            lo = [m - s for m, s in zip(curve.mean, curve.std)]
            hi = [m + s for m, s in zip(curve.mean, curve.std)]
            ax.fill_between(curve.x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    if metric == "test_accuracy":
        targets = sorted({r.config.get("eval.target_accuracy") for r in runs} - {None})
        for t in targets:
            ax.axhline(t, color="gray", linestyle="--", linewidth=1, label=f"target {t:g}")
    ax.set_xlabel({"round": "round", "elapsed_s": "elapsed (s)", "bytes_up": "bytes uploaded (cumulative)"}[x])
    ax.set_ylabel(metric)
    if x == "round":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    legend = ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, format=out.suffix.lower()[1:])
    except OSError as exc:
        raise FltoolError(f"plot: cannot write {out}: {exc.strerror or exc}") from None
    return PlotResult(out, [t.get_text() for t in legend.get_texts()], differing, drawn)
