from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fltool.config import Config, config_from_dict, dump_config, load_config
from fltool.config.yaml12 import Yaml12Loader, parse_yaml
from fltool.errors import FltoolError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_without_file_are_mcmahan_fedavg():
    cfg = load_config(None)
    assert cfg == Config()
    assert (cfg.mode, cfg.federated.num_clients, cfg.federated.fraction, cfg.federated.batch_size) == ("fedavg", 100, 0.1, 10)


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
    path.write_text(yaml.safe_dump({"mode": "fedsdg", "federated": {"fraction": 0, "lr": -1, "roundz": 3}}))
    with pytest.raises(FltoolError) as info:
        load_config(path)
    lines = info.value.lines
    assert len(lines) == 4
    assert all(line.startswith(f"{path}: ") for line in lines)
    joined = "\n".join(lines)
    assert "mode: must be one of fedavg, fedsgd, fedprox, ddp; got 'fedsdg'" in joined
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
    assert load_config(None, ["federated.lr=1e-3", "federated.server_lr=.5E+1"]).federated.server_lr == 5.0


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
