"""The `fltool` command line: parses arguments and delegates; no training logic here."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from fltool.run.rundir import RunInterrupted
from fltool.errors import FltoolError
from fltool.process import exit_quickly, pause_gc, resume_gc

app = typer.Typer(
    add_completion=True,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Federated learning (FedAvg, FedProx, SCAFFOLD, robust aggregation, DP, ...) and DDP training from a YAML experiment file.",
)


def show_version(value: bool) -> None:
    if value:
        from fltool import __version__

        typer.echo(f"fltool {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=show_version, is_eager=True, help="Print fltool's version and exit.")
    ] = False,
) -> None:
    """Federated learning (FedAvg, FedSGD, FedProx, SCAFFOLD, ...) and DDP training from a YAML experiment file."""


def complete_keys(ctx: typer.Context, incomplete: str) -> list[str]:
    """Tab after the YAML file: its config keys (fltool.completion; no torch)."""
    from fltool.completion import complete_keys as keys

    return keys(incomplete, ctx.params.get("config"))


@contextmanager
def user_errors(resume_with: str = "fltool train") -> Iterator[None]:
    """FltoolError -> its lines on stderr and exit 2; Ctrl-C -> how to continue, exit 130.
    FLTOOL_DEBUG=1 keeps the traceback.

    Every command enters this right after its imports, so it is also where the garbage
    collector, paused by `main` while they ran, resumes (`fltool.process`)."""
    resume_gc()
    try:
        yield
    except FltoolError as exc:
        if os.environ.get("FLTOOL_DEBUG") == "1":
            raise
        for line in exc.lines:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt as exc:
        if os.environ.get("FLTOOL_DEBUG") == "1":
            raise
        typer.echo(interrupt_message(exc, resume_with), err=True)
        raise typer.Exit(130) from None


def interrupt_message(exc: KeyboardInterrupt, resume_with: str) -> str:
    if not isinstance(exc, RunInterrupted):  # before any run directory existed
        return "interrupted"
    if not exc.run_dir.exists():
        return f"interrupted before the first checkpoint: nothing to resume, {exc.run_dir} was removed"
    if not exc.resumable:  # a resume of a run directory without a checkpoint starts the run again
        return f"interrupted before the first checkpoint; `{resume_with} --resume {exc.run_dir}` starts the run again there"
    return f"interrupted: the last checkpoint is intact; continue with `{resume_with} --resume {exc.run_dir}`"


@app.command()
def train(
    config: Annotated[Optional[str], typer.Argument(help="Experiment YAML file.", show_default=False)] = None,
    overrides: Annotated[
        Optional[list[str]], typer.Argument(help="Dotted overrides: key=value ...", autocompletion=complete_keys)
    ] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config and exit.")] = False,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this directory.")] = None,
    json_summary: Annotated[
        bool, typer.Option("--json", help="Print the summary as one JSON object on stdout; progress goes to stderr.")
    ] = False,
) -> None:
    """Train from CONFIG (federated simulation in-process, or DDP with world size 1)."""
    from fltool.config import dump_config, load_config
    from fltool.run.resume import resume_config
    from fltool.run.runner import resume_run, start_run
    from fltool.run.signals import sigterm_as_interrupt
    from fltool.ui import make_reporter

    overrides = list(overrides or [])
    with user_errors(), sigterm_as_interrupt():
        if resume is not None and config is not None:  # with --resume every positional is an override
            overrides.insert(0, config)
        if resume is None and config is None:
            raise FltoolError("train: missing CONFIG; usage: fltool train CONFIG.yaml [key=value ...]")
        if print_config:
            cfg = load_config(config, overrides) if resume is None else resume_config(resume, overrides)
            typer.echo(dump_config(cfg), nl=False)
        elif resume is not None:
            resume_run(resume, overrides, make_reporter(json_summary=json_summary))
        else:
            start_run(load_config(config, overrides), make_reporter(json_summary=json_summary))


@app.command()
def launch(
    config: Annotated[Optional[str], typer.Argument(help="Experiment YAML file.", show_default=False)] = None,
    overrides: Annotated[
        Optional[list[str]], typer.Argument(help="Dotted overrides: key=value ...", autocompletion=complete_keys)
    ] = None,
    nproc: Annotated[int, typer.Option("--nproc", help="Worker processes on this node (one per GPU with nccl).")] = 1,
    nnodes: Annotated[int, typer.Option("--nnodes", help="Number of nodes.")] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", help="This node's rank (multi-node).")] = 0,
    rdzv_endpoint: Annotated[
        Optional[str], typer.Option("--rdzv-endpoint", help="HOST:PORT of the rendezvous (multi-node).")
    ] = None,
    max_restarts: Annotated[int, typer.Option("--max-restarts", help="Restart the worker group this often.")] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the equivalent torchrun command and exit.")] = False,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this directory.")] = None,
) -> None:
    """Run CONFIG on N worker processes under torchrun (DDP, or a federated cohort split across ranks)."""
    from fltool.distributed.launch import LaunchOptions, WorkerFailed, dry_run_command, prepare
    from fltool.distributed.launch import prepare_data
    from fltool.distributed.launch import launch as run_launch

    overrides = list(overrides or [])
    if resume is not None and config is not None:  # with --resume every positional is an override
        overrides.insert(0, config)
        config = None
    opts = LaunchOptions(nproc, nnodes, node_rank, rdzv_endpoint, max_restarts)
    with user_errors(resume_with=f"fltool launch --nproc {nproc}"):
        cfg, resume = prepare(config, overrides, opts, resume)
        if dry_run:
            typer.echo(dry_run_command(cfg, opts, resume))
            return
        prepare_data(cfg)
        try:
            run_dir = run_launch(cfg, opts, resume)
        except WorkerFailed as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"run_dir: {run_dir}")


@app.command("eval")
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by fltool, or a run directory (its last.pt).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    data_root: Annotated[Optional[str], typer.Option(help="Override data.root of the stored config.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Evaluate CHECKPOINT (or a run directory's last checkpoint) on the test split of its dataset."""
    from fltool.run.evaluate_checkpoint import evaluate_checkpoint
    from fltool.run.metrics import strict_json
    from fltool.ui import print_eval

    with user_errors():
        report = evaluate_checkpoint(checkpoint, data_root=data_root, device=device)
        if as_json:
            typer.echo(strict_json(report))  # a diverged model's NaN loss as null
        else:
            print_eval(report)


@app.command()
def sweep(
    config: Annotated[str, typer.Argument(help="Experiment YAML file.", show_default=False)],
    axes: Annotated[
        Optional[list[str]],
        typer.Argument(help="Axes: key=a,b,c or key=range(n); the grid is their cross product.", autocompletion=complete_keys),
    ] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Runs at once, each its own process.")] = 1,
    sweep_dir: Annotated[
        Optional[Path],
        typer.Option("--dir", help="Sweep directory (default <output.dir>/<name>-sweep/<timestamp>); rerun with it to continue."),
    ] = None,
) -> None:
    """Run a grid of CONFIG's runs; rerun with --dir to skip finished runs and resume the rest."""
    from fltool.run.sweep import ENDED, format_summary, run_sweep
    from fltool.run.sweep_spec import plan_sweep

    with user_errors():
        plan = plan_sweep(config, list(axes or []), sweep_dir)
        typer.echo(f"sweep: {len(plan.points)} runs in {plan.dir}")
        try:
            results = run_sweep(plan, jobs, typer.echo)
        except KeyboardInterrupt:
            import shlex

            again = shlex.join(["fltool", "sweep", config, *(axes or []), "--dir", str(plan.dir)])
            typer.echo(f"interrupted; continue with `{again}`", err=True)
            raise typer.Exit(130) from None
    typer.echo(format_summary(plan, results), nl=False)
    typer.echo(f"summary: {plan.dir / 'summary.csv'}")
    if any(r.status not in ENDED for r in results):
        raise typer.Exit(1)


@app.command()
def plot(
    dirs: Annotated[list[Path], typer.Argument(help="Run or sweep directories.", show_default=False)],
    metric: Annotated[str, typer.Option("--metric", help="The metrics.jsonl column to draw.")] = "test_accuracy",
    x: Annotated[str, typer.Option("--x", help="round, elapsed_s or bytes_up (cumulative).")] = "round",
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file, .png or .svg.")] = Path("plot.png"),
) -> None:
    """Plot runs side by side (seeds of one setting as mean ± std); needs matplotlib."""
    from fltool.run.plot import plot_runs

    with user_errors():
        result = plot_runs(dirs, metric, x, out)
    typer.echo(f"wrote {result.path} ({len(result.curves)} curves)")


@app.command()
def runs(
    root: Annotated[Path, typer.Argument(help="Directory searched for run directories.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """List the runs under ROOT: progress, best accuracy, target round, wall time, status."""
    from fltool.run.runs_table import collect, format_table, runs_json

    with user_errors():
        infos, foreign = collect(root)
    if as_json:
        typer.echo(runs_json(infos, foreign))
        return
    typer.echo(format_table(infos), nl=False)
    for path, why in foreign:
        typer.echo(f"skipped {path}: {why}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. A usage error (an unknown option, `--nproc abc`, a missing argument) is
    one line and exit 2 like every other input error, not click's framed usage box."""
    usage_error = typer.BadParameter.__bases__[0]  # click's UsageError, vendored by typer or not
    pause_gc()  # while the command imports torch; `user_errors` resumes it
    try:
        code = app(prog_name="fltool", args=argv, standalone_mode=False)
    except usage_error as exc:
        if exc.format_message():  # empty for `fltool` alone, whose help typer has printed
            command = exc.ctx.command_path if exc.ctx is not None else "fltool"
            typer.echo(f"error: {command}: {exc.format_message()} (see `{command} --help`)", err=True)
        code = exc.exit_code
    resume_gc()  # for an in-process caller; a usage error exits before `user_errors`
    sys.exit(code or 0)


def entry() -> None:
    """The `fltool` console script and `python -m fltool`: `main`, then an exit without
    the interpreter's teardown (`fltool.process`). `main` itself returns to an
    in-process caller as any function does."""
    try:
        main()
    except SystemExit as exc:
        exit_quickly(exc.code)


if __name__ == "__main__":
    entry()
