"""An aggregator that cannot combine the cohort the config samples (Krum's f too large,
Bulyan's n < 4f + 3, ...) is refused at load time in one line naming the key, not a
round into the run; its own settings are checked like any other field."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fltool.cli import app
from fltool.config import load_config
from fltool.errors import FltoolError

# num_clients=50 at the default fraction 0.1: a cohort of 5; 70: a cohort of 7
CASES = {
    "krum f too large": (
        ["aggregator.name=krum", "aggregator.f=3", "federated.num_clients=50"],
        "aggregator.f: krum needs more than f + 2 updates: f=3 leaves none of a cohort of 5 (n - f - 2 = 0)",
    ),
    "multikrum f too large": (
        ["aggregator.name=multikrum", "aggregator.f=4", "federated.num_clients=50"],
        "aggregator.f: multikrum needs more than f + 2 updates: f=4 leaves none of a cohort of 5 (n - f - 2 = -1)",
    ),
    "multikrum m too large": (
        ["aggregator.name=multikrum", "aggregator.f=1", "aggregator.m=5", "federated.num_clients=50"],
        "aggregator.m: must keep between 1 and n - f = 4 updates of a cohort of 5 with f=1, got 5",
    ),
    "multikrum m zero": (["aggregator.name=multikrum", "aggregator.m=0"], "aggregator.m: must be >= 1, got 0"),
    "bulyan n < 4f + 3": (
        ["aggregator.name=bulyan", "aggregator.f=2", "federated.num_clients=100"],
        "aggregator.f: bulyan needs n >= 4f + 3 updates: f=2 needs 11, the cohort has 10",
    ),
    "krum negative f": (["aggregator.name=krum", "aggregator.f=-1"], "aggregator.f: must be >= 0, got -1"),
    "trimmed_mean beta 0.5": (["aggregator.name=trimmed_mean", "aggregator.beta=0.5"], "aggregator.beta: must be in [0, 0.5), got 0.5"),
    "norm_bounded clip 0": (
        ["aggregator.name=norm_bounded", "aggregator.clip_norm=0"], "aggregator.clip_norm: must be a finite number > 0, got 0.0",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_an_aggregator_the_cohort_cannot_feed_is_one_line(name: str):
    overrides, line = CASES[name]
    with pytest.raises(FltoolError) as info:
        load_config(None, overrides)
    assert info.value.lines == [f"command line: {line}"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["aggregator.name=krum", "aggregator.f=1", "federated.num_clients=40"],  # n = f + 3: one neighbour
        ["aggregator.name=multikrum", "aggregator.f=1", "aggregator.m=3", "federated.num_clients=40"],  # m = n - f
        ["aggregator.name=bulyan", "aggregator.f=1", "federated.num_clients=70"],  # n = 4f + 3
        ["aggregator.name=krum", "aggregator.f=9", "mode=ddp"],  # no cohort in ddp
    ],
)
def test_the_smallest_cohorts_each_rule_accepts_load(overrides: list[str]):
    load_config(None, overrides)


def test_trimmed_mean_never_trims_a_whole_cohort_within_its_range():
    """2 floor(beta n) <= 2 beta n < n for beta < 1/2: every small cohort keeps a value
    (the cohort check only refuses configs built in code, past the field checks)."""
    for beta in (0.0, 0.1, 0.25, 0.3333, 0.49, 0.4999999):
        for clients in range(1, 12):
            overrides = [f"aggregator.beta={beta}", f"federated.num_clients={clients}", "federated.fraction=1"]
            cfg = load_config(None, ["aggregator.name=trimmed_mean", *overrides])
            assert cfg.aggregator.problem(clients) is None
    beyond = type(cfg.aggregator)(beta=0.5)
    assert beyond.problem(4) == ("beta", "trims 2 values at each end, all of a cohort of 4 (2 * floor(beta * n) >= n)")


def test_the_line_names_the_file_that_set_the_aggregator(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("federated: {num_clients: 30, fraction: 0.1}\naggregator: {name: krum, f: 1}\n")
    with pytest.raises(FltoolError) as info:
        load_config(path)
    assert info.value.lines == [
        f"{path}: aggregator.f: krum needs more than f + 2 updates: f=1 leaves none of a cohort of 3 (n - f - 2 = 0)"
    ]
    assert load_config(path, ["federated.fraction=0.2"]).aggregator.f == 1  # a cohort of 6


def test_the_cli_exits_2_with_one_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("federated: {num_clients: 60, fraction: 0.1}\naggregator: {name: bulyan, f: 1}\n")
    result = CliRunner().invoke(app, ["train", str(path), "--print-config"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert [line for line in result.stderr.splitlines() if line] == [
        f"error: {path}: aggregator.f: bulyan needs n >= 4f + 3 updates: f=1 needs 7, the cohort has 6"
    ]
