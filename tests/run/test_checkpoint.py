"""Checkpoint files that are not what fltool wrote -- text, foreign pickles, corrupt
archives, fields of the wrong type, weights of another model -- and run directories
with a broken config.yaml or last.pt: `fltool eval` and `fltool train --resume` refuse
them in one line naming the file (exit 2, no traceback, no warnings), and a refused
resume leaves the run directory exactly as it was."""

from __future__ import annotations

import argparse
import os
import io
import pickle
import random
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fltool.cli import app
from fltool.config import dump_config
from fltool.run.checkpoint import check_weights_fit, first_sentence, load_checkpoint
from fltool.run.rundir import last_checkpoint
from fltool.errors import FltoolError


@pytest.fixture
def run_dir(make_config, tmp_path: Path) -> Path:
    """A finished 1-round run (of 3 configured: a resume would train on)."""
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(dump_config(make_config(output={"run_dir": str(tmp_path / "run")})))
    result = CliRunner().invoke(app, ["train", str(cfg_path), "federated.rounds=1"])
    assert result.exit_code == 0, result.output
    return tmp_path / "run"


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def refused(args: list[str]) -> str:
    """Run the CLI, expect a refusal: exit 2, one `error:` line on stderr, no warning; the line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    assert not caught, [str(w.message) for w in caught]
    return line


def refused_resume(run_dir: Path, *overrides: str) -> str:
    before = snapshot(run_dir)
    line = refused(["train", "--resume", str(run_dir), "federated.rounds=3", *overrides])
    assert snapshot(run_dir) == before
    return line


def rewrite(path: Path, **fields: object) -> None:
    """Replace fields of the checkpoint at `path` (torch.save, as fltool writes it)."""
    state = torch.load(path, weights_only=True)
    state.update(fields)
    torch.save(state, path)


# -- files that are no torch checkpoint, or a corrupt one ------------------------------

NOT_TORCH = {
    "text": b"hello world\n",  # torch.load: KeyError: 101
    "yaml": b"name: t\nmode: federated\n",  # torch.load: its weights_only advice
    "pickle-protocol-4": pickle.dumps({"a": 1}, protocol=4),  # torch.load: a UserWarning first
    "pickle-protocol-2": pickle.dumps({"a": 1}, protocol=2),
    "json": b'{"format": "fltool.checkpoint"}',
}


@pytest.mark.parametrize("kind", NOT_TORCH)
def test_eval_and_resume_say_plainly_that_a_file_is_no_torch_checkpoint(kind: str, run_dir: Path, tmp_path: Path):
    path = tmp_path / "x.pt"
    path.write_bytes(NOT_TORCH[kind])
    line = refused(["eval", str(path)])
    assert line == f"error: {path}: not a readable checkpoint (not a torch checkpoint file)"
    last_checkpoint(run_dir).write_bytes(NOT_TORCH[kind])
    line = refused_resume(run_dir)
    assert line == f"error: {last_checkpoint(run_dir)}: not a readable checkpoint (not a torch checkpoint file)"


def test_an_empty_file_is_said_to_be_empty(run_dir: Path):
    last_checkpoint(run_dir).write_bytes(b"")
    line = refused_resume(run_dir)
    assert line == f"error: {last_checkpoint(run_dir)}: not a readable checkpoint (the file is empty)"
    assert refused(["eval", str(run_dir)]) == line


def test_a_torch_file_holding_foreign_objects_is_not_an_fltool_checkpoint(tmp_path: Path):
    path = tmp_path / "foreign.pt"
    torch.save({"args": argparse.Namespace(lr=0.1), "model": {}}, path)
    line = refused(["eval", str(path)])
    assert line == f"error: {path}: refused: it holds a pickled Python object (argparse.Namespace), not plain tensors"
    assert "weights_only" not in line


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_carrying_pickled_code_is_refused_as_such_and_never_runs(tmp_path: Path):
    path = tmp_path / "evil.pt"
    torch.save({"model": RunsCode()}, path)
    line = refused(["eval", str(path)])
    assert line == f"error: {path}: refused: it holds a pickled Python object ({os.system.__module__}.system), not plain tensors"
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def mutations(good: bytes, count: int, seed: int) -> list[bytes]:
    """Bit flips, cuts and insertions in a checkpoint's pickle (inside an intact zip)
    and in the raw archive: what a bad disk or a botched copy leaves."""
    archive = zipfile.ZipFile(io.BytesIO(good))
    records = {name: archive.read(name) for name in archive.namelist()}
    pkl = next(name for name in records if name.endswith("data.pkl"))
    rng = random.Random(seed)
    out = []
    for i in range(count):
        b = bytearray(records[pkl] if i % 2 else good)
        for _ in range(rng.choice([1, 2, 3])):
            j = rng.randrange(min(len(b), 3000))
            op = rng.random()
            if op < 0.6:
                b[j] = rng.randrange(256)
            elif op < 0.8:
                del b[j : j + rng.randrange(1, 8)]
            else:
                b[j:j] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4)))
        if i % 2:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
                for name, data in records.items():
                    z.writestr(name, bytes(b) if name == pkl else data)
            b = bytearray(buf.getvalue())
        elif rng.random() < 0.2:
            b = b[: rng.randrange(len(b))]
        out.append(bytes(b))
    return out


def test_corrupt_checkpoints_fail_in_one_error_never_an_exception_from_torch(run_dir: Path, tmp_path: Path):
    # torch.load raised KeyError, IndexError, TypeError, AttributeError, AssertionError,
    # UnicodeDecodeError, OSError and EOFError on such files, besides its own errors
    good = last_checkpoint(run_dir).read_bytes()
    path = tmp_path / "mutant.pt"
    outcomes = set()
    for data in mutations(good, 300, seed=0):
        path.write_bytes(data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                ckpt = load_checkpoint(path)
                check_weights_fit(ckpt, path)
                outcomes.add("loads")
            except FltoolError as exc:
                assert all(line.startswith(f"{path}") for line in exc.lines), exc.lines
                assert not caught, [str(w.message) for w in caught]
                outcomes.add(exc.lines[0].split(": ")[1].split(" (")[0])
    assert "not a readable checkpoint" in outcomes


def test_a_truncated_checkpoint_says_so_in_a_whole_sentence(run_dir: Path, tmp_path: Path):
    """torch's zip reader appends "This is an internal miniz error. If you are seeing
    this error, there is a high ..." -- cut at 160 characters, mid-sentence, before."""
    path = tmp_path / "truncated.pt"
    path.write_bytes(last_checkpoint(run_dir).read_bytes()[:1000])
    with pytest.raises(FltoolError) as info:
        load_checkpoint(path)
    assert info.value.lines == [
        f"{path}: not a readable checkpoint (corrupt or truncated: "
        "PytorchStreamReader failed reading zip archive: failed finding central directory)"
    ]


def test_first_sentence_cuts_at_a_word():
    assert first_sentence("Bad thing happened. Try again later.\nTraceback", 80) == "Bad thing happened"
    assert first_sentence("version 2.14.1 is fine. More", 80) == "version 2.14.1 is fine"
    assert first_sentence("word " * 40, 30) == "word word word word word word ..."
    assert first_sentence("", 10) == ""


def test_a_text_file_as_last_checkpoint_is_refused_by_resume_in_one_line(run_dir: Path):
    last_checkpoint(run_dir).write_text("hello world\n")
    assert "not a readable checkpoint" in refused_resume(run_dir)


# -- fields of the wrong type ----------------------------------------------------------

BAD_FIELDS = [
    ("model", torch.zeros(3), "'model' must be a state dict (a mapping of names to tensors), got a float32 tensor of shape [3]"),
    ("model", [torch.zeros(3)], "'model' must be a state dict"),
    ("model", {"0.weight": "abc"}, "'model['0.weight']' must be a dense real tensor, got 'abc'"),
    ("model", {"0.weight": torch.zeros(2, 2).to_sparse()}, "'model['0.weight']' must be a dense real tensor, got a sparse_coo"),
    ("model", {3: torch.zeros(2)}, "'model' must be a state dict (a mapping of names to tensors), got the key 3"),
    ("round", "abc", "'round' must be the last completed round (an integer >= 0), got 'abc'"),
    ("round", -5, "'round' must be the last completed round (an integer >= 0), got -5"),
    ("round", True, "'round' must be the last completed round (an integer >= 0), got True"),
    ("round", 1.0, "'round' must be the last completed round (an integer >= 0), got 1.0"),
    ("metrics", "rows", "'metrics' must be a list of metric rows (mappings), got 'rows'"),
    ("metrics", [{"round": 1}, 2], "'metrics' must be a list of metric rows (mappings), got row 2: 2"),
    ("best_accuracy", "0.9", "'best_accuracy' must be an accuracy in [0, 1] or null, got '0.9'"),
    ("best_accuracy", True, "'best_accuracy' must be an accuracy in [0, 1] or null, got True"),
    ("best_accuracy", 90.0, "'best_accuracy' must be an accuracy in [0, 1] or null, got 90.0"),
    ("extra", [1], "'extra' must be a mapping, got [1]"),
    ("config", {}, "'config' must be the run's config (a non-empty mapping), got {}"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_FIELDS, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD_FIELDS)])
def test_load_checkpoint_names_a_field_of_the_wrong_type(key: str, value: object, message: str, run_dir: Path):
    path = last_checkpoint(run_dir)
    rewrite(path, **{key: value})
    with pytest.raises(FltoolError) as exc:
        load_checkpoint(path)
    (line,) = exc.value.lines
    assert line.startswith(f"{path}: checkpoint field {message}"), line


def test_a_version_that_is_a_bool_is_not_version_1(run_dir: Path):
    path = last_checkpoint(run_dir)
    rewrite(path, version=True)
    with pytest.raises(FltoolError, match=r"checkpoint version True is not supported \(expected 1\)"):
        load_checkpoint(path)


@pytest.mark.parametrize(("key", "value"), [("model", torch.zeros(3)), ("model", [1, 2]), ("round", "abc"), ("round", -5)])
def test_eval_and_resume_refuse_a_field_of_the_wrong_type_in_one_line(key: str, value: object, run_dir: Path):
    rewrite(last_checkpoint(run_dir), **{key: value})
    prefix = f"error: {last_checkpoint(run_dir)}: checkpoint field '{key}' must be"
    assert refused(["eval", str(run_dir)]).startswith(prefix)
    assert refused_resume(run_dir).startswith(prefix)  # round -5 trained "round -4/3"


# -- weights of another model ----------------------------------------------------------


def test_resume_and_eval_refuse_weights_that_do_not_fit_the_model_alike(run_dir: Path):
    path = last_checkpoint(run_dir)
    good = torch.load(path, weights_only=True)["model"]
    first = next(iter(good))
    cases = [
        ({**good, first: torch.zeros(3, 3)}, f"{first} has shape [3, 3], the model's is {list(good[first].shape)}"),
        ({**good, "extra.weight": torch.zeros(2)}, "unexpected extra.weight"),
        ({k: v for k, v in good.items() if k != first}, f"missing {first}"),
    ]
    for model, problem in cases:
        rewrite(path, model=model)
        expected = f"error: {path}: model weights do not match model 'mlp': {problem}"
        assert refused_resume(run_dir) == expected
        assert refused(["eval", str(path)]) == expected


def test_resume_of_a_ddp_checkpoint_without_optimizer_state_is_refused(make_config, tmp_path: Path):
    cfg_path = tmp_path / "ddp.yaml"
    cfg = make_config(mode="ddp", ddp={"epochs": 1, "batch_size": 32}, output={"run_dir": str(tmp_path / "run")})
    cfg_path.write_text(dump_config(cfg))
    assert CliRunner().invoke(app, ["train", str(cfg_path)]).exit_code == 0
    path = last_checkpoint(tmp_path / "run")
    extra = torch.load(path, weights_only=True)["extra"]
    rewrite(path, extra={k: v for k, v in extra.items() if k != "optimizer"})
    before = snapshot(tmp_path / "run")
    line = refused(["train", "--resume", str(tmp_path / "run"), "ddp.epochs=2"])
    assert line == f"error: {path}: a DDP checkpoint needs the optimizer and scheduler state in 'extra'; it lacks optimizer"
    assert snapshot(tmp_path / "run") == before


# -- the run directory's config.yaml and last.pt ---------------------------------------


@pytest.mark.parametrize("text", ["", "# nothing here\n", "null\n", "{}\n"])
def test_resume_says_that_the_runs_config_is_empty(text: str, run_dir: Path):
    (run_dir / "config.yaml").write_text(text)
    line = refused_resume(run_dir)
    assert line == f"error: {run_dir / 'config.yaml'}: is empty; a run's config.yaml holds the config it was trained with"


def test_resume_says_that_the_runs_config_is_no_mapping(run_dir: Path):
    (run_dir / "config.yaml").write_text("[1, 2]\n")
    line = refused_resume(run_dir)
    assert line == f"error: {run_dir / 'config.yaml'}: top level must be a mapping of keys, got list"


def test_a_directory_in_place_of_the_last_checkpoint_is_named_as_such(run_dir: Path):
    last = last_checkpoint(run_dir)
    last.unlink()
    last.mkdir()
    (last / "inside").write_text("x")
    assert refused_resume(run_dir) == f"error: {last}: is a directory, not a checkpoint file"
    with pytest.raises(FltoolError, match="is a directory, not a checkpoint file"):
        load_checkpoint(last)


def test_a_good_checkpoint_still_loads_and_resumes(run_dir: Path):
    ckpt = load_checkpoint(last_checkpoint(run_dir))
    assert ckpt.round == 1 and isinstance(ckpt.best_accuracy, float)
    check_weights_fit(ckpt, last_checkpoint(run_dir))
    result = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "federated.rounds=2"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(last_checkpoint(run_dir)).round == 2


@pytest.mark.parametrize("cap", [0, -1, 2.0, "2", True])
def test_a_bad_chunk_cap_is_named(cap, make_config, tmp_path):
    from fltool.run.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
    from fltool.models import build_model

    cfg = make_config()
    path = tmp_path / "c.pt"
    save_checkpoint(make_checkpoint(cfg, build_model("mlp", (1, 8, 8), 10), 1, [], None, {"chunk_cap": cap}), path)
    with pytest.raises(FltoolError, match=r"field 'extra\['chunk_cap'\]' must be a number of clients >= 1 or null"):
        load_checkpoint(path)


# -- the algorithm state in 'extra' (federated runs) -----------------------------------


def test_a_federated_checkpoint_carries_the_algorithm_state(run_dir: Path):
    extra = torch.load(last_checkpoint(run_dir), weights_only=True)["extra"]
    assert extra == {"algorithm": {"server": {}, "clients": {}, "optimizer": {}}}  # FedAvg, server sgd: no state


@pytest.mark.parametrize(
    ("algorithm", "line"),
    [
        ({"server": {}, "clients": {}}, "checkpoint field 'extra[\"algorithm\"]' is not this run's algorithm state"),
        (
            {"server": {"c": [torch.zeros(3)]}, "clients": {}, "optimizer": {}},
            "checkpoint field 'extra[\"algorithm\"][\"server\"]' does not match this run's algorithm state",
        ),
    ],
    ids=["a part missing", "state of another algorithm"],
)
def test_resume_refuses_algorithm_state_that_is_not_this_runs(algorithm, line: str, run_dir: Path):
    path = last_checkpoint(run_dir)
    state = torch.load(path, weights_only=True)
    state["extra"] = {} if algorithm is None else {"algorithm": algorithm}
    torch.save(state, path)
    before = snapshot(run_dir)
    assert refused(["train", "--resume", str(run_dir)]) == f"error: {path}: {line}"
    assert snapshot(run_dir) == before


def test_a_refused_algorithm_state_leaves_the_run_as_it_was_with_overrides(run_dir: Path):
    path = last_checkpoint(run_dir)
    rewrite(path, extra={"algorithm": {"server": {"c": [torch.zeros(3)]}, "clients": {}, "optimizer": {}}})
    line = refused_resume(run_dir)  # with federated.rounds=3
    assert line == f"error: {path}: checkpoint field 'extra[\"algorithm\"][\"server\"]' does not match this run's algorithm state"


def test_a_run_from_before_algorithm_sections_still_resumes_and_evaluates(run_dir: Path):
    """Its config.yaml and checkpoint say mode: fedavg and federated.server_lr, and the
    checkpoint has no algorithm state (FedAvg keeps none): read in today's spelling."""
    import yaml

    config = run_dir / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    for key in ("algorithm", "server_optimizer", "aggregator"):
        raw.pop(key)
    raw["mode"] = "fedavg"
    raw["federated"]["server_lr"] = 1.0
    config.write_text(yaml.safe_dump(raw))
    path = last_checkpoint(run_dir)
    state = torch.load(path, weights_only=True)
    state["config"], state["extra"] = raw, {}
    torch.save(state, path)
    assert CliRunner().invoke(app, ["eval", str(path), "--json"]).exit_code == 0
    more = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "federated.rounds=2"])
    assert more.exit_code == 0, more.output
    assert torch.load(path, weights_only=True)["round"] == 2
