"""Bad input: one line per problem naming file, key and allowed values; exit 2; no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fltool.cli import app

GOOD = Path(__file__).resolve().parents[1] / "configs" / "fedavg_mnist.yaml"

# (yaml text or None for GOOD, overrides, expected fragments)
CASES = {
    "unknown key with suggestion": ("federated:\n  rouns: 3\n", [], ["federated.rouns: unknown key; did you mean 'federated.rounds'?"]),
    "unknown top-level key": ("modle: {name: mlp}\n", [], ["modle: unknown key; did you mean 'model'?"]),
    "bad mode lists allowed": ("mode: fedsdg\n", [], ["mode: must be one of federated, ddp; got 'fedsdg'"]),
    "bad dataset": ("data: {dataset: imagenet}\n", [], ["data.dataset: must be one of mnist, fashion_mnist, cifar10, cifar100"]),
    "bad partition": ("data: {partition: random}\n", [], ["data.partition: must be one of iid, shards, dirichlet"]),
    "fraction above one": ("federated: {fraction: 1.5}\n", [], ["federated.fraction: must be in (0, 1], got 1.5"]),
    "fraction zero": ("federated: {fraction: 0}\n", [], ["federated.fraction: must be in (0, 1]"]),
    "no clients": ("federated: {num_clients: 0}\n", [], ["federated.num_clients: must be >= 1, got 0"]),
    "negative lr": ("federated: {lr: -0.1}\n", [], ["federated.lr: must be a finite number > 0, got -0.1"]),
    "negative mu": ("algorithm: {name: fedprox, mu: -1}\n", [], ["algorithm.mu: must be a finite number >= 0, got -1.0"]),
    "rounds not a number": ("federated: {rounds: five}\n", [], ["federated.rounds: expected an integer >= 1, got 'five'"]),
    "bool is not an int": ("federated: {rounds: true}\n", [], ["federated.rounds: expected an integer"]),
    "batch size zero": ("federated: {batch_size: 0}\n", [], ["federated.batch_size: must be >= 1, got 0"]),
    "target accuracy as percent": ("eval: {target_accuracy: 97}\n", [], ["eval.target_accuracy: must be in (0, 1]"]),
    "top level not a mapping": ("- fedavg\n- mnist\n", [], ["top level must be a mapping"]),
    "invalid yaml": ("federated: {rounds: 3\n", [], ["invalid YAML (line"]),
    "bad override value": (None, ["federated.fraction=abc"], ["command line: federated.fraction: expected a number in (0, 1], got 'abc'"]),
    "override without equals": (None, ["federated.rounds"], ["override 'federated.rounds' must look like key=value"]),
    "override unknown key": (None, ["federated.epochs=3"], ["command line: federated.epochs: unknown key"]),
    "shards exceed data": ("data: {partition: shards, shards_per_client: 1000}\n", [], ["data.shards_per_client:"]),
    "more clients than examples": (
        "data: {dataset: synthetic, synthetic: {train_size: 50}}\nfederated: {num_clients: 60}\n",
        [],
        ["federated.num_clients: 60 clients exceed the 50 training examples"],
    ),
    "infinite lr": ("federated: {lr: .inf}\n", [], ["federated.lr: must be a finite number > 0, got inf"]),
    "infinite alpha": ("data: {partition: dirichlet, alpha: .inf}\n", [], ["data.alpha: must be a finite number > 0"]),
    "nan mu": ("algorithm: {name: fedprox, mu: .nan}\n", [], ["algorithm.mu: must be a finite number >= 0, got nan"]),
    "timeout beyond a year": (None, ["ddp.timeout_s=99999999999999"], ["ddp.timeout_s: must be in [1, 31536000] (a year)"]),
    "seed beyond torch's range": ("seed: 18446744073709551616\n", [], ["seed: must be in [0, 2**63)"]),
    "name with a path": ("name: ../../elsewhere\n", [], ["name: must be a non-empty name without '/'"]),
    "cross-check from the command line": (
        None, ["data.dataset=synthetic", "data.synthetic.shape=[1,28]"],
        ["error: command line: data.synthetic.shape: must be [channels, height, width]"],
    ),
    "unknown section from the command line": (None, ["foo.bar=1"], ["error: command line: foo: unknown key"]),
    "scalar made a mapping on the command line": (
        None, ["federated.batch_size.x=1"], ["error: command line: federated.batch_size: expected an integer"],
    ),
}


def print_config(text: str | None, overrides: list[str], tmp_path: Path):
    """`fltool train --print-config` of `text` (written to bad.yaml; None: a good file)."""
    path = GOOD
    if text is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
    return path, CliRunner().invoke(app, ["train", str(path), *overrides, "--print-config"])


@pytest.mark.parametrize("name", list(CASES))
def test_bad_config_exits_2_with_one_line_per_problem(name: str, tmp_path: Path):
    text, overrides, fragments = CASES[name]
    path, result = print_config(text, overrides, tmp_path)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line]
    assert lines and all(line.startswith("error: ") for line in lines)
    for fragment in fragments:
        assert any(fragment in line for line in lines), (fragment, lines)
    if text is not None and "override" not in name:
        assert any(str(path) in line for line in lines)


DEEP = "a: " + "[" * 10_000 + "]" * 10_000 + "\n"
HUGE = "1" + "0" * 400
# (yaml text or None for GOOD, overrides, the exact stderr lines; {path} is the file)
EXACT = {
    "repeated section": (
        "federated:\n  rounds: 3\nmode: federated\nfederated:\n  lr: 0.5\n",
        [],
        ["error: {path}: federated: duplicate key (line 4); each key may appear once"],
    ),
    "repeated nested key": (
        "federated:\n  lr: 0.1\n  lr: 0.2\n",
        [],
        ["error: {path}: federated.lr: duplicate key (line 3); each key may appear once"],
    ),
    "repeated key in an override value": (
        None,
        ["data.synthetic={train_size: 5, train_size: 6}"],
        ["error: command line: data.synthetic.train_size: duplicate key; each key may appear once"],
    ),
    "nested too deeply": (DEEP, [], ["error: {path}: invalid YAML: nested too deeply"]),
    "override nested too deeply": (
        None, ["federated.rounds=" + DEEP[3:].strip()], ["error: command line: federated.rounds: value nested too deeply"],
    ),
    "integer with too many digits": (
        "seed: 1" + "0" * 5000 + "\n", [], ["error: {path}: invalid YAML (line 1, column 7): integer with more than 4300 digits"],
    ),
    "explicit tag that does not fit": (
        "seed: !!int abc\n", [], ["error: {path}: invalid YAML (line 1, column 7): cannot read 'abc' as !!int"],
    ),
    "sexagesimal is not a number": (
        None, ["federated.rounds=1:30"], ["error: command line: federated.rounds: expected an integer >= 1, got '1:30'"],
    ),
    "yes is not a boolean": (
        "federated: {cuda_graphs: yes}\n", [], ["error: {path}: federated.cuda_graphs: expected true or false, got 'yes'"],
    ),
    "integer beyond float": (None, [f"federated.lr={HUGE}"], ["error: command line: federated.lr: must be a finite number > 0, got inf"]),
    "negative integer beyond float": (
        None,
        ["algorithm.name=fedprox", f"algorithm.mu=-{HUGE}"],
        ["error: command line: algorithm.mu: must be a finite number >= 0, got -inf"],
    ),
    "integer beyond int64": (
        None,
        ["federated.batch_size=9223372036854775808", "ddp.grad_accum_steps=9223372036854775808"],
        [
            "error: command line: federated.batch_size: must be at most 2**63 - 1, got 9223372036854775808",
            "error: command line: ddp.grad_accum_steps: must be at most 2**63 - 1, got 9223372036854775808",
        ],
    ),
    "integer far beyond int64": (
        None,
        [f"federated.rounds={HUGE}"],
        ["error: command line: federated.rounds: must be at most 2**63 - 1, got an integer of about 401 digits"],
    ),
    "list item beyond int64": (
        None,
        ["data.synthetic.shape=[1, 28, 9223372036854775808]"],
        ["error: command line: data.synthetic.shape: list item: must be at most 2**63 - 1, got 9223372036854775808"],
    ),
    "synthetic set too large to allocate": (
        None,
        ["data.dataset=synthetic", "data.synthetic.train_size=3000000"],
        [
            "error: command line: data.synthetic.train_size: 3000000 x shape [1, 28, 28] = 2352000000 values, "
            "more than the 2**31 (8 GiB of float32) a synthetic tensor may hold"
        ],
    ),
    "NUL in the name": ('name: "a\\0b"\n', [], ["error: {path}: name: must not contain a NUL character, got 'a\\x00b'"]),
    "NUL in paths": (
        None,
        ['data.root="\\0"', 'data.cache="\\0"', 'output.dir="\\0"', 'output.run_dir="\\0"'],
        [
            f"error: command line: {key}: must not contain a NUL character, got '\\x00'"
            for key in ("data.root", "data.cache", "output.dir", "output.run_dir")
        ],
    ),
    "bool for an optional integer": (
        None,
        ["federated.batch_size=true"],
        ["error: command line: federated.batch_size: expected an integer >= 1 or null, got True"],
    ),
    "override key with a leading dot": (
        None,
        [".federated.rounds=1"],
        ["error: command line: .federated.rounds: malformed key (an empty part between dots); write it like federated.rounds"],
    ),
    "a dotted override into a scalar an earlier override set": (
        None,
        ["federated=3", "federated.rounds=5"],
        [
            "error: command line: federated.rounds: federated was set to 3 by an earlier override, "
            "so federated.rounds cannot be set in it",
            "error: command line: federated: expected a mapping, got 3",
        ],
    ),
    "override key with an empty part": (
        None,
        ["federated..rounds=1"],
        ["error: command line: federated..rounds: malformed key (an empty part between dots); write it like federated.rounds"],
    ),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_bad_input_exact_lines(name: str, tmp_path: Path):
    text, overrides, expected = EXACT[name]
    path, result = print_config(text, overrides, tmp_path)
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [line.format(path=path) for line in expected]


def test_missing_config_file(tmp_path: Path):
    result = CliRunner().invoke(app, ["train", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: no such file"


def test_config_that_is_not_utf8(tmp_path: Path):
    path = tmp_path / "utf16.yaml"
    path.write_bytes("mode: federated\n".encode("utf-16"))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {path}: not a UTF-8 text file"


def test_config_is_a_directory(tmp_path: Path):
    result = CliRunner().invoke(app, ["train", str(tmp_path)])
    assert result.exit_code == 2
    assert "is a directory" in result.stderr


def test_debug_env_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLTOOL_DEBUG", "1")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "nope.yaml")])
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "FltoolError"


def test_print_config_prints_resolved_yaml_and_exits():
    result = CliRunner().invoke(app, ["train", str(GOOD), "federated.rounds=4", "--print-config"])
    assert result.exit_code == 0
    assert "rounds: 4" in result.stdout
    assert "name: fedavg_mnist" in result.stdout


# -- the registry sections (algorithm, server_optimizer, aggregator) and legacy spellings -

ALGORITHM_NAMES = "fedavg, fednova, fedprox, fedsgd, scaffold"
# (yaml text or None for GOOD, overrides, the exact stderr lines; {path} is the file)
CHOICE_ERRORS = {
    "unknown algorithm": (
        "algorithm: {name: fedadam}\n", [], [f"error: {{path}}: algorithm.name: must be one of {ALGORITHM_NAMES}; got 'fedadam'"],
    ),
    "unknown server optimizer": (
        "server_optimizer: {name: rmsprop, lr: 0.1}\n",
        [],
        ["error: {path}: server_optimizer.name: must be one of sgd, adagrad, adam, yogi; got 'rmsprop'"],
    ),
    "unknown aggregator": (
        None,
        ["aggregator.name=krumm"],
        ["error: command line: aggregator.name: must be one of mean, median, trimmed_mean, krum, multikrum, bulyan, norm_bounded; got 'krumm'"],
    ),
    "negative mu": (
        "algorithm:\n  name: fedprox\n  mu: -1\n", [], ["error: {path}: algorithm.mu: must be a finite number >= 0, got -1.0"],
    ),
    "mu for fedavg": ("algorithm: {name: fedavg, mu: 0.1}\n", [], ["error: {path}: algorithm.mu: unknown key of algorithm fedavg (a key of fedprox); valid keys: name, plugin"]),
    "scaffold option": (
        None,
        ["algorithm.name=scaffold", "algorithm.option=0"],
        ["error: command line: algorithm.option: must be 1 or 2 (the paper's options I and II), got 0"],
    ),
    "legacy mode": (
        "mode: fedprox\n", [], ["error: {path}: mode: fedprox is an algorithm now; write mode: federated and algorithm: {{name: fedprox}}"],
    ),
    "legacy mode on the command line": (
        None, ["mode=fedsgd"], ["error: command line: mode: fedsgd is an algorithm now; write mode: federated and algorithm: {{name: fedsgd}}"],
    ),
    "legacy federated.mu": (
        "federated: {rounds: 2, mu: 0.01}\n", [], ["error: {path}: federated.mu: is now algorithm.mu (with algorithm.name: fedprox)"],
    ),
    "legacy federated.server_lr": (
        None, ["federated.server_lr=0.5"], ["error: command line: federated.server_lr: is now server_optimizer.lr"],
    ),
    "plugin that does not exist": (
        "algorithm: {name: clipped_fedavg, plugin: no_such_module_xyz, max_norm: 1.0}\n",
        [],
        ["error: {path}: algorithm.plugin: cannot import 'no_such_module_xyz': No module named 'no_such_module_xyz'"],
    ),
    "plugin that does not exist, from the command line": (
        None,
        ["algorithm.plugin=no_such_pkg_xyz.algo"],
        ["error: command line: algorithm.plugin: cannot import 'no_such_pkg_xyz.algo': No module named 'no_such_pkg_xyz'"],
    ),
}


@pytest.mark.parametrize("print_it", [True, False], ids=["print-config", "train"])
@pytest.mark.parametrize("name", list(CHOICE_ERRORS))
def test_a_bad_choice_or_legacy_spelling_is_one_line_and_exit_2(name: str, print_it: bool, tmp_path: Path):
    """Both `fltool train cfg.yaml` and `--print-config` refuse it before anything runs."""
    text, overrides, expected = CHOICE_ERRORS[name]
    path = GOOD
    if text is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
    args = ["train", str(path), *overrides, f"output.dir={tmp_path / 'runs'}"] + (["--print-config"] if print_it else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    assert result.stderr.splitlines() == [line.format(path=path) for line in expected]
    assert not (tmp_path / "runs").exists()


def test_print_config_shows_every_key_of_the_chosen_classes():
    result = CliRunner().invoke(
        app, ["train", str(GOOD), "algorithm.name=fedprox", "algorithm.mu=0.5", "server_optimizer.name=yogi", "--print-config"]
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "algorithm:\n  name: fedprox\n  plugin: null\n  mu: 0.5\n" in out
    assert "server_optimizer:\n  name: yogi\n  lr: 0.01\n  beta1: 0.9\n  beta2: 0.99\n  tau: 0.001\n  bias_correction: false\n" in out
    assert "aggregator:\n  name: mean\n" in out
