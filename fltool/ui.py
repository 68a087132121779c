"""Progress and summaries for the terminal: rich when stdout is a TTY, plain lines otherwise."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _span(unit: str, first: int, total: int) -> str:
    """What this process will train: e.g. "rounds 6..20" (a resume of a run that is
    finished, or met its target accuracy, has none)."""
    return f"{unit}s {first}..{total}" if first <= total else "nothing left to train"


def row_line(unit: str, total: int, row: dict[str, Any]) -> str:
    return (
        f"{unit} {row[unit]}/{total}  acc {_fmt(row.get('test_accuracy'))}"
        f"  test_loss {_fmt(row.get('test_loss'))}  train_loss {_fmt(row.get('train_loss'))}"
        f"  {row.get('wall_s', 0.0):.2f}s"
    )


class PlainReporter:
    """One line per round; safe for logs, pipes and CI. With `json_summary`, progress
    goes to stderr and the summary alone to stdout, as one JSON object."""

    def __init__(self, unit: str = "round", json_summary: bool = False) -> None:
        self.unit = unit
        self.total = 0
        self.json_summary = json_summary
        self.stream = sys.stderr if json_summary else sys.stdout

    def start(self, name: str, run_dir: str, first: int, total: int) -> None:
        self.total = total
        print(f"fltool: {name} -> {run_dir} ({_span(self.unit, first, total)})", file=self.stream, flush=True)

    def update(self, row: dict[str, Any]) -> None:
        print(row_line(self.unit, self.total, row), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def within(self, index: int, fraction: float) -> None:
        """Progress inside round (epoch) `index`: plain lines say nothing until it ends."""

    def finish(self, summary: dict[str, Any]) -> None:
        if self.json_summary:
            from fltool.run.metrics import strict_json

            print(strict_json(summary), flush=True)  # an infinite epsilon or NaN loss as null
            return
        for key, value in summary.items():
            print(f"{key}: {'-' if value is None else value}", file=self.stream, flush=True)

    def close(self) -> None:
        """Leave the terminal as it was, however the run ended (Ctrl-C, an error)."""


class RichReporter(PlainReporter):
    def __init__(self, unit: str = "round", json_summary: bool = False) -> None:
        super().__init__(unit, json_summary)
        self.console = Console(stderr=json_summary)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("acc {task.fields[acc]}  loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = None

    def start(self, name: str, run_dir: str, first: int, total: int) -> None:
        self.total = total
        self.console.print(f"[bold]fltool[/bold] {name} -> {run_dir} ({_span(self.unit, first, total)})")
        self.progress.start()
        self.task = self.progress.add_task(self.unit, total=total, completed=first - 1, acc="-", loss="-")

    def update(self, row: dict[str, Any]) -> None:
        fields = {"description": f"{self.unit} {row[self.unit]}/{self.total}"}
        if row.get("test_accuracy") is not None:
            fields.update(acc=_fmt(row["test_accuracy"]), loss=_fmt(row["test_loss"]))
            self.progress.console.print(row_line(self.unit, self.total, row), markup=False, highlight=False)  # stays above the bar
        self.progress.update(self.task, completed=row[self.unit], **fields)

    def message(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def within(self, index: int, fraction: float) -> None:
        if self.task is not None:  # rich redraws at its own rate: updating the number is cheap
            self.progress.update(self.task, completed=index - 1 + fraction)

    def close(self) -> None:
        self.progress.stop()  # shows the cursor again and ends the bar's line; idempotent

    def finish(self, summary: dict[str, Any]) -> None:
        self.close()
        if self.json_summary:
            super().finish(summary)
            return
        table = Table(title="summary", show_header=False)
        for key, value in summary.items():
            table.add_row(key, "-" if value is None else str(value))
        self.console.print(table)


def make_reporter(unit: str = "round", json_summary: bool = False) -> PlainReporter:
    """Rich progress where a person watches the stream it goes to, plain lines otherwise."""
    watched = (sys.stderr if json_summary else sys.stdout).isatty()
    return RichReporter(unit, json_summary) if watched else PlainReporter(unit, json_summary)


def print_eval(report: dict[str, Any]) -> None:
    console = Console()
    unit = "epoch" if "epoch" in report else "round"
    console.print(
        f"{report['checkpoint']}: {report['mode']} {report['model']} on {report['dataset']}, "
        f"{unit} {report[unit]}, {report['examples']} test examples",
        soft_wrap=True,  # one line even when piped (rich would cut it at 80 columns)
    )
    console.print(f"accuracy {report['accuracy']:.4f}  loss {report['loss']:.4f}")
    table = Table("class", "accuracy")
    for c, acc in enumerate(report["per_class_accuracy"]):
        table.add_row(str(c), "- (no test examples)" if acc is None else f"{acc:.4f}")
    console.print(table)
