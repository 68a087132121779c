"""YAML as fltool reads configs: YAML 1.2 core-schema scalars, and no repeated keys.

PyYAML implements YAML 1.1, which silently reads `1e-3` as a string, `017` as octal 15,
`1:30` as 90 and `no`/`off` as false, and keeps the last of two equal keys (so a
repeated `federated:` section drops the first one's keys without a word).
"""

from __future__ import annotations

import re
import sys
from typing import Any

import yaml

# YAML 1.2 core schema: (tag, pattern, possible first characters). Under it `1e-3` is a
# float, `017` is 17, and `1:30` and `no` are strings.
YAML12_SCALARS = [
    ("tag:yaml.org,2002:null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
    ("tag:yaml.org,2002:int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", list("-+0123456789")),
    (
        "tag:yaml.org,2002:float",
        r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        list("-+.0123456789"),
    ),
]


# libyaml's parser where PyYAML has it: the pure-Python one takes ~10 s for a 1 MB file
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Yaml12Loader(_SafeLoader):  # type: ignore[misc,valid-type]
    """SafeLoader whose untagged scalars follow YAML 1.2: any plain scalar that is not
    null, bool, int or float is a string (no timestamps, merge keys or sexagesimals)."""

    # Our own table, so yaml.SafeLoader (and yaml.safe_load everywhere else) keeps YAML 1.1.
    yaml_implicit_resolvers: dict[Any, list] = {}

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # An explicit tag on a value it cannot hold (`!!int abc`, `!!bool maybe`) makes
        # PyYAML's constructors raise plain Python errors; report them as invalid YAML.
        try:
            return super().construct_object(node, deep)
        except (ValueError, KeyError, TypeError, AttributeError):
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            shown = _shorten(repr(node.value)) if isinstance(node, yaml.ScalarNode) else "this value"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {shown} as {tag}", node.start_mark
            ) from None


def _construct_int(loader: Yaml12Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text[:2] in ("0o", "0x"):
        return int(text[2:], 8 if text[1] == "o" else 16)
    if len(text.lstrip("+-")) > sys.get_int_max_str_digits() > 0:
        # Python refuses to parse longer decimals; the bound check would refuse it anyway
        raise yaml.constructor.ConstructorError(
            None, None, f"integer with more than {sys.get_int_max_str_digits()} digits", node.start_mark
        )
    return int(text)  # decimal, leading zeros included: 1.2 has no 0-prefixed octal


class Yaml12Dumper(yaml.SafeDumper):
    """Quotes every string that YAML 1.1 or 1.2 would read as another type, so a dumped
    config reads back the same with Yaml12Loader and with a plain yaml.safe_load."""


def _add_yaml12_resolvers(cls: type[yaml.SafeLoader] | type[yaml.SafeDumper]) -> None:
    # add_implicit_resolver copies an inherited table into `cls` before adding to it
    for tag, pattern, first in YAML12_SCALARS:
        cls.add_implicit_resolver(tag, re.compile(f"^(?:{pattern})$"), first)


_add_yaml12_resolvers(Yaml12Loader)  # onto an empty table: 1.2 alone
_add_yaml12_resolvers(Yaml12Dumper)  # onto SafeDumper's 1.1 table: quote what either reads as non-string
Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


MAX_EXPANDED_NODES = 100_000  # a config has hundreds; an alias bomb, billions


class AliasBomb(yaml.YAMLError):
    """Aliases that would expand the document past MAX_EXPANDED_NODES values: building
    it would take the memory and time of the expansion."""

    def __init__(self) -> None:
        super().__init__(f"aliases expand it to more than {MAX_EXPANDED_NODES:,} values; a config needs far fewer")
        self.problem = str(self)


class DuplicateKeys(Exception):
    def __init__(self, found: list[tuple[str, int]]) -> None:
        super().__init__(found)
        self.found = found  # (dotted key, 1-based line of the repeat)


def parse_yaml(text: str, prefix: str = "") -> Any:
    """YAML text -> Python data, scalars typed as YAML 1.2. Raises yaml.YAMLError,
    RecursionError (nesting deeper than Python's stack) or DuplicateKeys, whose dotted
    keys start with `prefix`."""
    loader = Yaml12Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded, distinct = _expanded_size(node)
        if expanded - distinct > MAX_EXPANDED_NODES:  # what the aliases add (a long file is fine)
            raise AliasBomb()
        found = _duplicate_keys(loader, node, prefix)
        if found:
            raise DuplicateKeys(found)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node) -> tuple[int, int]:
    """(nodes once every alias is expanded, distinct nodes), counted on the composed
    graph (where an alias is a shared node) without expanding anything: each node's
    size once, children first, capped past the limit. A cycle counts as unbounded."""
    cap = 2 * MAX_EXPANDED_NODES + 10**7
    size: dict[int, int] = {}
    todo: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while todo:
        node, children_done = todo.pop()
        key = id(node)
        if key in size:
            continue
        children = _children(node)
        if children_done:
            open_nodes.discard(key)
            size[key] = min(cap, 1 + sum(size[id(c)] for c in children))
            continue
        if key in open_nodes:  # reached again while its own children are pending: a cycle
            return cap, 0
        open_nodes.add(key)
        todo.append((node, True))
        todo.extend((c, False) for c in children if id(c) not in size)
    return size[id(root)], len(size)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _duplicate_keys(loader: Yaml12Loader, root: yaml.Node, prefix: str) -> list[tuple[str, int]]:
    """(dotted key, line) of every repeated key, where PyYAML would keep the last silently.
    A loop, not recursion, and each node once: aliases share nodes and can form cycles."""
    found = []
    todo = [(root, prefix)]
    seen: set[int] = set()
    while todo:
        node, where = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            todo.extend((item, f"{where}[{i}]") for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            keys = set()
            for key_node, value_node in node.value:
                # compare values, not spellings: `1` and `0x1` are one key
                key = loader.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else key_node
                dotted = f"{where}.{key}" if where else str(key)
                if key in keys:
                    found.append((dotted, key_node.start_mark.line + 1))
                keys.add(key)
                todo.append((value_node, dotted))
    return sorted(found, key=lambda f: f[1])


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
