"""Shell completion of config keys after the YAML file (`fltool train CONFIG.yaml fed<TAB>`).

Fast and torch-free, as a Tab press must be: the keys are the schema's (from the
dataclass classes, not instances: a section chosen by name, such as `algorithm`, offers
its base keys) plus every key the YAML file itself sets (an algorithm's own settings)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


def schema_keys() -> set[str]:
    from fltool.config import schema

    def walk(cls: type, prefix: str) -> set[str]:
        keys: set[str] = set()
        for f in dataclasses.fields(cls):
            inner = getattr(schema, f.type, None) if isinstance(f.type, str) else f.type
            if isinstance(inner, type) and dataclasses.is_dataclass(inner):
                keys |= walk(inner, f"{prefix}{f.name}.")
            else:
                keys.add(f"{prefix}{f.name}")
        return keys

    return walk(schema.Config, "")


def file_keys(path: str | None) -> set[str]:
    if not path:
        return set()
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except Exception:  # a Tab press must never fail: an unreadable file offers nothing
        return set()

    def walk(tree: Any, prefix: str) -> set[str]:
        if not isinstance(tree, dict):
            return set()
        keys: set[str] = set()
        for key, value in tree.items():
            keys |= walk(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}"}
        return keys

    return walk(raw, "")


def complete_keys(incomplete: str, config: str | None) -> list[str]:
    """`key=` for every config key starting with `incomplete`; nothing once a value is begun."""
    if "=" in incomplete:
        return []
    return sorted(f"{k}=" for k in schema_keys() | file_keys(config) if k.startswith(incomplete))
