from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fltool.algorithms.fedprox import FedProxConfig
from fltool.algorithms.scaffold import ScaffoldConfig
from fltool.algorithms.server_optimizers import AdaptiveConfig, SGDConfig
from fltool.config import Config, config_from_dict, dump_config, load_config
from fltool.config.registry import AGGREGATORS, ALGORITHMS, SERVER_OPTIMIZERS
from fltool.config.schema import AggregatorConfig, AlgorithmConfig
from fltool.config.yaml12 import Yaml12Loader, parse_yaml
from fltool.errors import FltoolError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_without_file_are_mcmahan_fedavg():
    cfg = load_config(None)
    # each registry section is built as its name's own class (sgd's SGDConfig has momentum)
    assert cfg.algorithm == AlgorithmConfig(name="fedavg", plugin=None)
    assert cfg.server_optimizer == SGDConfig(name="sgd", lr=1.0, momentum=0.0)
    assert cfg.aggregator == AggregatorConfig(name="mean")
    rest = {f.name for f in dataclasses.fields(Config)} - {"algorithm", "server_optimizer", "aggregator"}
    assert all(getattr(cfg, name) == getattr(Config(), name) for name in rest)
    assert (cfg.mode, cfg.federated.num_clients, cfg.federated.fraction, cfg.federated.batch_size) == ("federated", 100, 0.1, 10)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_overrides_are_typed_like_the_fields(tmp_path: Path):
    cfg = load_config(
        CONFIGS / "fedavg_mnist.yaml",
        ["federated.rounds=5", "seed=3", "federated.batch_size=null", "federated.lr=1", "data.partition=shards"],
    )
    assert cfg.federated.rounds == 5 and isinstance(cfg.federated.rounds, int)
    assert cfg.seed == 3
    assert cfg.federated.batch_size is None
    assert cfg.federated.lr == 1.0 and isinstance(cfg.federated.lr, float)
    assert cfg.data.partition == "shards"


def test_precedence_command_line_then_file_then_defaults(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("federated:\n  rounds: 7\n  lr: 0.3\n")
    cfg = load_config(path, ["federated.lr=0.02"])
    assert cfg.federated.lr == 0.02  # command line beats file
    assert cfg.federated.rounds == 7  # file beats default
    assert cfg.federated.local_epochs == Config().federated.local_epochs  # default


def test_dumped_config_loads_back_identically(tmp_path: Path):
    cfg = load_config(CONFIGS / "fedprox_mnist.yaml", ["seed=11"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_all_problems_are_collected_in_one_error(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    raw = {"mode": "fedsdg", "federated": {"fraction": 0, "lr": -1, "roundz": 3}, "algorithm": {"name": "fedprox", "mu": -1}}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(FltoolError) as info:
        load_config(path)
    lines = info.value.lines
    assert len(lines) == 5
    assert all(line.startswith(f"{path}: ") for line in lines)
    joined = "\n".join(lines)
    assert "mode: must be one of federated, ddp; got 'fedsdg'" in joined
    assert "algorithm.mu: must be a finite number >= 0, got -1.0" in joined
    assert "federated.fraction: must be in (0, 1], got 0.0" in joined
    assert "federated.lr: must be a finite number > 0, got -1.0" in joined
    assert "federated.roundz: unknown key; did you mean 'federated.rounds'?" in joined


def test_override_errors_name_the_command_line():
    with pytest.raises(FltoolError) as info:
        load_config(CONFIGS / "fedavg_mnist.yaml", ["federated.num_clients=0"])
    assert info.value.lines == ["command line: federated.num_clients: must be >= 1, got 0"]


def test_config_from_dict_rejects_wrong_nested_type():
    with pytest.raises(FltoolError, match="data: expected a mapping"):
        config_from_dict({"data": "mnist"}, "x.yaml")


def test_scalars_are_read_as_yaml_1_2(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("name: no\nseed: 017\nfederated:\n  lr: 1e-3\n  rounds: 0x10\n  local_epochs: 0o7\noutput:\n  dir: on\n")
    cfg = load_config(path)
    assert (cfg.name, cfg.seed, cfg.federated.lr, cfg.federated.rounds, cfg.federated.local_epochs) == ("no", 17, 1e-3, 16, 7)
    assert cfg.output.dir == "on"
    assert load_config(None, ["federated.lr=1e-3", "server_optimizer.lr=.5E+1"]).server_optimizer.lr == 5.0


def test_yaml_1_1_elsewhere_is_untouched():
    assert yaml.SafeLoader.yaml_implicit_resolvers is not Yaml12Loader.yaml_implicit_resolvers
    assert yaml.safe_load("[on, 017, 1:30, 1e-3]") == [True, 15, 90, "1e-3"]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_read_the_same_as_before(path: Path):
    text = path.read_text()
    assert parse_yaml(text) == yaml.safe_load(text)


def test_dumped_strings_that_look_like_other_types_load_back(tmp_path: Path):
    # a plain `1e3` or `017` would read back as a number under one YAML version or the other
    cfg = load_config(None, ["name='1e3'", "output.dir='017'", "data.root='yes'", "data.cache='1:30'"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["output"]["dir"] == "017"


def test_every_duplicate_key_is_refused_with_its_line(tmp_path: Path):
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 1\ndata:\n  synthetic: {shape: [1, 2, 3], shape: [1, 2, 3]}\nseed: 1\n")
    with pytest.raises(FltoolError) as info:
        load_config(path)
    assert info.value.lines == [
        f"{path}: data.synthetic.shape: duplicate key (line 3); each key may appear once",
        f"{path}: seed: duplicate key (line 4); each key may appear once",
    ]


def test_float_keys_refuse_integers_beyond_float_range():
    with pytest.raises(FltoolError) as info:
        load_config(None, ["data.alpha=" + "9" * 400, "ddp.momentum=" + "9" * 400])
    assert info.value.lines == [
        "command line: data.alpha: must be a finite number > 0, got inf",
        "command line: ddp.momentum: must be in [0, 1), got inf",
    ]


def test_float_keys_refuse_numbers_past_float32():
    """Each of these scales float32 tensors: past float32's largest, torch refused to
    convert it mid-round (federated.lr=1e308 was a traceback in round 1)."""
    keys = ["federated.lr", "server_optimizer.lr", "algorithm.mu", "dp.clip_norm", "aggregator.clip_norm"]
    sections = ["algorithm.name=fedprox", "dp.mode=central", "dp.noise_multiplier=1", "aggregator.name=norm_bounded"]
    with pytest.raises(FltoolError) as info:
        load_config(None, [*sections, *(f"{k}=1e308" for k in keys), "attack.name=scaling", "attack.factor=" + "9" * 50])
    assert sorted(info.value.lines) == sorted([
        *(f"command line: {k}: must be at most 3.403e+38 in size (float32's largest), got 1e+308" for k in keys),
        "command line: attack.factor: must be at most 3.403e+38 in size (float32's largest), got 1e+50",
    ])
    assert load_config(None, ["federated.lr=3e38"]).federated.lr == 3e38  # (it diverges: a run stops, says so)


def test_adaptive_tau_squared_must_fit_float32():
    with pytest.raises(FltoolError) as info:
        load_config(None, ["server_optimizer.name=adam", "server_optimizer.tau=3e38"])
    assert info.value.lines == ["command line: server_optimizer.tau: must be a number in (0, 1e18] (v starts at tau^2, in float32), got 3e+38"]


# -- the registry sections: algorithm, server_optimizer, aggregator ----------------------

REGISTRIES = {"algorithm": ALGORITHMS, "server_optimizer": SERVER_OPTIMIZERS, "aggregator": AGGREGATORS}
CHOICES = [(section, name) for section, registry in REGISTRIES.items() for name in registry.names()]


def test_the_builtin_choices_are_registered():
    assert ALGORITHMS.names() == ["fedavg", "fednova", "fedprox", "fedsgd", "scaffold"]
    assert SERVER_OPTIMIZERS.names() == ["sgd", "adagrad", "adam", "yogi"]
    assert AGGREGATORS.names() == ["mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "norm_bounded"]


@pytest.mark.parametrize(("section", "name"), CHOICES, ids=[f"{s}={n}" for s, n in CHOICES])
def test_each_name_builds_its_own_config_class(section: str, name: str):
    cfg = load_config(None, [f"{section}.name={name}"])
    chosen = getattr(cfg, section)
    assert type(chosen) is REGISTRIES[section].config_class(name) and chosen.name == name


def test_the_chosen_classes_carry_their_own_defaults():
    cfg = load_config(None, ["algorithm.name=fedprox", "server_optimizer.name=yogi"])
    assert cfg.algorithm == FedProxConfig(name="fedprox", mu=0.01)
    assert cfg.server_optimizer == AdaptiveConfig(name="yogi", lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    assert load_config(None, ["algorithm.name=scaffold"]).algorithm == ScaffoldConfig(name="scaffold", option=2)


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("algorithm.name=fedavgg", "algorithm.name: must be one of fedavg, fednova, fedprox, fedsgd, scaffold; got 'fedavgg'"),
        ("server_optimizer.name=adamw", "server_optimizer.name: must be one of sgd, adagrad, adam, yogi; got 'adamw'"),
        ("aggregator.name=trimmed", "aggregator.name: must be one of mean, median, trimmed_mean, krum, multikrum, bulyan, norm_bounded; got 'trimmed'"),
        ("algorithm.name=3", "algorithm.name: must be one of fedavg, fednova, fedprox, fedsgd, scaffold; got 3"),
        ("aggregator.name=null", "aggregator.name: must be one of mean, median, trimmed_mean, krum, multikrum, bulyan, norm_bounded; got null"),
        ("algorithm=fedprox", "algorithm: expected a mapping, got 'fedprox'"),
    ],
)
def test_an_unknown_choice_is_one_line_listing_the_valid_names(override: str, line: str):
    with pytest.raises(FltoolError) as info:
        load_config(None, [override])
    assert info.value.lines == [f"command line: {line}"]


def test_an_unknown_name_in_a_file_names_the_file(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  name: fedadam\nserver_optimizer: {name: sgd, lr: 0.5}\naggregator: {name: krumm}\n")
    with pytest.raises(FltoolError) as info:
        load_config(path)
    assert info.value.lines == [
        f"{path}: algorithm.name: must be one of fedavg, fednova, fedprox, fedsgd, scaffold; got 'fedadam'",
        f"{path}: aggregator.name: must be one of mean, median, trimmed_mean, krum, multikrum, bulyan, norm_bounded; got 'krumm'",
    ]


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["algorithm.name=fedprox", "algorithm.mu=-1"], "algorithm.mu: must be a finite number >= 0, got -1.0"),
        (["algorithm.name=fedprox", "algorithm.mu=.inf"], "algorithm.mu: must be a finite number >= 0, got inf"),
        (["algorithm.name=fedprox", "algorithm.mu=abc"], "algorithm.mu: expected a finite number >= 0, got 'abc'"),
        (["algorithm.mu=0.1"], "algorithm.mu: unknown key of algorithm fedavg (a key of fedprox); valid keys: name, plugin"),
        (["algorithm.name=scaffold", "algorithm.option=3"], "algorithm.option: must be 1 or 2 (the paper's options I and II), got 3"),
        (["algorithm.name=scaffold", "algorithm.mu=0.1"], "algorithm.mu: unknown key of algorithm scaffold (a key of fedprox); valid keys: name, plugin, option"),
        (["server_optimizer.lr=0"], "server_optimizer.lr: must be a finite number > 0, got 0.0"),
        (["server_optimizer.momentum=1"], "server_optimizer.momentum: must be in [0, 1), got 1.0"),
        (
            ["server_optimizer.name=adam", "server_optimizer.momentum=0.9"],
            "server_optimizer.momentum: unknown key of server_optimizer adam (a key of sgd); valid keys: name, lr, beta1, beta2, tau, bias_correction",
        ),
        (["server_optimizer.name=yogi", "server_optimizer.beta2=1"], "server_optimizer.beta2: must be in [0, 1), got 1.0"),
        (["server_optimizer.name=adagrad", "server_optimizer.tau=0"], "server_optimizer.tau: must be a number in (0, 1e18] (v starts at tau^2, in float32), got 0.0"),
        (
            ["server_optimizer.name=adam", "server_optimizer.bias_correction=yes"],
            "server_optimizer.bias_correction: expected true or false, got 'yes'",
        ),
        (["aggregator.plugin=x"], "aggregator.plugin: unknown key; valid keys: name"),
        (["attack.name=gaussian", "attack.k=3"], "attack.k: unknown key of attack gaussian (a key of sign_flip); valid keys: name, fraction, per, std"),
        (["algorithm.plugin=3"], "algorithm.plugin: expected a module name, got 3"),
    ],
)
def test_the_chosen_class_validates_its_own_keys(overrides: list[str], line: str):
    with pytest.raises(FltoolError) as info:
        load_config(None, overrides)
    assert info.value.lines == [f"command line: {line}"]


def test_a_misspelt_key_of_the_chosen_class_gets_a_suggestion(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm: {name: fedprox, muu: 0.1}\nserver_optimizer: {name: adam, bias_corection: true}\n")
    with pytest.raises(FltoolError) as info:
        load_config(path)
    assert info.value.lines == [
        f"{path}: algorithm.muu: unknown key; did you mean 'algorithm.mu'?",
        f"{path}: server_optimizer.bias_corection: unknown key; did you mean 'server_optimizer.bias_correction'?",
    ]


@pytest.mark.parametrize("mode", ["fedavg", "fedsgd", "fedprox"])
def test_a_legacy_mode_says_how_to_write_it_now(mode: str, tmp_path: Path):
    path = tmp_path / "old.yaml"
    path.write_text(f"mode: {mode}\n")
    with pytest.raises(FltoolError) as info:
        load_config(path)
    assert info.value.lines == [
        f"{path}: mode: {mode} is an algorithm now; write mode: federated and algorithm: {{name: {mode}}}"
    ]


def test_legacy_federated_keys_say_where_they_went(tmp_path: Path):
    path = tmp_path / "old.yaml"
    path.write_text("mode: fedprox\nfederated:\n  rounds: 3\n  mu: 0.01\n  server_lr: 1.0\n")
    with pytest.raises(FltoolError) as info:
        load_config(path)
    assert info.value.lines == [
        f"{path}: mode: fedprox is an algorithm now; write mode: federated and algorithm: {{name: fedprox}}",
        f"{path}: federated.mu: is now algorithm.mu (with algorithm.name: fedprox)",
        f"{path}: federated.server_lr: is now server_optimizer.lr",
    ]
    with pytest.raises(FltoolError) as info:
        load_config(None, ["federated.server_lr=0.5"])
    assert info.value.lines == ["command line: federated.server_lr: is now server_optimizer.lr"]


def test_a_plugin_that_does_not_exist_is_one_line_naming_file_key_and_module(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  name: clipped\n  plugin: no_such_fltool_plugin\n")
    with pytest.raises(FltoolError) as info:
        load_config(path)
    assert info.value.lines == [
        f"{path}: algorithm.plugin: cannot import 'no_such_fltool_plugin': No module named 'no_such_fltool_plugin'"
    ]


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path for a user's modules; what they register and the modules
    themselves are forgotten afterwards."""
    import sys

    ALGORITHMS.names()  # the built-ins first, so that the restored registry keeps them
    monkeypatch.setattr(ALGORITHMS, "_entries", dict(ALGORITHMS._entries))
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.endswith("_fltool_plugin"):
            del sys.modules[name]


def test_a_plugin_that_fails_to_import_is_one_line_naming_it(plugin_dir: Path):
    (plugin_dir / "broken_fltool_plugin.py").write_text("x = 1 / 0\n")
    with pytest.raises(FltoolError) as info:
        load_config(None, ["algorithm.plugin=broken_fltool_plugin"])
    assert info.value.lines == [
        "command line: algorithm.plugin: importing 'broken_fltool_plugin' failed: ZeroDivisionError: division by zero"
    ]


PLUGIN = '''
from dataclasses import dataclass, field

from fltool.algorithms.fedavg import FedAvg
from fltool.config.registry import ALGORITHMS
from fltool.config.schema import POSITIVE, AlgorithmConfig


@dataclass
class DampedConfig(AlgorithmConfig):
    damping: float = field(default=0.5, metadata=POSITIVE)


@ALGORITHMS.register("damped_fedavg", DampedConfig)
class Damped(FedAvg):
    pass
'''


def test_a_plugin_registers_an_algorithm_with_its_own_validated_keys(plugin_dir: Path):
    (plugin_dir / "damped_fltool_plugin.py").write_text(PLUGIN)
    base = ["algorithm.plugin=damped_fltool_plugin", "algorithm.name=damped_fedavg"]
    cfg = load_config(None, [*base, "algorithm.damping=0.25"])
    assert (cfg.algorithm.name, cfg.algorithm.plugin, cfg.algorithm.damping) == ("damped_fedavg", "damped_fltool_plugin", 0.25)
    assert type(cfg.algorithm).__name__ == "DampedConfig"
    assert load_config(None, base).algorithm.damping == 0.5
    with pytest.raises(FltoolError) as info:
        load_config(None, [*base, "algorithm.damping=-1", "algorithm.mu=1"])
    assert info.value.lines == [
        "command line: algorithm.mu: unknown key of algorithm damped_fedavg (a key of fedprox); valid keys: name, plugin, damping",
        "command line: algorithm.damping: must be a finite number > 0, got -1.0",
    ]
    # a dumped config names its plugin, and so loads back
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_dotted_overrides_choose_and_configure_a_section():
    cfg = load_config(CONFIGS / "fedavg_mnist.yaml", ["algorithm.name=scaffold", "algorithm.option=1"])
    assert cfg.algorithm == ScaffoldConfig(name="scaffold", option=1)
    cfg = load_config(None, ["server_optimizer.name=adam", "server_optimizer.beta1=0.5", "aggregator.name=median"])
    assert cfg.server_optimizer == AdaptiveConfig(name="adam", beta1=0.5)
    assert cfg.aggregator == AggregatorConfig(name="median")
    # the file's keys of its own algorithm stay: switching algorithm says which no longer fits
    with pytest.raises(FltoolError) as info:
        load_config(CONFIGS / "fedprox_mnist.yaml", ["algorithm.name=scaffold"])
    assert info.value.lines == [
        f"{CONFIGS / 'fedprox_mnist.yaml'}: algorithm.mu: unknown key of algorithm scaffold (a key of fedprox); valid keys: name, plugin, option"
    ]


NON_DEFAULT = {
    "algorithm": {
        "fedavg": {},
        "fedsgd": {},
        "fednova": {},
        "fedprox": {"mu": 0.25},
        "scaffold": {"option": 1},
    },
    "server_optimizer": {
        "sgd": {"lr": 0.5, "momentum": 0.9},
        "adagrad": {"lr": 0.1, "tau": 0.01},
        "adam": {"beta1": 0.8, "beta2": 0.95, "bias_correction": True},
        "yogi": {"lr": 0.003, "tau": 1e-4},
    },
    "aggregator": {
        "mean": {},
        "median": {},
        "trimmed_mean": {"beta": 0.2},
        "krum": {"f": 2},
        "multikrum": {"f": 2, "m": 5},
        "bulyan": {"f": 0},  # f = 2 would need a cohort of 11; the default's is 10
        "norm_bounded": {"clip_norm": 0.5},
    },
}


@pytest.mark.parametrize(("section", "name"), CHOICES, ids=[f"{s}={n}" for s, n in CHOICES])
def test_dump_config_of_every_choice_loads_back_identically(section: str, name: str, tmp_path: Path):
    settings = NON_DEFAULT[section][name]  # every registered name has an entry here
    cfg = config_from_dict({section: {"name": name, **settings}})
    assert all(getattr(getattr(cfg, section), key) == value for key, value in settings.items())
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg and type(getattr(again, section)) is type(getattr(cfg, section))
