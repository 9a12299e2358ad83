"""YAML files that people write: a key given twice is an error (as in helm and kubectl), and a parse error
becomes the one line a user can act on."""
from __future__ import annotations

import re
from typing import Any

import yaml


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping, as helm and kubectl do, instead of
    silently keeping the last value."""

    bool_values = {**yaml.SafeLoader.bool_values, "y": True, "n": False}  # go-yaml's YAML 1.1 booleans

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys: left to SafeLoader, which refuses them
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    # Aliases share one node, so "billion laughs" (a few anchors, each listing the previous one many times)
    # loads small but is exponentially large to anything that walks it: refused by its expanded size.
    def get_single_node(self) -> yaml.Node | None:
        return _checked(super().get_single_node())

    def get_node(self) -> yaml.Node | None:
        return _checked(super().get_node())


MAX_EXPANDED_NODES = 100_000  # a job spec or trainer config has a few hundred


def _checked(node: yaml.Node | None) -> yaml.Node | None:
    sizes: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            if sizes[id(n)] < 0:
                raise yaml.composer.ComposerError(None, None, "an alias refers to its own anchor (a recursive "
                                                  "structure)", n.start_mark)
            return sizes[id(n)]
        sizes[id(n)] = -1
        children = (n.value if isinstance(n, yaml.SequenceNode) else
                    [part for pair in n.value for part in pair] if isinstance(n, yaml.MappingNode) else [])
        total = 1 + sum(size(child) for child in children)
        if total > MAX_EXPANDED_NODES:
            raise yaml.composer.ComposerError(None, None, f"its aliases expand to more than {MAX_EXPANDED_NODES:,} "
                                              "values", n.start_mark)
        sizes[id(n)] = total
        return total

    if node is not None:
        try:
            size(node)
        except RecursionError:
            raise yaml.composer.ComposerError(None, None, "nested too deeply", node.start_mark) from None
    return node



# Scalars as helm's YAML reads them (go-yaml), not as YAML 1.1 does: no base-60 (1:30 stays a string, not 90),
# 1e3 is a number, 0o17 an octal, y / n are booleans, and a date stays a string (2024-01-15 is an image tag).
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (
        "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN"))
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(
    r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def load_yaml(text: Any) -> Any:
    """yaml.safe_load for files people write: a duplicate key is a yaml.YAMLError, not a silent last-wins."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def load_yaml_all(text: Any) -> list[Any]:
    return list(yaml.load_all(text, Loader=_UniqueKeyLoader))  # noqa: S506 (a SafeLoader subclass)


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """'not valid YAML (line L, column C): PROBLEM', as far as the parser says."""
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    problem = getattr(exc, "problem", None)
    return f"not valid YAML{where}{f': {problem}' if problem else ''}"
