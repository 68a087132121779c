"""YAML -> validated `Config`, with dotted command-line overrides.

Every problem is collected before failing, so a user fixes a file in one pass. Each
message names the source (file or command line), the dotted key, and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import stat
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from fltool.config import registry
from fltool.config.checks import cross_checks
from fltool.config.messages import cut, show
from fltool.config.schema import REGISTRY_SECTIONS, Config
from fltool.config.yaml12 import DuplicateKeys, Yaml12Dumper, parse_yaml
from fltool.errors import FltoolError

INT_MAX = 2**63 - 1  # torch indexes and counts with int64; a larger count fails deep inside it
FLOAT32_MAX = 3.4028234663852886e38

# settings that moved when the algorithm became its own section: the message says where
LEGACY_MODES = ("fedavg", "fedsgd", "fedprox")
RENAMED = {
    "federated.mu": "algorithm.mu (with algorithm.name: fedprox)",
    "federated.server_lr": "server_optimizer.lr",
}

def load_config(path: str | Path | None, overrides: list[str] | None = None, stored: bool = False) -> Config:
    """Read `path` (or start from defaults when None), apply `key=value` overrides, validate.
    `stored`: a config fltool wrote (a run's config.yaml), whose older spellings are
    read as the new ones (`upgrade_stored`); a user's file gets an error naming them."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        raw = read_yaml_mapping(Path(path))
        if stored:
            raw = upgrade_stored(raw)
    cli_errors: list[str] = []
    provenance: dict[str, str] = {}
    for item in overrides or []:
        try:
            key, value = parse_override(item)
            _set_dotted(raw, key, value, provenance)
        except FltoolError as exc:
            cli_errors.extend(exc.lines)
            continue
        provenance[key] = "command line"
    return config_from_dict(raw, source, provenance, cli_errors)


MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; reading gigabytes would look like a hang


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        info = path.stat()  # before opening: opening a FIFO blocks until a writer comes
    except FileNotFoundError:
        raise FltoolError(f"{path}: no such file") from None
    except OSError as exc:
        raise FltoolError(f"{path}: cannot read: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise FltoolError(f"{path}: is a directory, expected a YAML file")
    if not stat.S_ISREG(info.st_mode):
        raise FltoolError(f"{path}: not a regular file (a FIFO, socket or device), expected a YAML file")
    if info.st_size > MAX_CONFIG_BYTES:
        raise FltoolError(f"{path}: {info.st_size:,} bytes, more than the {MAX_CONFIG_BYTES:,} a config may have")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FltoolError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FltoolError(f"{path}: is a directory, expected a YAML file") from None
    except OSError as exc:
        raise FltoolError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise FltoolError(f"{path}: not a UTF-8 text file") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        if _too_deep(exc):
            raise FltoolError(f"{path}: invalid YAML: nested too deeply") from None
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise FltoolError(f"{path}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise FltoolError(f"{path}: invalid YAML: nested too deeply") from None
    except DuplicateKeys as exc:
        raise FltoolError(
            *(f"{path}: {key}: duplicate key (line {line}); each key may appear once" for key, line in exc.found)
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FltoolError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _too_deep(exc: yaml.YAMLError) -> bool:
    """libyaml's own depth limit, which the pure-Python parser meets as a RecursionError."""
    return "nesting depth" in str(getattr(exc, "problem", None) or exc)


def upgrade_stored(raw: dict[str, Any]) -> dict[str, Any]:
    """A config stored by an fltool from before algorithms had their own section (mode:
    fedavg|fedsgd|fedprox, federated.mu, federated.server_lr), in today's spelling, so
    its runs still resume and its checkpoints still evaluate."""
    mode = raw.get("mode")
    if mode not in LEGACY_MODES:
        return raw
    fed = dict(raw.get("federated") or {})
    mu, server_lr = fed.pop("mu", None), fed.pop("server_lr", None)
    algorithm: dict[str, Any] = {"name": mode}
    if mode == "fedprox" and mu is not None:
        algorithm["mu"] = mu
    upgraded = {**raw, "mode": "federated", "federated": fed, "algorithm": algorithm}
    if server_lr is not None:
        upgraded["server_optimizer"] = {"name": "sgd", "lr": server_lr}
    return upgraded


def parse_override(item: str) -> tuple[str, Any]:
    """`federated.rounds=5` -> ("federated.rounds", 5); the value is typed as YAML."""
    try:
        item.encode()
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise FltoolError(f"command line: override '{ascii(item)[1:-1]}' is not valid UTF-8 text") from None
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise FltoolError(f"command line: override {item!r} must look like key=value, e.g. federated.rounds=5")
    if "" in key.split("."):
        raise FltoolError(
            f"command line: {key}: malformed key (an empty part between dots); write it like federated.rounds"
        )
    try:
        value = parse_yaml(text, key) if text.strip() else None
    except yaml.YAMLError as exc:
        if _too_deep(exc):
            raise FltoolError(f"command line: {key}: value nested too deeply") from None
        value = text
    except RecursionError:
        raise FltoolError(f"command line: {key}: value nested too deeply") from None
    except DuplicateKeys as exc:
        lines = (f"command line: {dotted}: duplicate key; each key may appear once" for dotted, _ in exc.found)
        raise FltoolError(*lines) from None
    return key, value


def config_from_dict(
    raw: dict[str, Any],
    source: str = "<dict>",
    provenance: dict[str, str] | None = None,
    extra_errors: list[str] | None = None,
) -> Config:
    errors = list(extra_errors or [])
    cfg = _build(Config, raw, "", source, provenance or {}, errors)
    if not errors:
        cross_checks(cfg, lambda key: _source_of(key, source, provenance or {}), errors)
    if errors:
        raise FltoolError(*errors)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.dump(config_to_dict(cfg), Dumper=Yaml12Dumper, sort_keys=False)


def _set_dotted(raw: dict[str, Any], key: str, value: Any, overridden: dict[str, str]) -> None:
    """Set `a.b.c` in nested mappings, creating the missing ones. A non-mapping on the
    way that an earlier override set (`federated=3 federated.rounds=5`) is an error:
    replacing it would silently drop that override, which had already dropped the
    file's whole section. One from the file is replaced; validation names the key."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        prefix = ".".join(parts[: i + 1])
        if not isinstance(child, dict):
            if child is not None and prefix in overridden:
                raise FltoolError(
                    f"command line: {key}: {prefix} was set to {child!r} by an earlier override, "
                    f"so {key} cannot be set in it"
                )
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _source_of(dotted: str, source: str, prov: dict[str, str]) -> str:
    """Where `dotted`'s value came from: the command line set it, or a key below it
    (`foo.bar=1` creates `foo`), or else the file."""
    if dotted in prov:
        return prov[dotted]
    return next((prov[k] for k in prov if k.startswith(dotted + ".")), source)


UNKNOWN_KEYS_SHOWN = 5  # per section: a file of 100,000 stray keys gets 5 lines and a count


def _build(cls: type, raw: Any, prefix: str, source: str, prov: dict[str, str], errors: list[str]):
    where = prefix.rstrip(".") or "<top level>"
    if not isinstance(raw, dict):
        errors.append(f"{_source_of(where, source, prov)}: {where}: expected a mapping, got {show(raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in raw if key not in fields]
    for key in unknown[:UNKNOWN_KEYS_SHOWN]:
        dotted = f"{prefix}{cut(str(key), len(str(key)), 'characters')}"
        if dotted in RENAMED:
            errors.append(f"{_source_of(dotted, source, prov)}: {dotted}: is now {RENAMED[dotted]}")
            continue
        # A mapping value is a misspelt section, a scalar a misspelt setting.
        candidates = [n for n in fields if dataclasses.is_dataclass(hints[n]) == isinstance(raw[key], dict)]
        close = difflib.get_close_matches(str(key)[:100], candidates or list(fields), n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
        owners = _choices_with_key(prefix, key)
        if owners and not close:  # e.g. fedprox's mu left in a file switched to fedavg
            hint = f" of {where} {raw.get('name', cls().name)} (a key of {', '.join(owners)}){hint}"
        errors.append(f"{_source_of(dotted, source, prov)}: {dotted}: unknown key{hint}")
    if len(unknown) > UNKNOWN_KEYS_SHOWN:
        errors.append(
            f"{_source_of(where, source, prov)}: {where}: {len(unknown) - UNKNOWN_KEYS_SHOWN:,} more unknown keys "
            f"(valid keys: {', '.join(fields)})"
        )
    kwargs = {}
    for name, f in fields.items():
        if not prefix and name in REGISTRY_SECTIONS:  # by its name's class, given or not
            kwargs[name] = _build_choice(name, f, raw.get(name, {}), source, prov, errors)
            continue
        if name not in raw:
            continue
        dotted = f"{prefix}{name}"
        src = _source_of(dotted, source, prov)
        tp = hints[name]
        if not prefix and name == "mode" and raw[name] in LEGACY_MODES:
            errors.append(
                f"{src}: mode: {raw[name]} is an algorithm now; write mode: federated and "
                f"algorithm: {{name: {raw[name]}}}"
            )
            continue
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], dotted + ".", source, prov, errors)
            continue
        check = f.metadata.get("check")
        value, problem = _coerce(raw[name], tp, check[1] if check else "")
        if problem:
            errors.append(f"{src}: {dotted}: {problem}")
            continue
        if check and value is not None and not check[0](value):
            errors.append(f"{src}: {dotted}: must be {check[1]}, got {show(value)}")
            continue
        if isinstance(value, int) and value > INT_MAX:  # after `check`: seed says its own range
            errors.append(f"{src}: {dotted}: must be at most 2**63 - 1, got {show(value)}")
            continue
        kwargs[name] = value
    return cls(**kwargs)


def _choices_with_key(prefix: str, key: Any) -> list[str]:
    """The registered names of a registry section (algorithm, attack, ...) whose config
    has `key`."""
    section = prefix.rstrip(".")
    if section not in REGISTRY_SECTIONS:
        return []
    choices = getattr(registry, REGISTRY_SECTIONS[section])
    return [n for n in choices.names() if key in {f.name for f in dataclasses.fields(choices.config_class(n))}]


def _build_choice(section: str, f: dataclasses.Field, raw: Any, source: str, prov: dict[str, str], errors: list[str]):
    """A section whose class its `name` picks from a registry (after importing the
    algorithm's `plugin`, which may register that name)."""
    default = f.default_factory()  # type: ignore[misc]
    src = _source_of(section, source, prov)
    if not isinstance(raw, dict):
        errors.append(f"{src}: {section}: expected a mapping, got {show(raw)}")
        return default
    choices = getattr(registry, REGISTRY_SECTIONS[section])
    plugin = raw.get("plugin") if hasattr(default, "plugin") else None
    if plugin is not None:
        if not isinstance(plugin, str) or not plugin:
            errors.append(f"{_source_of(section + '.plugin', source, prov)}: {section}.plugin: expected a module name, got {show(plugin)}")
            return default
        try:
            registry.import_plugin(plugin, f"{_source_of(section + '.plugin', source, prov)}: {section}.plugin")
        except FltoolError as exc:
            errors.extend(exc.lines)
            return default
    name = raw.get("name", default.name)
    if not isinstance(name, str) or name not in choices.names():
        where = _source_of(section + ".name", source, prov)
        errors.append(f"{where}: {section}.name: must be one of {', '.join(choices.names())}; got {show(name)}")
        return default
    return _build(choices.config_class(name), raw, section + ".", source, prov, errors)


def _coerce(value: Any, tp: Any, allowed: str = "") -> tuple[Any, str | None]:
    """Return (value, None) when `value` fits type `tp`, else (None, problem text).
    `allowed` (the field's check, e.g. ">= 1") completes the type's name in the text."""
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            return value, None
        return _coerce(value, inner[0], f"{allowed} or null".strip() if type(None) in args else allowed)
    if origin is Literal:
        if value in args and type(value) is type(args[0]):
            return value, None
        allowed = ", ".join(str(a) for a in args)
        return None, f"must be one of {allowed}; got {show(value)}"
    if origin is list:
        if not isinstance(value, list):
            return None, f"expected {_kind('a list', allowed)}, got {show(value)}"
        out = []
        for item in value:
            item_, problem = _coerce(item, args[0])
            if problem:
                return None, f"list item: {problem}"
            if isinstance(item_, int) and item_ > INT_MAX:
                return None, f"list item: must be at most 2**63 - 1, got {show(item_)}"
            out.append(item_)
        return out, None
    if tp is bool:
        if isinstance(value, bool):
            return value, None
        return None, f"expected {_kind('true or false', allowed)}, got {show(value)}"
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
        return None, f"expected {_kind('an integer', allowed)}, got {show(value)}"
    if tp is float:
        if isinstance(value, float) and math.isfinite(value) and abs(value) > FLOAT32_MAX:
            # every such number ends up scaling float32 tensors: torch refuses to convert
            # it (a traceback mid-round), or it overflows to inf
            return None, f"must be at most {FLOAT32_MAX:.4g} in size (float32's largest), got {show(value)}"
        if isinstance(value, float):
            return value, None
        if isinstance(value, int) and not isinstance(value, bool):
            # beyond float's range is +-inf, as the literal 1e400 is: the finite checks refuse it
            if abs(value) > sys.float_info.max:
                return (math.inf if value > 0 else -math.inf), None
            return _coerce(float(value), tp, allowed)
        return None, f"expected {_kind('a number', allowed)}, got {show(value)}"
    if tp is str:
        if not isinstance(value, str):
            return None, f"expected {_kind('a string', allowed)}, got {show(value)}"
        if "\0" in value:  # every string here becomes a path, and no OS accepts NUL in one
            return None, f"must not contain a NUL character, got {show(value)}"
        return value, None
    return value, None


def _kind(noun: str, allowed: str) -> str:
    """'an integer' + '>= 1 or null' -> 'an integer >= 1 or null'; an `allowed` that is
    itself a noun phrase ('a finite number > 0') replaces the noun."""
    if allowed.startswith(("a ", "an ")):
        return allowed
    return f"{noun} {allowed}".rstrip()
