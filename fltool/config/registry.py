"""Registries: the named choices of a config section (algorithm, server optimizer,
aggregator), each name with its own typed config class.

The config layer reads only the config classes; what a name builds lives with it in
the upper layers (`fltool.algorithms` registers its built-ins on import). A user's
module registers more by the same decorator, named by `algorithm.plugin` or by an
entry point in the group `fltool.algorithms`, so nothing keeps a list in sync by hand.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from typing import Any, TypeVar

from fltool.errors import FltoolError

T = TypeVar("T")

BUILTINS = "fltool.algorithms"  # importing it registers every built-in choice
ENTRY_POINT_GROUP = "fltool.algorithms"


class Registry:
    """name -> (config dataclass, implementation) for one kind of choice."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, tuple[type, Any]] = {}

    def register(self, name: str, config: type) -> Callable[[T], T]:
        """Decorator: `@ALGORITHMS.register("fedprox", FedProxConfig) class FedProx: ...`."""

        def add(impl: T) -> T:
            self._entries[name] = (config, impl)
            return impl

        return add

    def names(self) -> list[str]:
        load_builtins()
        return list(self._entries)

    def config_class(self, name: str) -> type:
        load_builtins()
        return self._entries[name][0]

    def get(self, name: str) -> Any:
        load_builtins()
        if name not in self._entries:
            raise FltoolError(f"{self.kind}.name: must be one of {', '.join(self._entries)}; got {name!r}")
        return self._entries[name][1]


ALGORITHMS = Registry("algorithm")
SERVER_OPTIMIZERS = Registry("server_optimizer")
AGGREGATORS = Registry("aggregator")
ATTACKS = Registry("attack")
COMPRESSORS = Registry("compression")

_loaded = False


def load_builtins() -> None:
    """Register fltool's own choices and those of installed entry points, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module(BUILTINS)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        import_plugin(entry.module, f"entry point {entry.name!r}")  # "module" or "module:attr"


def import_plugin(module: str, where: str) -> None:
    """Import a user's module that registers choices; any failure is one line naming it."""
    load_builtins()
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise FltoolError(f"{where}: cannot import {module!r}: {exc}") from None
    except Exception as exc:  # the plugin's own bug: still one line, naming it
        raise FltoolError(f"{where}: importing {module!r} failed: {type(exc).__name__}: {exc}") from None
