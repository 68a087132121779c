"""DP settings that cannot give the guarantee they ask for are refused at load time in
one line naming the key (exit 2 from the CLI), before any data is read."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fltool.cli import app
from fltool.config import load_config
from fltool.errors import FltoolError

DP = ["dp.mode=central", "dp.noise_multiplier=1.0"]
CASES = {
    "neither z nor target": (
        ["dp.mode=central"], "dp.mode: dp.mode central needs exactly one of dp.noise_multiplier and dp.target_epsilon (which calibrates it)"
    ),
    "both z and target": (
        [*DP, "dp.target_epsilon=2"],
        "dp.target_epsilon: dp.mode central needs exactly one of dp.noise_multiplier and dp.target_epsilon (which calibrates it)",
    ),
    "central with a robust aggregator": (
        [*DP, "aggregator.name=median"], "aggregator.name: dp.mode central noises the clipped sum: it needs aggregator mean, got 'median'"
    ),
    "scaffold's control variates": (
        [*DP, "algorithm.name=scaffold"],
        "algorithm.name: scaffold uploads extras (control variates, step counts) that dp does not protect; use an algorithm without, e.g. fedavg or fedprox",
    ),
    "adaptive without poisson": (
        [*DP, "dp.adaptive_clipping=true"],
        "dp.adaptive_clipping: needs dp.mode central and federated.sampling poisson (its accounting assumes both)",
    ),
    "pld with fixed-size sampling": (
        [*DP, "dp.accountant=pld"], "dp.accountant: pld accounts for Poisson sampling only: set federated.sampling poisson, or use rdp"
    ),
    "count noise too small": (
        [*DP, "dp.adaptive_clipping=true", "federated.sampling=poisson", "dp.count_noise=0.4"],
        "dp.count_noise: count noise 0.4 leaves no noise for the update: adaptive clipping needs 2 * dp.count_noise > z = 1",
    ),
    "delta of 1": ([*DP, "dp.delta=1"], "dp.delta: must be in (0, 1), got 1.0"),
    # dp-accounting divides by zero near 1e-300 and fails past ~1e8
    "a vanishing noise multiplier": (["dp.mode=central", "dp.noise_multiplier=1e-300"], "dp.noise_multiplier: must be 0 (no noise) or in [1e-6, 1e6], got 1e-300"),
    "a huge noise multiplier": (["dp.mode=central", "dp.noise_multiplier=3e38"], "dp.noise_multiplier: must be 0 (no noise) or in [1e-6, 1e6], got 3e+38"),
    "unknown mode": (["dp.mode=global"], "dp.mode: must be one of none, central, local; got 'global'"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_dp_setting_without_a_guarantee_is_one_line(name: str):
    overrides, line = CASES[name]
    with pytest.raises(FltoolError) as info:
        load_config(None, overrides)
    assert info.value.lines == [f"command line: {line}"]


def test_the_cli_exits_2_before_training(tmp_path: Path):
    path = tmp_path / "dp.yaml"
    path.write_text("dp: {mode: central}\n")
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {path}: dp.mode: dp.mode central needs exactly one of dp.noise_multiplier and dp.target_epsilon "
        "(which calibrates it)"
    )


@pytest.mark.parametrize(
    "overrides",
    [
        [*DP, "federated.sampling=poisson", "dp.adaptive_clipping=true", "dp.accountant=pld", "dp.count_noise=2"],
        ["dp.mode=local", "dp.target_epsilon=8", "dp.accountant=pld"],
        [*DP, "algorithm.name=fedprox", "server_optimizer.name=adam", "server_optimizer.lr=0.01"],
    ],
)
def test_valid_dp_settings_load(overrides: list[str]):
    load_config(None, overrides)
