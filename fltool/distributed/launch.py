"""`fltool launch`: validate, create the run directory once, then start torchrun in-process.

The workers are started by PyTorch's own launcher (`torch.distributed.run`, i.e. the
elastic agent), called as a library the way Accelerate and Lightning do; each worker
runs `python -m fltool.distributed.worker RUN_DIR`.
"""

from __future__ import annotations

import contextlib

import logging
import os
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fltool.config import Config, dump_config, load_config
from fltool.distributed.comm import TORCHRUN_ENV, resolve_backend, under_torchrun
from fltool.run.atomic import atomic_write_text
from fltool.run.metrics import read_metrics
from fltool.run.checkpoint import load_checkpoint
from fltool.run.resume import check_resumable, resume_config
from fltool.run.rundir import CONFIG_FILE, RunInterrupted, check_run_dir_available, create_run_dir, last_checkpoint, run_lock
from fltool.models.setup import check_model_fits
from fltool.errors import FltoolError

WORKER_MODULE = "fltool.distributed.worker"
LOG_DIR = "torchrun"
# Set for torchrun, so that rank 0's worker hosts a fresh store each rendezvous round.
# The agent's shared store outlives rounds, and when one node restarts after a failure and another for the
# membership change, their restart counts differ, so workers cannot agree on a prefix
# that hides the previous round's keys (seen as a DistStoreError timeout in the two-node
# restart test).
UNSHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
MAX_NPROC = 1024  # per node: far beyond any node's GPUs, and torchrun would try to spawn them all


@dataclass
class LaunchOptions:
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    max_restarts: int = 0


class WorkerFailed(Exception):
    """A worker died; the message is the one-line summary for the user."""


def check_options(opts: LaunchOptions) -> None:
    problems = []
    if opts.nproc < 1:
        problems.append(f"launch: --nproc must be >= 1, got {opts.nproc}")
    if opts.nnodes < 1:
        problems.append(f"launch: --nnodes must be >= 1, got {opts.nnodes}")
    if not 0 <= opts.node_rank < max(opts.nnodes, 1):
        problems.append(f"launch: --node-rank must be in [0, {opts.nnodes - 1}], got {opts.node_rank}")
    if opts.max_restarts < 0:
        problems.append(f"launch: --max-restarts must be >= 0, got {opts.max_restarts}")
    if opts.nproc > MAX_NPROC:
        problems.append(f"launch: --nproc must be <= {MAX_NPROC} (processes on this node), got {opts.nproc}")
    if opts.nnodes > 1 and not opts.rdzv_endpoint:
        problems.append("launch: --nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    if opts.rdzv_endpoint is not None and split_endpoint(opts.rdzv_endpoint) is None:
        problems.append(f"launch: --rdzv-endpoint must be HOST:PORT with a port in 1..65535, got {opts.rdzv_endpoint!r}")
    if problems:
        raise FltoolError(*problems)


def split_endpoint(endpoint: str) -> tuple[str, int] | None:
    """HOST:PORT (an IPv6 host in brackets) -> (host, port), or None if malformed."""
    host, sep, port = endpoint.rpartition(":")
    if host.startswith("["):  # only a bracketed host may hold colons
        host = host[1:-1] if host.endswith("]") else ""
    elif ":" in host or "]" in host:
        host = ""
    if not sep or not host or any(c.isspace() for c in endpoint) or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def check_endpoint_resolves(opts: LaunchOptions) -> None:
    """torchrun retries an unresolvable rendezvous host until its join timeout, printing
    a warning a second; fail at once instead."""
    if opts.rdzv_endpoint is None:
        return
    host, port = split_endpoint(opts.rdzv_endpoint) or ("", 0)
    try:
        socket.getaddrinfo(host, port)
    except (socket.gaierror, UnicodeError) as exc:
        raise FltoolError(f"launch: --rdzv-endpoint: cannot resolve host {host!r} ({exc})") from None


def check_not_nested() -> None:
    """Inside a torchrun worker, a second launch would spawn workers of workers."""
    if under_torchrun():
        found = ", ".join(n for n in TORCHRUN_ENV if n in os.environ)
        raise FltoolError(
            f"launch: already running under torchrun ({found} set); "
            "call `python -m fltool.distributed.worker RUN_DIR` from torchrun instead of `fltool launch`"
        )


def check_devices(cfg: Config, nproc: int, gpu_count: int | None = None) -> None:
    """One GPU per process on this node for nccl (or gloo on cuda); fail before anything starts."""
    backend = resolve_backend(cfg)
    if backend == "nccl" and cfg.device == "cpu":
        raise FltoolError("ddp.backend: nccl cannot run with device: cpu; use ddp.backend: gloo or auto")
    gpus = torch.cuda.device_count() if gpu_count is None else gpu_count
    # as `rank_device` decides: gloo with device auto also puts each rank on its own GPU
    uses_gpus = backend == "nccl" or cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    if not uses_gpus:
        return
    if gpus == 0:
        what = "ddp.backend: nccl" if backend == "nccl" else "device: cuda"
        raise FltoolError(f"{what} needs CUDA but no GPU is visible; use ddp.backend: gloo and device: cpu or auto")
    if nproc > gpus:
        raise FltoolError(
            f"launch: --nproc {nproc} exceeds the {gpus} visible GPU(s) (one per process with {backend} "
            f"on cuda); use --nproc <= {gpus}, or ddp.backend: gloo with device: cpu"
        )


def check_shared_run_dir(cfg: Config, opts: LaunchOptions, resume: Path | None) -> None:
    """Several nodes must agree on one run directory; a timestamped name would differ per node."""
    if opts.nnodes > 1 and resume is None and not cfg.output.run_dir:
        raise FltoolError(
            "launch: --nnodes > 1 needs output.run_dir=PATH, one directory on a filesystem every node "
            "shares (each node would otherwise create its own timestamped run directory)"
        )


def torchrun_args(opts: LaunchOptions, run_dir: Path | str, rdzv_id: str) -> list[str]:
    """The torchrun command line (without the program name) for this launch.

    With c10d rendezvous, torchrun assigns node ranks itself (it ignores --node-rank), so
    it is not passed; fltool uses the node rank only to decide which node creates the
    run directory."""
    args = [f"--nproc-per-node={opts.nproc}"]
    if opts.nnodes == 1 and not opts.rdzv_endpoint:
        args.append("--standalone")  # c10d rendezvous on a free port: launches never collide
    else:
        args += [
            f"--nnodes={opts.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={opts.rdzv_endpoint}",
            f"--rdzv-id={rdzv_id}",
        ]
    args += [
        f"--max-restarts={opts.max_restarts}",
        f"--log-dir={Path(run_dir) / LOG_DIR}",
        "--redirects=3",  # both streams of every rank to <run>/torchrun/.../<rank>/
        "--tee=1",  # ... and stdout to the console too (rank 0 prints progress)
        "--module",
        WORKER_MODULE,
        str(run_dir),
    ]
    return args


def prepare(
    config: str | None, overrides: list[str], opts: LaunchOptions, resume: Path | None
) -> tuple[Config, Path | None]:
    """Everything that can fail on bad input, before any directory or process exists."""
    check_not_nested()
    check_options(opts)
    if resume is not None:
        cfg = resume_config(resume, overrides)
        ckpt_path = last_checkpoint(resume)
        if ckpt_path.exists():  # none yet: the workers start the run afresh
            check_resumable(load_checkpoint(ckpt_path), cfg, ckpt_path, opts.nproc * opts.nnodes, "this launch")
    else:
        if config is None:
            raise FltoolError("launch: missing CONFIG; usage: fltool launch --nproc N CONFIG.yaml [key=value ...]")
        cfg = load_config(config, overrides)
    check_model_fits(cfg)
    check_devices(cfg, opts.nproc)
    check_shared_run_dir(cfg, opts, resume)
    if resume is None and opts.node_rank == 0:  # the node that creates the run directory
        check_run_dir_available(cfg)
    return cfg, resume


def prepare_data(cfg: Config) -> None:
    """Fill the data cache once, before any worker starts: missing data is then a one-line
    error from `launch` (exit 2), and the workers find the archives already extracted."""
    if cfg.data.dataset != "synthetic":
        from fltool.data import load_dataset

        load_dataset(cfg.data, cfg.seed)


def dry_run_command(cfg: Config, opts: LaunchOptions, resume: Path | None) -> str:
    """The shell command that `launch` amounts to, with the variable it sets for torchrun."""
    run_dir = resume or cfg.output.run_dir or f"{cfg.output.dir}/{cfg.name}/<timestamp>"
    return shlex.join([f"{UNSHARED_STORE_ENV}=1", "torchrun", *torchrun_args(opts, run_dir, cfg.name)])


def launch(cfg: Config, opts: LaunchOptions, resume: Path | None = None) -> Path:
    """Create (or reuse) the run directory and run the workers; raise WorkerFailed on failure."""
    check_endpoint_resolves(opts)
    run_dir = node_run_dir(cfg, opts, resume)
    # node 0 holds the run for the whole launch (its workers are its children); other nodes share it
    with run_lock(run_dir) if opts.node_rank == 0 else contextlib.nullcontext():
        if resume is not None:  # the workers read the run directory's config: keep it current
            atomic_write_text(resume / CONFIG_FILE, dump_config(cfg))
        return run_workers(cfg, opts, run_dir)


def run_workers(cfg: Config, opts: LaunchOptions, run_dir: Path) -> Path:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousError
    from torch.distributed.run import parse_args, run

    # torchrun's banner (a framed note that it set OMP_NUM_THREADS=1, which docs/distributed.md
    # says) is noise around fltool's own lines; its other warnings still show.
    run_log = logging.getLogger("torch.distributed.run")
    run_log.addFilter(drop_banner)
    # The agent logs each dead worker at ERROR level; `failure_summary` reports it once.
    agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)
    shared_store = os.environ.get(UNSHARED_STORE_ENV)
    os.environ[UNSHARED_STORE_ENV] = "1"
    try:
        run(parse_args(torchrun_args(opts, run_dir, cfg.name)))
    except ChildFailedError as exc:
        raise WorkerFailed(failure_summary(exc, run_dir)) from None
    except (SignalException, KeyboardInterrupt):
        # The agent has already stopped the workers; checkpoints are written atomically.
        raise RunInterrupted(run_dir) from None
    except RendezvousConnectionError as exc:
        # Multi-node: the agent that hosts torchrun's c10d store exits as soon as its own
        # workers are done, and another node's agent, still polling the store while its
        # workers exit, loses the connection (pytorch/pytorch#69197; seen here in the
        # two-node test). If the run got to its end, that is not a failure.
        if not run_completed(cfg, run_dir):
            lost = f"lost torchrun's rendezvous store before the run ended ({exc})"
            raise WorkerFailed(f"{lost}; logs in {run_dir / LOG_DIR}") from None
        logging.getLogger(__name__).warning("the rendezvous store closed after the run ended; the run is complete")
    except RendezvousError as exc:  # e.g. a peer node never joined within the join timeout
        endpoint = opts.rdzv_endpoint or "the local rendezvous"
        raise WorkerFailed(f"rendezvous at {endpoint} failed: {type(exc).__name__}: {exc}") from None
    finally:
        agent_log.setLevel(level)
        run_log.removeFilter(drop_banner)
        restore_env(UNSHARED_STORE_ENV, shared_store)
    return run_dir


def drop_banner(record: logging.LogRecord) -> bool:
    return "OMP_NUM_THREADS" not in record.getMessage()


def restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def run_completed(cfg: Config, run_dir: Path) -> bool:
    """Whether the run's metrics reached its last round (epoch) or its target accuracy.
    Metrics are written after the checkpoint, so a complete log means a final checkpoint."""
    if not (run_dir / "metrics.jsonl").is_file():
        return False
    rows = read_metrics(run_dir)
    if not rows:
        return False
    key, total = ("epoch", cfg.ddp.epochs) if cfg.mode == "ddp" else ("round", cfg.federated.rounds)
    target, accuracy = cfg.eval.target_accuracy, rows[-1].get("test_accuracy")
    return rows[-1].get(key) == total or (target is not None and accuracy is not None and accuracy >= target)


def node_run_dir(cfg: Config, opts: LaunchOptions, resume: Path | None) -> Path:
    """The run directory every rank reads its config from.

    Node 0 creates it (fresh, never overwritten); the other nodes of a multi-node launch
    wait until node 0's resolved config is there and check it equals their own.
    """
    if resume is not None:
        return resume
    if opts.node_rank == 0:
        return create_run_dir(cfg)
    return await_run_dir(cfg, timeout_s=cfg.ddp.timeout_s)


def await_run_dir(cfg: Config, timeout_s: float, poll_s: float = 0.2) -> Path:
    run_dir = Path(cfg.output.run_dir or "")
    config_file = run_dir / CONFIG_FILE
    deadline = time.monotonic() + timeout_s
    while not config_file.is_file():
        if time.monotonic() > deadline:
            raise FltoolError(
                f"output.run_dir: {config_file} did not appear within {timeout_s} s; start node 0 "
                "(--node-rank 0) too, with the directory on a filesystem every node shares"
            )
        time.sleep(poll_s)
    if config_file.read_text() != dump_config(cfg):
        raise FltoolError(
            f"{config_file}: node 0 resolved a different config than this node; "
            "launch every node with the same config file and overrides"
        )
    # Nothing of a fresh run can be written before this node joins the rendezvous, so
    # these are an earlier run's: node 0 refuses that directory, and this node would
    # otherwise wait at the rendezvous for a node 0 that never comes.
    trained = [p for p in (last_checkpoint(run_dir), run_dir / "metrics.jsonl") if p.is_file()]
    if trained:
        raise FltoolError(
            f"output.run_dir: {run_dir} holds an earlier run ({trained[0].relative_to(run_dir)}); "
            f"continue it with --resume {run_dir} on every node, or give every node a new output.run_dir"
        )
    return run_dir


def failure_summary(exc: Exception, run_dir: Path) -> str:
    rank, failure = exc.get_first_failure()  # type: ignore[attr-defined]
    message = failure.message
    if isinstance(message, dict):  # @record's error file: {"message": "Type: text", ...}
        message = message.get("message", "")
    if not os.path.isfile(str(failure.error_file)) and failure.exitcode > 0:
        message = "exited without a Python exception (killed, os._exit or a crash)"
    message = (str(message).strip().splitlines() or ["(no message)"])[-1]
    return f"rank {rank} failed (exit code {failure.exitcode}): {message}; logs in {run_dir / LOG_DIR}"
