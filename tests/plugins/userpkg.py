"""A user's package outside fltool, written into a tmp folder on sys.path by the tests."""

from __future__ import annotations

import itertools
import sys
import textwrap
from pathlib import Path

import pytest

_names = itertools.count()

DATA = '''
import torch


def writers(n_train=300, n_test=60, clients=(50, 30, 3, 2), as_dataset=False):
    """Four writers of (3, 4, 4) inputs; a natural client id per training example."""
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(5, 3, 4, 4, generator=g)
    def split(n):
        y = torch.randint(5, (n,), generator=g)
        return protos[y] + 0.5 * torch.randn(n, 3, 4, 4, generator=g), y
    train, test = split(sum(clients)), split(n_test)
    ids = torch.cat([torch.full((n,), 10 * (k + 1)) for k, n in enumerate(clients)])
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    if as_dataset:
        train = torch.utils.data.TensorDataset(*train)
    return train, test, ids


def as_mapping():
    train, test, ids = writers()
    return {"train": train, "test": test, "clients": ids, "num_classes": 7}


def wrong_return():
    return 42


def wrong_shapes():
    return (torch.zeros(10, 3), torch.zeros(9, dtype=torch.long)), (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))


NOT_CALLABLE = 3
'''


def make_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> str:
    """A fresh package (a new name each time: modules stay cached in sys.modules) holding
    `files` ({module name: source}); returns its name."""
    name = f"userpkg{next(_names)}_{abs(hash(str(tmp_path))) % 10**6}"
    pkg = tmp_path / "site" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for module, source in files.items():
        (pkg / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    sys.modules.pop(name, None)
    return name
