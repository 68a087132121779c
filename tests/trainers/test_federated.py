from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from fltool.run.checkpoint import load_checkpoint
from fltool.trainers.federated import train_federated
from fltool.run.metrics import read_metrics
from fltool.run.rundir import best_checkpoint, create_run_dir, last_checkpoint
from fltool.run.runner import resume_run
from fltool.ui import PlainReporter

TIMING = {"wall_s", "elapsed_s"}


def strip_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def run(cfg) -> Path:
    run_dir = create_run_dir(cfg)
    train_federated(cfg, run_dir)
    return run_dir


def test_same_seed_gives_bitwise_identical_metrics_and_model(make_config):
    cfg = make_config(data={"partition": "dirichlet"})
    a, b = run(cfg), run(cfg)
    assert a != b  # runs are never overwritten
    assert strip_timing(read_metrics(a)) == strip_timing(read_metrics(b))
    ma, mb = (load_checkpoint(last_checkpoint(d)).model for d in (a, b))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    other = run(make_config(seed=1, data={"partition": "dirichlet"}))
    assert strip_timing(read_metrics(other)) != strip_timing(read_metrics(a))


def test_run_directory_holds_config_metrics_and_checkpoints(make_config):
    cfg = make_config()
    run_dir = run(cfg)
    assert (run_dir / "config.yaml").is_file()
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["clients"] == 4 and len(row["client_ids"]) == 4
        assert row["bytes_up"] == row["bytes_down"] == 4 * 4 * sum(
            t.numel() for t in load_checkpoint(last_checkpoint(run_dir)).model.values()
        )
        assert 0 <= row["test_accuracy"] <= 1 and row["train_loss"] > 0 and row["test_loss"] > 0
    with open(run_dir / "metrics.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in csv_rows] == [1, 2, 3]
    assert float(csv_rows[-1]["test_accuracy"]) == rows[-1]["test_accuracy"]
    assert not list(run_dir.rglob("*.tmp")), "no temp files left behind"


def test_checkpoint_is_plain_data_loadable_with_weights_only(make_config):
    run_dir = run(make_config())
    for path in (last_checkpoint(run_dir), best_checkpoint(run_dir)):
        state = torch.load(path, weights_only=True)
        assert state["format"] == "fltool.checkpoint" and state["round"] >= 1
        assert set(state) >= {"model", "config", "round", "metrics", "best_accuracy"}
    last = torch.load(last_checkpoint(run_dir), weights_only=True)
    assert last["round"] == 3 and len(last["metrics"]) == 3
    best = torch.load(best_checkpoint(run_dir), weights_only=True)
    assert best["best_accuracy"] == max(r["test_accuracy"] for r in last["metrics"])
    assert "algorithm" in last["extra"] and best["extra"] == {}  # best.pt: the model to evaluate, no training state


def interrupted_run(cfg, after_round: int) -> Path:
    """A run stopped by Ctrl-C once `after_round` is logged."""

    def interrupt(row: dict) -> None:
        if row["round"] == after_round:
            raise KeyboardInterrupt

    run_dir = create_run_dir(cfg)
    with pytest.raises(KeyboardInterrupt):
        train_federated(cfg, run_dir, on_round=interrupt)
    return run_dir


def test_resume_after_interrupt_equals_uninterrupted_run(make_config):
    cfg = make_config(federated={"rounds": 5}, data={"partition": "dirichlet"})
    full = run(cfg)
    broken = interrupted_run(cfg, after_round=2)
    assert load_checkpoint(last_checkpoint(broken)).round == 2  # last good checkpoint loads

    summary = resume_run(broken, [], PlainReporter())
    assert summary.rounds_completed == 5
    a, b = (load_checkpoint(last_checkpoint(d)).model for d in (full, broken))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert strip_timing(read_metrics(full)) == strip_timing(read_metrics(broken))


@pytest.mark.parametrize("when", ["before", "after"])
def test_interrupt_at_a_checkpoint_write_leaves_metrics_not_ahead_of_it(make_config, monkeypatch, interrupt_checkpoint_write, when):
    """Ctrl-C can land just before or just after a round's checkpoint is written. The
    metrics on disk may then lag the last checkpoint (which carries its own rows), never
    lead it, and resume repairs them."""
    import fltool.trainers.federated as federated

    cfg = make_config(federated={"rounds": 4})
    full = run(cfg)
    interrupt_checkpoint_write(federated, 2, when)
    broken = create_run_dir(cfg)
    with pytest.raises(KeyboardInterrupt):
        train_federated(cfg, broken)
    monkeypatch.undo()
    assert load_checkpoint(last_checkpoint(broken)).round == (2 if when == "after" else 1)
    assert [r["round"] for r in read_metrics(broken)] == [1]

    resume_run(broken, [], PlainReporter())
    assert strip_timing(read_metrics(full)) == strip_timing(read_metrics(broken))


def test_target_accuracy_stops_and_reports_the_round(make_config, capsys):
    cfg = make_config(federated={"rounds": 30}, eval={"target_accuracy": 0.5})
    run_dir = create_run_dir(cfg)
    summary = train_federated(cfg, run_dir)
    rows = read_metrics(run_dir)
    assert summary.target_round == rows[-1]["round"] < 30
    assert rows[-1]["test_accuracy"] >= 0.5
    assert all(r["test_accuracy"] < 0.5 for r in rows[:-1])
    assert load_checkpoint(last_checkpoint(run_dir)).round == summary.target_round
    # resumed, a run that stopped at its target trains no further and still reports it
    capsys.readouterr()
    again = resume_run(run_dir, [], PlainReporter("round"))
    assert "(nothing left to train)" in capsys.readouterr().out  # it said "rounds 4..30"
    assert again.target_round == summary.target_round and again.rounds_completed == summary.target_round
    assert read_metrics(run_dir) == rows
    # a higher target on resume trains on, and reports the round that met the new one
    higher = resume_run(run_dir, ["eval.target_accuracy=0.7"], PlainReporter("round"))
    assert higher.target_round is not None and higher.target_round > summary.target_round
    assert [r["test_accuracy"] >= 0.7 for r in read_metrics(run_dir)].index(True) + 1 == higher.target_round


def test_eval_every_skips_evaluation_between(make_config):
    run_dir = run(make_config(federated={"rounds": 5}, eval={"every": 2}))
    evaluated = [r["round"] for r in read_metrics(run_dir) if r["test_accuracy"] is not None]
    assert evaluated == [2, 4, 5]  # the last round is always evaluated


def test_checkpoint_every_writes_last_at_its_multiples_and_the_end(make_config):
    """Seen from each round's report (made after that round's checkpoint): last.pt
    advances at rounds 3 and 6 and at the final round 7; best.pt follows improvements."""
    cfg = make_config(federated={"rounds": 7}, eval={"every": 2}, output={"checkpoint_every": 3})
    run_dir = create_run_dir(cfg)
    seen: list[tuple[int, int | None]] = []

    def on_round(row):
        last = last_checkpoint(run_dir)
        seen.append((row["round"], load_checkpoint(last).round if last.is_file() else None))

    train_federated(cfg, run_dir, on_round=on_round)
    assert seen == [(1, None), (2, None), (3, 3), (4, 3), (5, 3), (6, 6), (7, 7)]
    rows = read_metrics(run_dir)
    best = max((r for r in rows if r["test_accuracy"] is not None), key=lambda r: r["test_accuracy"])
    saved_best = load_checkpoint(best_checkpoint(run_dir))
    assert (saved_best.round, saved_best.best_accuracy) == (best["round"], best["test_accuracy"])  # first of ties


@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_server_lr_scales_the_rounds_model_delta(make_config, engine):
    """One round moves the global model by server_optimizer.lr x (average - w0), so
    w(2) - w(1) is twice w(1) - w(0.5), with w0 never needed."""
    model = {}
    for lr in (0.5, 1.0, 2.0):
        cfg = make_config(
            federated={"rounds": 1, "engine": engine}, server_optimizer={"name": "sgd", "lr": lr}, output={"checkpoint_every": 1}
        )
        model[lr] = load_checkpoint(last_checkpoint(run(cfg))).model
    for key in model[1.0]:
        torch.testing.assert_close(model[2.0][key] - model[1.0][key], 2 * (model[1.0][key] - model[0.5][key]))
    assert any(not torch.equal(model[2.0][k], model[1.0][k]) for k in model[1.0])


def test_a_diverged_run_writes_strict_json(make_config):
    run_dir = run(make_config(federated={"rounds": 2, "lr": 1e30}))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines]
    assert [r["round"] for r in strict] == [1]  # it stops there: its model is NaN (tests/trainers/test_divergence.py)
    assert strict[-1]["train_loss"] is None  # NaN, which JSON cannot hold
    assert strict[-1]["test_accuracy"] == 0.0  # NaN logits predict nothing (not class 0)
    with open(run_dir / "metrics.csv", newline="") as f:
        cells = list(csv.DictReader(f))
    assert [row["train_loss"] for row in cells] == ["" if r["train_loss"] is None else str(r["train_loss"]) for r in strict]
    # fltool eval --json of the diverged model is strict JSON too
    from typer.testing import CliRunner

    from fltool.cli import app

    done = CliRunner().invoke(app, ["eval", str(last_checkpoint(run_dir)), "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert report["loss"] is None
    assert report["accuracy"] == 0.0


def test_a_resume_keeps_the_chunk_size_an_out_of_memory_split_set(make_config, monkeypatch):
    """A transient out-of-memory in round 1 halves the vectorized engine's chunks for the
    rest of the run; a resumed run must keep them halved (they set the summation order)."""
    from fltool.engines.vectorized.engine import VectorizedEngine

    real_train_chunk, chunk_sizes = VectorizedEngine.train_chunk, []

    def transient_oom(self, global_params, chunk, job, context):
        chunk_sizes.append(len(chunk))
        if job.round == 1 and len(chunk) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_train_chunk(self, global_params, chunk, job, context)

    monkeypatch.setattr(VectorizedEngine, "train_chunk", transient_oom)
    cfg = make_config(federated={"rounds": 4, "engine": "vectorized"})
    full = run(cfg)
    assert chunk_sizes[0] == 4 and max(chunk_sizes[1:]) == 2
    broken = interrupted_run(cfg, after_round=2)
    extra = load_checkpoint(last_checkpoint(broken)).extra
    assert set(extra) == {"chunk_cap", "algorithm"} and extra["chunk_cap"] == 2
    chunk_sizes.clear()
    resume_run(broken, [], PlainReporter())
    assert chunk_sizes and max(chunk_sizes) == 2
    a, b = (load_checkpoint(last_checkpoint(d)).model for d in (full, broken))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert strip_timing(read_metrics(full)) == strip_timing(read_metrics(broken))


def test_the_checkpoint_carries_the_algorithm_state(make_config):
    """extra['algorithm'] = {server, clients, optimizer}: what a resume needs besides the model."""
    plain = load_checkpoint(last_checkpoint(run(make_config()))).extra["algorithm"]
    assert plain == {"server": {}, "clients": {}, "optimizer": {}}  # FedAvg with plain sgd keeps none

    cfg = make_config(algorithm={"name": "scaffold"}, server_optimizer={"name": "adam"})
    ckpt = load_checkpoint(last_checkpoint(run(cfg)))
    state = ckpt.extra["algorithm"]
    shapes = [tuple(t.shape) for t in ckpt.model.values()]
    assert set(state) == {"server", "clients", "optimizer"}
    assert [tuple(t.shape) for t in state["server"]["c"]] == shapes
    assert [tuple(t.shape) for t in state["clients"]["c"]] == [(8, *s) for s in shapes]  # every client's c_i
    assert set(state["optimizer"]) == {"m", "v", "step"} and state["optimizer"]["step"][0].item() == 3
    trained = {int(k) for row in ckpt.metrics for k in row["client_ids"]}
    untouched = sorted(set(range(8)) - trained)
    assert all(not t[trained_k].eq(0).all() for t in state["clients"]["c"] for trained_k in sorted(trained))
    assert all(t[untouched].eq(0).all() for t in state["clients"]["c"])  # a client never sampled keeps c_i = 0


STATEFUL = {
    "scaffold-sgd-momentum": dict(algorithm={"name": "scaffold", "option": 2}, server_optimizer={"name": "sgd", "momentum": 0.9}),
    "scaffold-option-1-vectorized": dict(algorithm={"name": "scaffold", "option": 1}, federated={"engine": "vectorized"}),
    "fedprox-adam": dict(algorithm={"name": "fedprox", "mu": 0.1}, server_optimizer={"name": "adam", "bias_correction": True}),
    "fednova-yogi-median": dict(algorithm={"name": "fednova"}, server_optimizer={"name": "yogi"}, aggregator={"name": "median"}),
}


@pytest.mark.parametrize("name", list(STATEFUL))
def test_resume_of_a_stateful_algorithm_equals_the_uninterrupted_run(make_config, name):
    """Control variates, server momentum and adaptive moments travel in the checkpoint,
    so an interrupted run resumes bit for bit."""
    sections = STATEFUL[name]
    federated = {"rounds": 4, **sections.get("federated", {})}
    cfg = make_config(**{**sections, "federated": federated}, data={"partition": "dirichlet"})
    full = run(cfg)
    broken = interrupted_run(cfg, after_round=2)
    resume_run(broken, [], PlainReporter())
    a, b = (load_checkpoint(last_checkpoint(d)) for d in (full, broken))
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    sa, sb = a.extra["algorithm"], b.extra["algorithm"]
    for part in ("server", "clients", "optimizer"):
        assert sa[part].keys() == sb[part].keys()
        assert all(torch.equal(x, y) for k in sa[part] for x, y in zip(sa[part][k], sb[part][k], strict=True))
    assert strip_timing(read_metrics(full)) == strip_timing(read_metrics(broken))


def test_a_checkpoint_without_this_algorithms_state_is_refused_on_resume(make_config, tmp_path):
    from fltool.errors import FltoolError

    cfg = make_config(algorithm={"name": "scaffold"}, federated={"rounds": 2})
    broken = interrupted_run(cfg, after_round=1)
    path = last_checkpoint(broken)
    state = torch.load(path, weights_only=True)
    state["extra"]["algorithm"]["server"] = {}
    torch.save(state, path)
    with pytest.raises(FltoolError) as info:
        resume_run(broken, [], PlainReporter())
    assert info.value.lines == [
        f"{path}: checkpoint field 'extra[\"algorithm\"][\"server\"]' does not match this run's algorithm state"
    ]


@pytest.mark.parametrize("on_too_few", ["skip", "resample"])
def test_a_round_aborted_is_drawn_again_or_skipped_and_other_errors_fail(make_config, monkeypatch, on_too_few):
    """The trainer catches `RoundAborted` (from fltool.errors; SecAgg's abort is one)
    without importing the secagg package; any other error still fails the run."""
    import fltool.trainers.federated as federated
    from fltool.algorithms.secagg import SecAggAbort
    from fltool.errors import FltoolError, RoundAborted

    assert issubclass(SecAggAbort, RoundAborted) and issubclass(RoundAborted, FltoolError)
    real_train_round, calls, cohorts = federated.train_round, [], []

    def abort_round_2_once(*args, **kwargs):
        calls.append(args[5])
        cohorts.append([c.id for c in args[4]])
        if calls.count(2) == 1 and args[5] == 2:
            raise SecAggAbort("secagg: round aborted (simulated)")
        return real_train_round(*args, **kwargs)

    monkeypatch.setattr(federated, "train_round", abort_round_2_once)
    cfg = make_config(clients={"on_too_few": on_too_few})
    if on_too_few == "skip":
        with pytest.warns(UserWarning, match="round 2 skipped: secagg: round aborted"):
            rows = read_metrics(run(cfg))
        assert calls == [1, 2, 3] and rows[1]["train_loss"] is None and rows[1]["bytes_up"] == 0
    else:
        rows = read_metrics(run(cfg))
        assert calls == [1, 2, 2, 3] and rows[1]["train_loss"] > 0
        assert cohorts[1] != cohorts[2] and rows[1]["client_ids"] == sorted(cohorts[2])  # the second draw trained

    def fail(*args, **kwargs):
        raise FltoolError("not an abort")

    monkeypatch.setattr(federated, "train_round", fail)
    with pytest.raises(FltoolError, match="not an abort"):
        run(cfg)
