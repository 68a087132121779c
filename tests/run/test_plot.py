"""fltool plot: a PNG of the right size with drawn pixels, a legend naming the config
keys that differ, seeds of one setting as one curve, the target line, SVG by suffix."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fltool.cli import app
from fltool.errors import FltoolError
from fltool.run.plot import plot_runs

from .run_dirs import fake_run

from matplotlib import image  # the plot extra: CI installs it


@pytest.fixture
def sweep(tmp_path: Path, make_config) -> Path:
    root = tmp_path / "sweep"
    for lr, curves in ((0.05, ([0.2, 0.4, 0.5], [0.3, 0.5, 0.7])), (0.1, ([0.4, 0.6, 0.8], [0.5, 0.7, 0.9]))):
        for seed, accs in enumerate(curves):
            cfg = make_config(seed=seed, federated={"lr": lr}, eval={"target_accuracy": 0.85})
            fake_run(root / f"lr{lr}-seed{seed}", cfg, accs)
    return root


def test_a_png_of_the_right_size_with_curves(sweep, tmp_path):
    result = plot_runs([sweep], out=tmp_path / "plot.png")
    pixels = image.imread(result.path)
    assert pixels.shape[:2] == (500, 800)
    not_white = (pixels[..., :3] < 0.95).any(axis=-1)
    assert 0.01 < not_white.mean() < 0.9  # axes, text and curves, not a blank (or black) image
    # the two curves' colours (matplotlib's first two: blue and orange) are drawn
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert ((b > 0.6) & (r < 0.3)).sum() > 100 and ((r > 0.9) & (g > 0.4) & (g < 0.6) & (b < 0.2)).sum() > 100


def test_the_legend_names_the_differing_keys_and_seeds_make_one_curve(sweep, tmp_path):
    result = plot_runs([sweep], out=tmp_path / "plot.png")
    assert result.differing == ["federated.lr"]
    assert result.labels == [
        "federated.lr=0.05 (mean ± std, 2 seeds)",
        "federated.lr=0.1 (mean ± std, 2 seeds)",
        "target 0.85",
    ]
    low = result.curves[0]
    assert low.x == [1.0, 2.0, 3.0]
    assert low.mean == pytest.approx([0.25, 0.45, 0.6]) and low.std == pytest.approx([0.0707107, 0.0707107, 0.1414214])


def test_single_runs_and_other_keys(tmp_path, make_config):
    a = fake_run(tmp_path / "a", make_config(model={"name": "mlp"}, federated={"local_epochs": 1}), [0.1, 0.2])
    b = fake_run(tmp_path / "b", make_config(federated={"local_epochs": 5}), [0.3, 0.4])
    result = plot_runs([a, b], x="bytes_up", out=tmp_path / "plot.svg")
    assert result.labels == ["federated.local_epochs=1", "federated.local_epochs=5"]
    assert result.curves[0].x == [1000.0, 2000.0]  # cumulative
    text = result.path.read_text()
    assert text.startswith("<?xml") and "<svg" in text


def test_differently_named_settings_are_labelled_by_name(tmp_path, make_config):
    a = fake_run(tmp_path / "a", make_config(name="fedsgd_iid", federated={"lr": 0.5, "batch_size": None}), [0.1, 0.2])
    b = fake_run(tmp_path / "b", make_config(name="fedavg_noniid", data={"partition": "shards"}), [0.3, 0.4])
    result = plot_runs([a, b], out=tmp_path / "plot.png")
    assert result.labels == ["fedsgd_iid", "fedavg_noniid"] and "federated.lr" in result.differing
    # two settings of one name (an lr sweep of one config) still show what differs
    c = fake_run(tmp_path / "c", make_config(name="fedsgd_iid", federated={"lr": 0.2, "batch_size": None}), [0.1, 0.3])
    assert plot_runs([a, b, c], out=tmp_path / "plot.png").labels[0].startswith("name=fedsgd_iid, ")


def test_bad_arguments_are_one_line_errors(sweep, tmp_path):
    with pytest.raises(FltoolError, match="expected .png or .svg"):
        plot_runs([sweep], out=tmp_path / "plot.jpg")
    with pytest.raises(FltoolError, match="no run has values of 'nope'"):
        plot_runs([sweep], metric="nope", out=tmp_path / "plot.png")
    with pytest.raises(FltoolError, match="no fltool run directory"):
        (tmp_path / "empty").mkdir()
        plot_runs([tmp_path / "empty"], out=tmp_path / "p.png")


def test_the_command(sweep, tmp_path):
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(app, ["plot", str(sweep), "--x", "elapsed_s", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 1000 and "2 curves" in result.output
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "missing"), "-o", str(out)])
    assert result.exit_code == 2 and result.stderr.startswith("error: ")
