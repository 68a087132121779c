"""A seeded fuzz of malformed configs and overrides through the real CLI: at least 200
inputs (syntax, types, ranges, nesting, aliases, encodings, sizes), each of which must
end in exit 2 with only `error:` lines and no traceback; a hang (an alias bomb expanded,
a read that never ends) fails the test through its timeout, not a timed assert. A mutation
that happens to stay valid is skipped (`--print-config` then prints it and exits 0),
and another is drawn."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fltool.cli import app
from fltool.config import Config, dump_config

WANTED = 200
KEYS = [
    "seed", "name", "federated.rounds", "federated.fraction", "federated.lr", "federated.num_clients",
    "federated.batch_size", "federated.engine", "aggregator.name", "algorithm.name", "dp.mode", "dp.clip_norm",
    "dp.target_epsilon", "clients.dropout", "attack.fraction", "data.partition", "data.alpha", "eval.every",
    "output.checkpoint_every", "model.name", "compression.name",
]
BAD_VALUES = [
    "-1", "0", "1e309", "-.inf", ".nan", "abc", "[1, 2]", "{a: 1}", "true", "null", "''", "9" * 400, "1.5", "-0.5",
    "0x1g", "!!python/object:os.system 1", "!!binary aGk=", "*undefined", "&a [*a]", "'" + "x" * 3000 + "'", "2**70",
    "1e300", "3.5e38",  # past float32: scaling a float32 tensor by it was a traceback mid-round
]
SYNTAX_NOISE = [":", "- ", "{", "}", "[", "]", "\t", "&", "*", "!", "|", ">", "%", "@", "`", '"', "'", "? ", "\n  ", "#"]


def valid_text() -> str:
    return dump_config(Config(name="fuzz"))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def bomb(width: int, depth: int) -> str:
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    for d in range(1, depth):
        lines.append(f"l{d}: &l{d} [{', '.join([f'*l{d - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def generate(rng: random.Random) -> tuple[bytes | None, list[str]]:
    """(file contents or None for defaults, overrides)."""
    kind = rng.choice(["syntax", "type", "override", "nesting", "alias", "encoding", "size", "section"])
    base = valid_text()
    if kind == "syntax":
        text = list(base)
        for _ in range(rng.randint(1, 4)):
            text.insert(rng.randrange(len(text)), rng.choice(SYNTAX_NOISE))
        return "".join(text).encode(), []
    if kind == "type":
        key = rng.choice(KEYS)
        return None, [f"{key}={rng.choice(BAD_VALUES)}"]
    if kind == "override":
        item = rng.choice(["=5", "federated..rounds=1", "nokey", "federated.rounds", f"{rng.choice(KEYS)}.x.y=1",
                           "federated=[1]", "dp={mode: secret}", "x" * 5000 + "=1", "seed=1\x00"])
        return None, [item]
    if kind == "nesting":
        return f"federated: {{rounds: {nested(rng.randint(200, 20000))}}}\n".encode(), []
    if kind == "alias":
        if rng.random() < 0.5:
            return bomb(rng.randint(6, 12), rng.randint(6, 10)).encode(), []
        return f"federated: *missing{rng.randint(0, 9)}\n".encode(), []
    if kind == "encoding":
        return rng.choice([
            b"\xff\xfe" + base.encode("utf-16-le"), b"name: \xff\xfe\n", base.encode()[:50] + b"\x80\x81" + base.encode()[50:],
            b"\x00" * 64, "name: caf\u00e9\nseed: \u0661\n".encode(),
        ]), []
    if kind == "size":
        return rng.choice([
            ("name: " + "y" * rng.randint(10_000, 300_000) + "\n").encode(),
            "".join(f"k{i}: {i}\n" for i in range(rng.randint(1000, 20_000))).encode(),
            ("federated:\n" + "".join(f"  r{i}: 1\n" for i in range(rng.randint(100, 3000)))).encode(),
            b"x" * (2 << 20),
        ]), []
    section = rng.choice(["federated", "dp", "aggregator", "data", "clients", "eval"])
    return f"{section}: {rng.choice(['[1, 2]', '5', 'abc', '{name: {}}', 'null', '{rounds: {a: 1}}'])}\n".encode(), []


@pytest.mark.timeout(60)  # the whole fuzz takes seconds; a hang stops here
def test_two_hundred_malformed_inputs_exit_2_in_one_line_each(tmp_path: Path):
    rng = random.Random(1234)
    runner = CliRunner()
    checked = skipped = 0
    while checked < WANTED:
        content, overrides = generate(rng)
        args = ["train", "--print-config"]
        if content is not None:
            path = tmp_path / f"case{checked + skipped}.yaml"
            path.write_bytes(content)
            args.append(str(path))
        else:
            args.append(str(tmp_path / "base.yaml"))
            (tmp_path / "base.yaml").write_text(valid_text())
        result = runner.invoke(app, [*args, *overrides])
        if result.exit_code == 0:  # the mutation left a valid config
            skipped += 1
            continue
        case = (content[:200] if content else None, [o[:200] for o in overrides])
        assert result.exit_code == 2, (case, result.output[-2000:], result.exception)
        lines = result.stderr.strip().splitlines()
        assert lines and all(line.startswith("error: ") for line in lines), (case, lines[:5])
        assert len(lines) <= 40 and "Traceback" not in result.output, case
        assert all(len(line) <= 1000 for line in lines), (case, max(map(len, lines)))
        checked += 1
    assert skipped < WANTED, skipped  # the generator mostly makes bad inputs
