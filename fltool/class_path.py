"""Resolve a user's `class_path` ("pkg.mod:Name" or "pkg.mod.Name") to the object it names.

Models and datasets from outside fltool are named in the config the way LightningCLI
names them. Every way this can go wrong becomes one line that names the config key,
raised before a run directory exists or any training starts.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from fltool.errors import FltoolError


def resolve(key: str, path: str) -> Callable[..., Any]:
    """The callable `path` names; `key` (e.g. "model.class_path") prefixes every error."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise FltoolError(f"{key}: {path!r} is not 'package.module:Name' (or 'package.module.Name')")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ModuleNotFoundError, or the module's own import-time error
        raise FltoolError(f"{key}: cannot import module '{module_name}' ({type(exc).__name__}: {first_line(exc)})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise FltoolError(f"{key}: module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FltoolError(f"{key}: '{path}' is a {type(obj).__name__}, not a class or function")
    return obj


def call(key: str, path: str, fn: Callable[..., Any], init_args: dict[str, Any], defaults: dict[str, Any] | None = None) -> Any:
    """fn(**init_args), plus those of `defaults` (e.g. num_classes) that fn takes by name
    and the user did not set; an exception becomes one line naming `key`."""
    kwargs = dict(init_args)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        params = {}
    for name, value in (defaults or {}).items():
        if name in params and name not in kwargs:
            kwargs[name] = value
    args_key = key.rsplit(".", 1)[0] + ".init_args"
    try:
        return fn(**kwargs)
    except Exception as exc:
        raise FltoolError(f"{key}: {path}(**{args_key}) raised {type(exc).__name__}: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return text[:160] or type(exc).__name__
