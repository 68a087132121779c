"""The DDP trainer in one process (`fltool train`, no process group)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fltool.config import config_from_dict
from fltool.run.checkpoint import load_checkpoint
from fltool.run.runner import resume_run, start_run
from fltool.ui import PlainReporter

# tests/distributed/conftest.py registers ddp_helpers only when that folder is collected
# (first, in a whole-suite run); this file also runs on its own
if "ddp_helpers" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("ddp_helpers", Path(__file__).parents[1] / "distributed" / "ddp_helpers.py")
    sys.modules["ddp_helpers"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["ddp_helpers"])

from ddp_helpers import REPO, assert_same_model, ddp_config, load_model, run_cli  # noqa: E402


def _cfg(tmp_path: Path, name: str, **ddp):
    raw = ddp_config(**ddp)
    raw["output"] = {"run_dir": str(tmp_path / name)}
    return config_from_dict(raw)


class StopAt(PlainReporter):
    """Acts like Ctrl-C right after epoch `at` was logged and checkpointed."""

    def __init__(self, at: int) -> None:
        super().__init__("epoch")
        self.at = at

    def update(self, row):
        super().update(row)
        if row["epoch"] == self.at:
            raise KeyboardInterrupt


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    opts = dict(epochs=4, optimizer="adamw", weight_decay=0.01, grad_accum_steps=2, warmup_steps=3)
    full = start_run(_cfg(tmp_path, "full", **opts), PlainReporter("epoch"))

    cut = _cfg(tmp_path, "cut", **opts)
    with pytest.raises(KeyboardInterrupt):
        start_run(cut, StopAt(2))
    saved = load_checkpoint(cut.output.run_dir + "/checkpoints/last.pt")  # loadable after Ctrl-C
    assert saved.round == 2 and set(saved.extra) >= {"optimizer", "scheduler", "epoch"}

    resumed = resume_run(Path(cut.output.run_dir), [], PlainReporter("epoch"))
    assert resumed.rounds_completed == full.rounds_completed == 4
    assert_same_model(load_model(Path(cut.output.run_dir)), load_model(full.run_dir), atol=1e-6)
    assert [r["train_loss"] for r in resumed.metrics] == pytest.approx([r["train_loss"] for r in full.metrics])


def test_resuming_with_more_epochs_runs_the_stretched_schedule_from_the_first_step(tmp_path):
    """A cosine that ended at lr 0 after 2 epochs, resumed with ddp.epochs=3: the first
    resumed step runs at the 3-epoch rule's rate, not at the old schedule's last one."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from fltool.trainers.ddp_optim import schedule_rule

    cfg = _cfg(tmp_path, "short", epochs=2, warmup_steps=0)
    done = start_run(cfg, PlainReporter("epoch"))
    steps = done.metrics[-1]["steps"]
    assert done.metrics[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    rates: list[float] = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: rates.append(opt.param_groups[0]["lr"]))
    try:
        resume_run(done.run_dir, ["ddp.epochs=3"], PlainReporter("epoch"))
    finally:
        handle.remove()
    rule = schedule_rule(cfg.ddp, 3 * steps // 2)
    assert rates == pytest.approx([cfg.ddp.lr * rule(steps + k) for k in range(len(rates))])
    assert len(rates) == steps // 2 and rates[0] > 0


@pytest.mark.parametrize("when", ["before", "after"])
def test_interrupt_at_a_checkpoint_write_leaves_metrics_not_ahead_of_it(tmp_path, interrupt_checkpoint_write, when):
    """As for federated runs (tests/trainers/test_federated.py)."""
    import fltool.trainers.ddp as trainer

    interrupt_checkpoint_write(trainer, 2, when)
    cut = _cfg(tmp_path, "cut", epochs=3)
    with pytest.raises(KeyboardInterrupt):
        start_run(cut, PlainReporter("epoch"))
    run_dir = Path(cut.output.run_dir)
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt").round == (2 if when == "after" else 1)
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]


def test_bf16_autocast_and_sgd_train(tmp_path):
    summary = start_run(_cfg(tmp_path, "bf16", amp="bf16", optimizer="sgd", lr=0.1, epochs=3), PlainReporter("epoch"))
    losses = [row["train_loss"] for row in summary.metrics]
    assert losses[-1] < losses[0]
    assert summary.final_accuracy is not None and summary.final_accuracy > 0.5  # 4 classes: chance is 0.25
    # bf16 really ran: the same run in fp32 ends elsewhere (by more than float noise)
    fp32 = start_run(_cfg(tmp_path, "fp32", optimizer="sgd", lr=0.1, epochs=3), PlainReporter("epoch"))
    a, b = load_model(summary.run_dir), load_model(fp32.run_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-3


def test_ddp_mnist_config_trains_and_its_checkpoint_evaluates(tmp_path):
    run_dir = tmp_path / "mnist_cfg"
    overrides = [
        "data.dataset=synthetic",
        "data.synthetic.train_size=256",
        "data.synthetic.test_size=64",
        "data.synthetic.shape=[1,8,8]",
        "device=cpu",
        "ddp.epochs=1",
        "ddp.warmup_steps=2",
        f"output.run_dir={run_dir}",
    ]
    done = run_cli("train", str(REPO / "configs" / "ddp_mnist.yaml"), *overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["epoch"] == 1 and row["steps"] == 4  # 256 examples / batch 64

    ev = run_cli("eval", str(run_dir / "checkpoints" / "last.pt"), "--json", "--device", "cpu", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    report = json.loads(ev.stdout)
    assert report["mode"] == "ddp" and report["model"] == "cnn" and report["epoch"] == 1 and "round" not in report
    plain = run_cli("eval", str(run_dir / "checkpoints" / "last.pt"), "--device", "cpu", cwd=tmp_path)
    assert plain.stdout.splitlines()[0].endswith(": ddp cnn on synthetic, epoch 1, 64 test examples")
    assert report["accuracy"] == pytest.approx(row["test_accuracy"])


class Watching(PlainReporter):
    def __init__(self) -> None:
        super().__init__("epoch")
        self.seen: list[tuple[int, float]] = []

    def within(self, index: int, fraction: float) -> None:
        self.seen.append((index, fraction))


def test_progress_within_an_epoch_reaches_the_reporter(tmp_path: Path):
    """The bar moves inside an epoch: one report per optimizer step, each epoch to 1."""
    reporter = Watching()
    start_run(_cfg(tmp_path, "progress", epochs=2), reporter)
    by_epoch = {e: [f for i, f in reporter.seen if i == e] for e in (1, 2)}
    for fractions in by_epoch.values():
        assert len(fractions) > 1 and fractions == sorted(fractions) and fractions[-1] == 1.0
