"""The per-rank entry point that `fltool launch` hands to torchrun.

    python -m fltool.distributed.worker RUN_DIR

Every rank reads the config `launch` resolved into RUN_DIR (never the original YAML),
so all ranks agree on names, paths and overrides. If RUN_DIR holds a last checkpoint
-- after a torchrun restart, or with `launch --resume` -- training continues from it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fltool.process import exit_quickly, pause_gc, resume_gc

if __name__ == "__main__":
    pause_gc()  # during the imports below, as `fltool.cli.main`

from torch.distributed.elastic.multiprocessing.errors import record

from fltool.config import load_config
from fltool.data import load_dataset
from fltool.distributed.comm import TorchComm
from fltool.run.checkpoint import Checkpoint, load_checkpoint
from fltool.trainers.federated import train_federated
from fltool.trainers.progress import RunSummary
from fltool.trainers.privacy_budget import budget_for
from fltool.trainers.privacy_budget import describe as describe_budget
from fltool.run.rundir import CONFIG_FILE, last_checkpoint
from fltool.run.runner import summary_dict, what_to_train
from fltool.errors import FltoolError
from fltool.ui import PlainReporter


def run_worker(run_dir: Path) -> RunSummary:
    cfg = load_config(run_dir / CONFIG_FILE, stored=True)
    ckpt = last_checkpoint(run_dir)
    resume: Checkpoint | None = load_checkpoint(ckpt) if ckpt.is_file() else None
    comm = TorchComm.from_env(cfg)
    clean = False
    try:
        # Every rank must resume from the same point, or their collectives would not match.
        lowest, highest = comm.min_max(resume.round if resume else 0)
        if lowest != highest:
            raise FltoolError(
                f"{run_dir}: ranks found checkpoints of different rounds/epochs ({lowest} to {highest}); "
                "on several nodes, output.run_dir must be one directory on a shared filesystem"
            )
        if cfg.data.dataset != "synthetic":
            # Ranks of one node share the data cache: let one of them copy and extract
            # the archives while the others wait, instead of racing on the same files.
            if comm.local_rank == 0:
                load_dataset(cfg.data, cfg.seed)
            comm.barrier()
        unit, first, total = what_to_train(cfg, resume)
        reporter = PlainReporter(unit)  # workers' stdout goes to log files: no rich
        if comm.is_main:
            reporter.start(f"{cfg.name} (rank 0 of {comm.world_size})", str(run_dir), first, total)
            budget = budget_for(cfg) if cfg.mode == "federated" else None
            if budget is not None:
                reporter.message(describe_budget(cfg, budget))
        on_row = reporter.update if comm.is_main else None
        if cfg.mode == "ddp":
            from fltool.trainers.ddp import train_ddp

            summary = train_ddp(cfg, run_dir, on_row, resume, comm=comm)
        else:
            summary = train_federated(cfg, run_dir, on_row, resume, comm=comm)
        if comm.is_main:
            reporter.finish(summary_dict(summary, unit))
        clean = True
        return summary
    finally:
        comm.close(clean)  # on every exit path, including exceptions and Ctrl-C


@record  # writes the exception to torchrun's error file, so `launch` can report it
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m fltool.distributed.worker RUN_DIR")
    run_worker(Path(args[0]))


if __name__ == "__main__":
    resume_gc()
    main()
    exit_quickly(0)  # as `fltool.cli.entry`: without libtorch's C++ teardown
