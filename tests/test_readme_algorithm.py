"""README's "Write an algorithm" runs as printed: its myalgo.py and YAML, written out as a
user would, train through `fltool train` with PYTHONPATH naming the module's folder,
and the updates really are clipped."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fltool.cli import app
from fltool.config import config_from_dict
from fltool.data import load_dataset
from fltool.models.setup import seeded_model

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Write an algorithm"

# tiny synthetic data instead of MNIST; everything else (partition, model, K, C, lr) is the YAML's
SYNTHETIC = [
    "data.dataset=synthetic",
    "data.synthetic.train_size=600",
    "data.synthetic.test_size=100",
    "data.synthetic.shape=[1,8,8]",
    "device=cpu",
]
MAX_NORM = 0.005  # far below a client's update (one step of lr 0.05): every client is clipped


def section() -> str:
    text = (REPO / "README.md").read_text()
    assert text.count(HEADING + "\n") == 1, f"README.md needs exactly one '{HEADING}' section"
    body = text.split(HEADING + "\n", 1)[1]
    return re.split(r"^## ", body, maxsplit=1, flags=re.M)[0]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", section(), flags=re.M | re.S)


def norm(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| over all parameters together."""
    return torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)).item()


def model_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    """The user's folder: myalgo.py and clipped.yaml from the README, nothing else."""
    (python,) = blocks("python")
    (config,) = blocks("yaml")
    (tmp_path / "myalgo.py").write_text(python)
    (tmp_path / "clipped.yaml").write_text(config)
    return tmp_path


# the console script, as the README runs it: unlike `python -m fltool`, it does not put the
# working directory on sys.path, so the module is found only through PYTHONPATH
FLTOOL = Path(sys.executable).with_name("fltool")


def fltool(*args: str, cwd: Path, pythonpath: Path | None) -> subprocess.CompletedProcess:
    assert FLTOOL.is_file(), f"{FLTOOL}: the fltool console script is not installed"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    env["OMP_NUM_THREADS"] = "1"  # tiny tensors: threads only contend on a shared CPU
    return subprocess.run(
        [str(FLTOOL), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_the_readme_example_is_complete_and_short():
    (python,) = blocks("python")
    assert len(python.splitlines()) <= 60
    assert '@ALGORITHMS.register("clipped_fedavg", ClippedConfig)' in python
    assert "max_norm: float" in python
    (config,) = blocks("yaml")
    assert yaml.safe_load(config)["algorithm"] == {"name": "clipped_fedavg", "plugin": "myalgo", "max_norm": 1.0}
    commands = "\n".join(blocks("bash"))
    assert "PYTHONPATH=. fltool train clipped.yaml" in commands


def test_the_readme_algorithm_trains_and_clips_every_round(user_dir: Path):
    run_dir = user_dir / "run"
    common = [*SYNTHETIC, f"algorithm.max_norm={MAX_NORM}", f"output.run_dir={run_dir}"]
    first = fltool("train", "clipped.yaml", *common, "federated.rounds=1", cwd=user_dir, pythonpath=user_dir)
    assert first.returncode == 0, first.stderr
    w1 = model_of(run_dir)
    # the run's stored config names the plugin, so a resume imports it again
    second = fltool("train", "--resume", str(run_dir), "federated.rounds=2", cwd=user_dir, pythonpath=user_dir)
    assert second.returncode == 0, second.stderr
    w2 = model_of(run_dir)

    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert stored["algorithm"] == {"name": "clipped_fedavg", "plugin": "myalgo", "max_norm": MAX_NORM}
    cfg = config_from_dict({k: v for k, v in stored.items() if k != "algorithm"})
    w0 = {k: v.detach() for k, v in seeded_model(cfg, load_dataset(cfg.data, cfg.seed), torch.device("cpu")).state_dict().items()}

    # The new global model is w + a weighted mean of updates of norm <= max_norm each: it
    # moves by at most max_norm per round. Every client is clipped to max_norm itself, and
    # the round's 10 clients share some direction, so their mean keeps a good part of it
    # (observed 0.44 and 0.41 max_norm; clipping the cohort's updates together, not each client's,
    # would leave about max_norm / sqrt(10) x that).
    for before, after in ((w0, w1), (w1, w2)):
        moved = norm(after, before)
        assert 0.25 * MAX_NORM < moved <= MAX_NORM * (1 + 1e-5), moved

    # Unclipped, the same round moves the model far more.
    plain = user_dir / "plain.yaml"
    plain.write_text(yaml.safe_dump({**yaml.safe_load((user_dir / "clipped.yaml").read_text()), "algorithm": {"name": "fedavg"}}))
    result = CliRunner().invoke(
        app, ["train", str(plain), *SYNTHETIC, "federated.rounds=1", f"output.run_dir={user_dir / 'plain'}"]
    )
    assert result.exit_code == 0, result.output
    assert norm(model_of(user_dir / "plain"), w0) > 5 * MAX_NORM  # observed 12.7 x

    # `fltool eval` reads the stored config too: with the module importable it evaluates,
    # without it it says which module is missing, in one line
    ev = fltool("eval", str(run_dir), "--json", cwd=user_dir, pythonpath=user_dir)
    assert ev.returncode == 0, ev.stderr
    missing = fltool("eval", str(run_dir), "--json", cwd=REPO, pythonpath=None)
    assert missing.returncode == 2
    (line,) = missing.stderr.strip().splitlines()
    assert "algorithm.plugin: cannot import 'myalgo': No module named 'myalgo'" in line, line


def test_with_max_norm_above_every_update_it_is_fedavg_exactly(user_dir: Path):
    """min(1, max_norm / ||w_k - w||) is exactly 1: the same bits as FedAvg."""
    runs = {}
    for name, algorithm in [("clipped", ["algorithm.max_norm=1e30"]), ("fedavg", ["algorithm.name=fedavg"])]:
        config = user_dir / f"{name}.yaml"
        if name == "fedavg":
            raw = yaml.safe_load((user_dir / "clipped.yaml").read_text())
            config.write_text(yaml.safe_dump({**raw, "algorithm": {"name": "fedavg"}}))
            algorithm = []
        args = ["train", config.name, *SYNTHETIC, *algorithm, "federated.rounds=2", f"output.run_dir={user_dir / name}"]
        done = fltool(*args, cwd=user_dir, pythonpath=user_dir)
        assert done.returncode == 0, done.stderr
        runs[name] = model_of(user_dir / name)
    assert all(torch.equal(runs["clipped"][k], runs["fedavg"][k]) for k in runs["fedavg"])


def test_a_bad_max_norm_is_refused_like_fltools_own_keys(user_dir: Path):
    done = fltool("train", "clipped.yaml", "algorithm.max_norm=-1", "--print-config", cwd=user_dir, pythonpath=user_dir)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: command line: algorithm.max_norm: must be a finite number > 0, got -1.0"
    without = fltool("train", "clipped.yaml", "--print-config", cwd=user_dir, pythonpath=None)  # no PYTHONPATH=.
    assert without.returncode == 2
    assert without.stderr.strip() == "error: clipped.yaml: algorithm.plugin: cannot import 'myalgo': No module named 'myalgo'"


@pytest.mark.parametrize("target", ["readme", "module:attr"])
def test_an_entry_point_registers_the_algorithm_without_plugin(target: str, user_dir: Path, tmp_path_factory):
    """An installed distribution's entry point in the group fltool.algorithms (as the
    README's pyproject snippet declares) is imported before any config is read."""
    (toml,) = blocks("toml")
    entry = re.search(r'^(\w+) = "([\w.:]+)"$', toml, flags=re.M)
    assert toml.startswith('[project.entry-points."fltool.algorithms"]') and entry
    name, value = entry[1], entry[2] if target == "readme" else "myalgo:ClippedFedAvg"
    site = tmp_path_factory.mktemp("site")
    shutil.copy(user_dir / "myalgo.py", site / "myalgo.py")
    dist = site / "myalgo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myalgo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[fltool.algorithms]\n{name} = {value}\n")
    raw = yaml.safe_load((user_dir / "clipped.yaml").read_text())
    raw["algorithm"] = {"name": "clipped_fedavg", "max_norm": 0.5}  # no plugin key
    (user_dir / "ep.yaml").write_text(yaml.safe_dump(raw))
    shown = fltool("train", "ep.yaml", "--print-config", cwd=user_dir, pythonpath=site)
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["algorithm"] == {"name": "clipped_fedavg", "plugin": None, "max_norm": 0.5}


@pytest.fixture
def myalgo(user_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """The README's module imported here; the registry and sys.modules forget it after."""
    from fltool.config.registry import ALGORITHMS

    ALGORITHMS.names()  # the built-ins first, so that the restored registry keeps them
    monkeypatch.setattr(ALGORITHMS, "_entries", dict(ALGORITHMS._entries))
    monkeypatch.syspath_prepend(str(user_dir))
    monkeypatch.delitem(sys.modules, "myalgo", raising=False)
    import myalgo as module

    yield module
    sys.modules.pop("myalgo", None)


def test_each_client_is_clipped_to_max_norm_on_its_own(myalgo):
    """client_upload on a stack of 5 clients (one engine chunk): each update over all
    parameters is scaled to norm min(||w_k - w||, max_norm), its direction kept."""
    from fltool.algorithms import ALGORITHMS, ClientInfo
    from fltool.config.schema import FederatedConfig

    assert ALGORITHMS.get("clipped_fedavg") is myalgo.ClippedFedAvg
    algorithm = myalgo.ClippedFedAvg(myalgo.ClippedConfig(name="clipped_fedavg", max_norm=1.0), FederatedConfig())
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (4,), (2, 4)]
    global_params = [torch.randn(s, generator=g) for s in shapes]
    scales = torch.tensor([0.01, 0.2, 0.9, 3.0, 50.0])  # clients below and above max_norm
    raw = [torch.randn(5, *s, generator=g) for s in shapes]
    raw_norms = torch.sqrt(sum(r.reshape(5, -1).square().sum(1) for r in raw))
    deltas = [r * (scales / raw_norms).view(-1, *[1] * len(s)) for r, s in zip(raw, shapes)]  # ||delta_k|| = scales[k]
    # the vectorized engine may hand a weight stack transposed per client: layout must not matter
    params = [g_.unsqueeze(0) + d for g_, d in zip(global_params, deltas)]
    params[0] = params[0].transpose(1, 2).contiguous().transpose(1, 2)
    info = ClientInfo(ids=torch.arange(5), n=torch.tensor([3.0, 1, 4, 1, 5]), steps=torch.ones(5))
    upload = algorithm.client_upload(global_params, params, {}, info)
    out_norms = torch.sqrt(sum(d.reshape(5, -1).square().sum(1) for d in upload.delta))
    torch.testing.assert_close(out_norms, scales.clamp(max=1.0))
    for d, expected in zip(upload.delta, deltas):
        kept = (scales.clamp(max=1.0) / scales).view(-1, *[1] * (d.dim() - 1))
        torch.testing.assert_close(d, expected * kept)
    assert torch.equal(upload.weight, info.n)
