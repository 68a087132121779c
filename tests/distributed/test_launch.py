"""`fltool launch`: torchrun workers on CPU with gloo, checked against single-process runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from ddp_helpers import REPO, assert_same_model, cli_env, ddp_config, fltool_cmd, load_model, run_cli, write_config

from fltool.config import config_from_dict, load_config
from fltool.distributed.launch import LaunchOptions, WorkerFailed, check_devices, launch
from fltool.run.checkpoint import load_checkpoint
from fltool.run.metrics import read_metrics
from fltool.run.rundir import create_run_dir
from fltool.run.runner import start_run
from fltool.errors import FltoolError
from fltool.ui import PlainReporter

pytestmark = pytest.mark.timeout(180)  # on top of the 30 s process-group timeouts


def _single_process(run_dir: Path, raw: dict) -> Path:
    raw = {**raw, "output": {"run_dir": str(run_dir)}}
    return start_run(config_from_dict(raw), PlainReporter("epoch" if raw["mode"] == "ddp" else "round")).run_dir


def _launch(tmp: Path, name: str, raw: dict, *flags: str, **env: str | None) -> tuple[subprocess.CompletedProcess, Path]:
    cfg = write_config(tmp / f"{name}.yaml", raw)
    run_dir = tmp / name
    done = run_cli("launch", *flags, str(cfg), f"output.run_dir={run_dir}", cwd=tmp, **env)
    return done, run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, per-rank batch 32: the same global batch as 2 ranks x 16."""
    return _single_process(tmp_path_factory.mktemp("ref") / "run", ddp_config(batch_size=32))


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    # 2 ranks x 8 x 2 accumulated micro-batches (DDP's no_sync path): a global batch of 32.
    raw = ddp_config(batch_size=8, grad_accum_steps=2)
    return _launch(tmp_path_factory.mktemp("launch"), "run", raw, "--nproc", "2")


def test_two_ranks_equal_one_process_with_the_same_global_batch(reference, launched):
    done, run_dir = launched
    assert done.returncode == 0, done.stderr
    assert_same_model(load_model(run_dir), load_model(reference))
    two, one = read_metrics(run_dir), read_metrics(reference)
    assert [r["epoch"] for r in two] == [1, 2, 3]
    assert [r["train_loss"] for r in two] == pytest.approx([r["train_loss"] for r in one], rel=1e-4)


def test_compiled_ddp_with_accumulation_equals_one_process(reference, tmp_path):
    """`ddp.compile: true` with no_sync micro-batches on 2 gloo ranks: inductor really
    compiles the model (its cache fills; compiling the DDP wrapper left it empty, the
    model running eagerly), and the result is the eager single-process reference's."""
    raw = ddp_config(batch_size=8, grad_accum_steps=2, compile=True)
    inductor = tmp_path / "inductor"
    done, run_dir = _launch(tmp_path, "compiled", raw, "--nproc", "2", TORCHINDUCTOR_CACHE_DIR=str(inductor))
    assert done.returncode == 0, done.stderr
    assert any(p.is_file() for p in inductor.rglob("*"))
    assert_same_model(load_model(run_dir), load_model(reference))


def test_launch_writes_run_dir_logs_and_an_evaluable_plain_checkpoint(launched, tmp_path):
    done, run_dir = launched
    assert done.returncode == 0, done.stderr
    assert load_config(run_dir / "config.yaml").ddp.batch_size == 8  # the resolved config every rank read
    logs = sorted(p.parts[-2:] for p in (run_dir / "torchrun").rglob("stdout.log"))
    assert logs == [("0", "stdout.log"), ("1", "stdout.log")]
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["model"])
    assert state["round"] == 3 and "state" in state["extra"]["optimizer"]

    ev = run_cli("eval", str(run_dir / "checkpoints" / "last.pt"), "--json", "--device", "cpu", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(read_metrics(run_dir)[-1]["test_accuracy"])


def test_killed_worker_is_restarted_and_resumes_from_last_checkpoint(reference, tmp_path):
    done, run_dir = _launch(
        tmp_path, "restart", ddp_config(batch_size=16), "--nproc", "2", "--max-restarts", "1", FLTOOL_FAULT_AT_EPOCH="2"
    )
    assert done.returncode == 0, done.stderr
    assert (run_dir / ".fault_injected").read_text().startswith("exit at epoch 2 on rank 1")
    assert sorted(p.name for p in (run_dir / "torchrun").glob("*/attempt_*")) == ["attempt_0", "attempt_1"]
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert_same_model(load_model(run_dir), load_model(reference))


def test_a_hung_peer_fails_the_run_after_ddp_timeout_s(tmp_path):
    """Rank 1 hangs at epoch 2; rank 0 gives up at its next collective after 3 s, and
    torchrun stops the hung one."""
    done, run_dir = _launch(
        tmp_path, "hang", ddp_config(timeout_s=3), "--nproc", "2", FLTOOL_FAULT_AT_EPOCH="2", FLTOOL_FAULT_KIND="hang"
    )
    assert done.returncode == 1
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: rank ") and "Timed out waiting 3000ms" in line, done.stderr


def test_worker_exception_fails_launch_with_rank_and_message(tmp_path):
    done, run_dir = _launch(
        tmp_path, "boom", ddp_config(), "--nproc", "2", FLTOOL_FAULT_AT_EPOCH="2", FLTOOL_FAULT_KIND="raise"
    )
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert "rank 1 failed" in errors[0] and "RuntimeError: injected fault at epoch 2 on rank 1" in errors[0]
    assert "Traceback" not in done.stderr.split(errors[0])[1]  # nothing after the summary


def test_bad_config_starts_no_worker(tmp_path):
    cfg = write_config(tmp_path / "bad.yaml", {**ddp_config(), "output": {"dir": str(tmp_path / "runs")}})
    done = run_cli("launch", "--nproc", "2", str(cfg), "ddp.lr=-1", "ddp.optimizer=lion", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: command line: ddp.lr: must be a finite number > 0, got -1.0",
        "error: command line: ddp.optimizer: must be one of sgd, momentum, adamw; got 'lion'",
    ]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "flags,line",
    [
        (["--rdzv-endpoint", "garbage"], "launch: --rdzv-endpoint must be HOST:PORT with a port in 1..65535, got 'garbage'"),
        (["--rdzv-endpoint", "host:99999"], "got 'host:99999'"),
        (["--rdzv-endpoint", "host:-1"], "got 'host:-1'"),
        (["--rdzv-endpoint", "::::"], "got '::::'"),
        (["--rdzv-endpoint", " "], "got ' '"),
        (["--rdzv-endpoint", "h:1:2"], "got 'h:1:2'"),
        (["--rdzv-endpoint", "[::1"], "got '[::1'"),
        (["--nproc", "99999999999999999999999"], "launch: --nproc must be <= 1024 (processes on this node)"),
    ],
)
def test_bad_launch_options_are_refused_even_in_a_dry_run(flags: list[str], line: str, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", {**ddp_config(), "output": {"dir": str(tmp_path / "runs")}})
    done = run_cli("launch", *flags, "--dry-run", str(cfg), cwd=tmp_path)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert line in done.stderr, done.stderr


def test_a_dry_run_refuses_a_run_directory_the_launch_would_refuse(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", ddp_config())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "afile").write_text("")
    for override, line in [
        (f"output.run_dir={tmp_path / 'full'}", f"output.run_dir: {tmp_path / 'full'} already exists and is not empty"),
        (f"output.dir={tmp_path / 'afile'}", f"output.dir: cannot create the run directory: {tmp_path / 'afile'}: Not a directory"),
    ]:
        done = run_cli("launch", "--nproc", "1", "--dry-run", str(cfg), override, cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.startswith(f"error: {line}") and len(done.stderr.splitlines()) == 1


def test_an_unresolvable_rendezvous_host_fails_at_once(tmp_path):
    """torchrun would retry the name for its whole join timeout, printing a warning a second."""
    cfg = write_config(tmp_path / "c.yaml", ddp_config())
    run_dir = tmp_path / "run"
    done = run_cli("launch", "--nproc", "1", "--rdzv-endpoint", "no-such-host.invalid:29400", str(cfg),
                   f"output.run_dir={run_dir}", cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert "launch: --rdzv-endpoint: cannot resolve host 'no-such-host.invalid'" in done.stderr
    assert not run_dir.exists()


def test_launch_resume_refuses_a_changed_experiment_before_starting_workers(tmp_path):
    run_dir = _single_process(tmp_path / "run", {**ddp_config(), "ddp": {**ddp_config()["ddp"], "epochs": 1}})
    before = (run_dir / "config.yaml").read_text()
    done = run_cli("launch", "--nproc", "2", "--resume", str(run_dir), "ddp.lr=0.5", "ddp.epochs=2", cwd=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: command line: ddp.lr: a resumed run cannot change it (the run has 0.05, got 0.5)")
    assert (run_dir / "config.yaml").read_text() == before
    assert not (run_dir / "torchrun").exists()


def test_a_model_too_big_for_the_inputs_starts_no_worker(tmp_path):
    raw = {**ddp_config(), "model": {"name": "cnn_cifar"}, "output": {"dir": str(tmp_path / "runs")}}
    raw["data"] = {**raw["data"], "synthetic": {**raw["data"]["synthetic"], "shape": [1, 4, 4]}}
    done = run_cli("launch", "--nproc", "2", str(write_config(tmp_path / "c.yaml", raw)), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: model.name: cnn_cifar needs inputs of at least 6x6; data.synthetic.shape is [1, 4, 4]"]
    assert not (tmp_path / "runs").exists()


def test_two_concurrent_launches_do_not_collide(tmp_path):
    procs = []
    for name in ("a", "b"):
        cfg = write_config(tmp_path / f"{name}.yaml", ddp_config(epochs=1))
        cmd = fltool_cmd("launch", "--nproc", "2", str(cfg), f"output.run_dir={tmp_path / name}")
        procs.append(
            subprocess.Popen(cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = [p.communicate(timeout=180) for p in procs]
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err
    assert_same_model(load_model(tmp_path / "a"), load_model(tmp_path / "b"), atol=0)


def _federated_config() -> dict:
    return {
        "name": "fed",
        "mode": "federated",
        "seed": 1,
        "device": "cpu",
        "data": {
            "dataset": "synthetic",
            "synthetic": {"train_size": 400, "test_size": 100, "shape": [1, 8, 8], "num_classes": 4},
        },
        "model": {"name": "mlp"},
        "federated": {"num_clients": 10, "fraction": 0.5, "rounds": 3, "batch_size": 10, "lr": 0.1},
        "ddp": {"timeout_s": 30},
    }


def test_federated_launch_equals_single_process_train(tmp_path):
    raw = _federated_config()
    ref = _single_process(tmp_path / "single", raw)
    overrides = [f"{k}={v}" for k, v in {
        "data.dataset": "synthetic", "data.synthetic.train_size": 400, "data.synthetic.test_size": 100,
        "data.synthetic.shape": "[1,8,8]", "data.synthetic.num_classes": 4, "device": "cpu", "seed": 1,
        "federated.num_clients": 10, "federated.fraction": 0.5, "federated.rounds": 3, "ddp.timeout_s": 30,
    }.items()]
    # The shipped fedavg config, shrunk: it becomes exactly `raw` above.
    fed_yaml = REPO / "configs" / "fedavg_mnist.yaml"
    assert load_config(fed_yaml, overrides).federated == config_from_dict(raw).federated
    two_dir = tmp_path / "two"
    done = run_cli("launch", "--nproc", "2", str(fed_yaml), *overrides, f"output.run_dir={two_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_same_model(load_model(tmp_path / "two"), load_model(ref))
    two, one = read_metrics(tmp_path / "two"), read_metrics(ref)
    assert [r["client_ids"] for r in two] == [r["client_ids"] for r in one]
    assert [r["test_accuracy"] for r in two] == pytest.approx([r["test_accuracy"] for r in one])


def test_federated_launch_with_fewer_sampled_clients_than_ranks(tmp_path):
    # one client a round on two ranks: rank 1 trains nothing and still joins the all-reduce
    raw = _federated_config()
    raw["federated"] = {**raw["federated"], "num_clients": 4, "fraction": 0.25, "rounds": 2, "engine": "vectorized"}
    ref = _single_process(tmp_path / "single", raw)
    done, two = _launch(tmp_path, "two", raw, "--nproc", "2")
    assert done.returncode == 0, done.stderr
    assert [r["clients"] for r in read_metrics(two)] == [1, 1]
    assert_same_model(load_model(two), load_model(ref))


@pytest.mark.parametrize(
    "sections",
    [
        # SCAFFOLD: every rank needs the c_i of the clients it trains, so the new rows
        # are all-gathered each round; its c update is a sum over the whole cohort
        {"algorithm": {"name": "scaffold"}},
        # FedAdam: the server step is taken once from the all-reduced mean, on every rank
        {"server_optimizer": {"name": "adam", "lr": 0.05}},
        # the median needs every update at once: all-gathered under launch
        {"aggregator": {"name": "median"}},
        # Krum picks one update of the all-gathered rows by distances between them; f = 1
        # needs more than 3 updates, so a cohort of 5, split over the two ranks
        {"aggregator": {"name": "krum", "f": 1}, "federated": {"fraction": 0.5}},
    ],
    ids=["scaffold", "fedadam", "median", "krum"],
)
@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_federated_algorithms_under_launch_equal_one_process(sections: dict, engine: str, tmp_path):
    raw = {**_federated_config(), **sections}
    fed = {**_federated_config()["federated"], "engine": engine, "fraction": 0.3, "rounds": 3}
    raw["federated"] = {**fed, **sections.get("federated", {})}
    ref = _single_process(tmp_path / "single", raw)
    done, two = _launch(tmp_path, "two", raw, "--nproc", "2")
    assert done.returncode == 0, done.stderr
    assert_same_model(load_model(two), load_model(ref))
    one_state = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)["extra"]["algorithm"]
    two_state = torch.load(two / "checkpoints" / "last.pt", weights_only=True)["extra"]["algorithm"]
    for part in ("server", "clients", "optimizer"):
        assert one_state[part].keys() == two_state[part].keys()
        for name in one_state[part]:
            for a, b in zip(one_state[part][name], two_state[part][name], strict=True):
                assert torch.allclose(a.double(), b.double(), atol=1e-5, rtol=1e-4), f"{part}.{name}"


def test_dropouts_stragglers_and_alie_under_launch_equal_one_process(tmp_path):
    """Every rank draws the same round plan (dropouts, stragglers, attackers) from the
    seed; ALIE's cohort statistics are all-reduced before the attackers upload."""
    raw = {
        **_federated_config(),
        "clients": {"dropout": 0.3, "min_returned": 3, "stragglers": 0.5, "straggler_policy": "partial", "straggler_work": "steps"},
        "attack": {"name": "alie", "fraction": 0.3, "per": "round", "z": 1.0},
        "aggregator": {"name": "median"},
    }
    raw["federated"] = {**raw["federated"], "engine": "vectorized", "fraction": 0.6, "rounds": 3}
    ref = _single_process(tmp_path / "single", raw)
    done, two = _launch(tmp_path, "two", raw, "--nproc", "2")
    assert done.returncode == 0, done.stderr
    assert_same_model(load_model(two), load_model(ref))
    keys = ("client_ids", "returned", "dropped_ids", "straggler_ids", "malicious_ids")
    one_rows, two_rows = read_metrics(ref), read_metrics(two)
    assert [[r[k] for k in keys] for r in two_rows] == [[r[k] for k in keys] for r in one_rows]
    assert any(r["malicious_ids"] for r in one_rows) and any(r["dropped_ids"] for r in one_rows)


@pytest.mark.parametrize("noise_source", ["seeded", "os"])
def test_dp_under_launch_equals_one_process(tmp_path, noise_source: str):
    """Central DP with adaptive clipping: every rank clips its clients, the clipped sum
    and the unclipped count are all-reduced, and the same noise goes on it everywhere
    (seeded: each rank draws it alike; OS: rank 0 draws, the others add zeros), so the
    ranks' models stay equal: seeded, also to the one-process run's."""
    raw = {
        **_federated_config(),
        "dp": {"mode": "central", "clip_norm": 0.5, "noise_multiplier": 0.5, "adaptive_clipping": True, "count_noise": 1.0,
               "noise_source": noise_source},
    }
    raw["federated"] = {**raw["federated"], "engine": "vectorized", "fraction": 0.5, "sampling": "poisson", "rounds": 3}
    # without OMP_NUM_THREADS (the test suite sets it), torchrun prints its banner about it
    done, two = _launch(tmp_path, "two", raw, "--nproc", "2", OMP_NUM_THREADS=None)
    assert done.returncode == 0, done.stderr
    assert "OMP_NUM_THREADS" not in done.stdout + done.stderr  # torchrun's banner, dropped
    rows = read_metrics(two)
    assert len(rows) == 3 and rows[-1]["epsilon"] > rows[0]["epsilon"] > 0
    if noise_source == "seeded":
        ref = _single_process(tmp_path / "single", raw)
        assert_same_model(load_model(two), load_model(ref))
        clip = lambda run: [r["dp_clip_norm"] for r in read_metrics(run)]  # noqa: E731
        assert clip(two) == pytest.approx(clip(ref), rel=1e-5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("other_node", ["fails", "stalls"])
def test_two_nodes_share_one_run_dir_restart_together_and_equal_one_process(reference, tmp_path, other_node):
    """Two `launch --nnodes 2` on one host stand in for two nodes. Node 1 starts first
    and waits for node 0 to create the run directory; a worker killed at epoch 2 makes
    both nodes' agents restart, and the run resumes from the shared checkpoint.

    The other node's agent restarts either because its worker fails too, or (`stalls`:
    its worker is busy) for the membership change, which leaves its restart count at 0
    while the failed node's is 1; the workers must still find each other."""
    cfg = write_config(tmp_path / "ddp.yaml", ddp_config(batch_size=16))
    run_dir = tmp_path / "shared_run"
    rdzv = f"127.0.0.1:{_free_port()}"
    procs = []
    for node in (1, 0):
        cmd = fltool_cmd(
            "launch", "--nproc", "1", "--nnodes", "2", "--node-rank", str(node), "--rdzv-endpoint", rdzv,
            "--max-restarts", "1", str(cfg), f"output.run_dir={run_dir}",
        )
        env = cli_env(FLTOOL_FAULT_AT_EPOCH="2", **({"FLTOOL_FAULT_STALL_S": "60"} if other_node == "stalls" else {}))
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(1.5 if node == 1 else 0)
    errs = [proc.communicate(timeout=180)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(f"node {n}: {e}" for n, e in zip((1, 0), errs))
    assert (run_dir / ".fault_injected").read_text().startswith("exit at epoch 2 on rank 1")
    assert (run_dir / ".fault_stalled").exists() == (other_node == "stalls")
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert_same_model(load_model(run_dir), load_model(reference))


def test_multi_node_launch_needs_a_shared_run_dir_and_equal_configs(tmp_path):
    cfg = write_config(tmp_path / "fed.yaml", {**_federated_config(), "output": {"dir": str(tmp_path / "runs")}})
    node = ["launch", "--nproc", "1", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "127.0.0.1:1"]
    no_dir = run_cli(*node, str(cfg), cwd=tmp_path)
    assert no_dir.returncode == 2 and "--nnodes > 1 needs output.run_dir=PATH" in no_dir.stderr
    assert len(no_dir.stderr.splitlines()) == 1

    run_dir = tmp_path / "shared"
    late = run_cli(*node, str(cfg), f"output.run_dir={run_dir}", "ddp.timeout_s=1", cwd=tmp_path)
    assert late.returncode == 2 and "did not appear within 1 s; start node 0" in late.stderr

    node0 = load_config(cfg, [f"output.run_dir={run_dir}", "ddp.timeout_s=1"])
    create_run_dir(node0)  # what node 0 writes; this node was given another lr
    differs = run_cli(*node, str(cfg), f"output.run_dir={run_dir}", "ddp.timeout_s=1", "federated.lr=0.5", cwd=tmp_path)
    assert differs.returncode == 2 and "node 0 resolved a different config" in differs.stderr
    assert not (run_dir / "torchrun").exists()  # no worker started

    (run_dir / "metrics.jsonl").write_text('{"round": 1}\n')  # an earlier run's, at the same path
    stale = run_cli(*node, str(cfg), f"output.run_dir={run_dir}", "ddp.timeout_s=1", cwd=tmp_path)
    assert stale.returncode == 2 and len(stale.stderr.splitlines()) == 1
    assert f"{run_dir} holds an earlier run (metrics.jsonl); continue it with --resume" in stale.stderr
    assert not (run_dir / "torchrun").exists()


def test_dry_run_prints_the_torchrun_command_and_creates_nothing(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", {**ddp_config(), "output": {"dir": str(tmp_path / "runs")}})
    single = run_cli("launch", "--nproc", "2", "--dry-run", str(cfg), cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    # the variable launch sets (a fresh worker store per restart; see Multi-node in the README)
    assert single.stdout.startswith("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nproc-per-node=2 --standalone --max-restarts=0 ")
    assert "--module fltool.distributed.worker" in single.stdout
    multi = run_cli(
        "launch", "--nproc", "2", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "head:29400",
        "--max-restarts", "3", "--dry-run", str(cfg), "output.run_dir=/shared/runs/exp1", cwd=tmp_path,
    )
    assert multi.returncode == 0, multi.stderr
    assert multi.stdout.rstrip().endswith("--module fltool.distributed.worker /shared/runs/exp1")
    flags = ("--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=head:29400", "--max-restarts=3")
    for flag in flags:
        assert flag in multi.stdout
    assert "--node-rank" not in multi.stdout  # c10d assigns node ranks itself
    assert not (tmp_path / "runs").exists()


def test_launch_inside_torchrun_is_refused(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", ddp_config())
    done = run_cli("launch", "--nproc", "2", str(cfg), cwd=tmp_path, TORCHELASTIC_RUN_ID="outer")
    assert done.returncode == 2
    assert "already running under torchrun (TORCHELASTIC_RUN_ID set)" in done.stderr


def test_gpu_backends_need_a_gpu_per_process():
    nccl = config_from_dict({**ddp_config(), "device": "auto", "ddp": {"backend": "nccl"}})
    with pytest.raises(FltoolError, match=r"--nproc 4 exceeds the 2 visible GPU\(s\) \(one per process with nccl"):
        check_devices(nccl, 4, gpu_count=2)
    with pytest.raises(FltoolError, match="ddp.backend: nccl needs CUDA but no GPU is visible"):
        check_devices(nccl, 1, gpu_count=0)
    check_devices(nccl, 2, gpu_count=2)  # one per GPU is fine
    gloo_cuda = config_from_dict({**ddp_config(), "device": "cuda"})
    with pytest.raises(FltoolError, match=r"--nproc 3 exceeds the 2 visible GPU\(s\) \(one per process with gloo"):
        check_devices(gloo_cuda, 3, gpu_count=2)
    with pytest.raises(FltoolError, match="nccl cannot run with device: cpu"):
        check_devices(config_from_dict({**ddp_config(backend="nccl")}), 1, gpu_count=8)
    check_devices(config_from_dict(ddp_config()), 8, gpu_count=0)  # gloo on cpu needs none
    # gloo with device auto puts each rank on its own GPU when there are GPUs
    gloo_auto = config_from_dict({**ddp_config(), "device": "auto"})
    with pytest.raises(FltoolError, match=r"--nproc 2 exceeds the 1 visible GPU\(s\) \(one per process with gloo"):
        check_devices(gloo_auto, 2, gpu_count=1)
    check_devices(gloo_auto, 8, gpu_count=0)  # ... and runs on the CPU when there are none


def test_nccl_launch_with_too_many_processes_fails_before_starting(tmp_path):
    raw = {**ddp_config(backend="nccl"), "device": "auto", "output": {"dir": str(tmp_path / "runs")}}
    done = run_cli("launch", "--nproc", "512", str(write_config(tmp_path / "c.yaml", raw)), cwd=tmp_path)
    assert done.returncode == 2
    # No GPU here: "needs CUDA"; on a GPU machine: "--nproc 512 exceeds"; never a started worker.
    assert done.stderr.startswith("error: ") and "nccl" in done.stderr and len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_stops_cleanly_and_launch_resume_continues(tmp_path):
    cfg = write_config(tmp_path / "long.yaml", ddp_config(epochs=400))
    run_dir = tmp_path / "long"
    cmd = fltool_cmd("launch", "--nproc", "2", str(cfg), f"output.run_dir={run_dir}")
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"--resume {run_dir}" in err.splitlines()[-1]
    stopped_at = load_checkpoint(run_dir / "checkpoints" / "last.pt").round
    assert 1 <= stopped_at < 400

    # trained on 2 processes: resuming on 1 would halve the global batch, so it is refused
    ckpt = run_dir / "checkpoints" / "last.pt"
    for cmd in (["launch", "--nproc", "1", "--resume", str(run_dir)], ["train", "--resume", str(run_dir)]):
        refused = run_cli(*cmd, cwd=tmp_path)
        assert refused.returncode == 2
        assert refused.stderr.splitlines()[-1].startswith(f"error: {ckpt}: this DDP run trained on 2 process(es) and ")
    done = run_cli("launch", "--nproc", "2", "--resume", str(run_dir), f"ddp.epochs={stopped_at + 2}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == list(range(1, stopped_at + 3))
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine follows the new ddp.epochs


def test_a_lost_rendezvous_store_after_the_run_ended_is_not_a_failure(tmp_path, monkeypatch):
    """torchrun's multi-node shutdown race (the store's host exits first) is judged by
    the shared run directory: a complete run succeeds, an incomplete one fails in one line."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

    def lose_store(args):
        raise RendezvousConnectionError("The connection to the C10d store has failed.")

    monkeypatch.setattr(torchrun, "run", lose_store)
    cfg = config_from_dict({**ddp_config(epochs=3), "output": {"dir": str(tmp_path / "runs")}})
    run_dir = create_run_dir(cfg)
    opts = LaunchOptions(nproc=1, nnodes=2, node_rank=1, rdzv_endpoint="127.0.0.1:1", max_restarts=0)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"epoch": e, "test_accuracy": 0.5}) + "\n" for e in (1, 2)))
    with pytest.raises(WorkerFailed, match="lost torchrun's rendezvous store before the run ended"):
        launch(cfg, opts, resume=run_dir)
    metrics.write_text(metrics.read_text() + json.dumps({"epoch": 3, "test_accuracy": 0.6}) + "\n")
    assert launch(cfg, opts, resume=run_dir) == run_dir


def test_real_mnist_launch_with_a_fresh_cache(tmp_path):
    """Both ranks share one empty cache: launch fills it once, before the workers start."""
    data = Path(os.environ.get("FLTOOL_DATA") or REPO.parent / "shared" / "data")
    archive = data / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    assert archive.is_file(), f"MNIST is missing: expected {archive} (set FLTOOL_DATA); data tests must not skip"
    run_dir = tmp_path / "mnist"
    done = run_cli(
        "launch", "--nproc", "2", str(REPO / "configs" / "ddp_mnist.yaml"), "model.name=mlp", "ddp.epochs=1",
        "device=cpu", "ddp.backend=gloo", f"output.run_dir={run_dir}", cwd=tmp_path,
        FLTOOL_DATA=str(data), FLTOOL_CACHE=str(tmp_path / "cache"),
    )
    assert done.returncode == 0, done.stderr
    (row,) = read_metrics(run_dir)
    assert row["steps"] == 469  # ceil(60000 / (64 x 2))
    assert row["test_accuracy"] > 0.9

