"""The YAML node tree the loader reads: composed with limits (depth, size, alias and merge-key
bombs), each value with its key path and line, and the list of errors found so far."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

Readers = Mapping[str, Callable[["Value"], object]]
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")
_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True, slots=True)
class Value:
    """A node plus where it sits: its key path and the 1-based line to report."""

    node: Node
    path: str
    line: int

    @property
    def is_null(self) -> bool:
        return isinstance(self.node, ScalarNode) and self.node.tag == _NULL_TAG

    @property
    def raw(self) -> str:
        """The scalar's source text (for messages); "" for collections."""
        return str(self.node.value) if isinstance(self.node, ScalarNode) else ""

    def key(self, name: str, line: int, node: Node) -> Value:
        """The value under `name`; reported at the key's line, which is where a reader looks."""
        part = name if _PLAIN_KEY.fullmatch(name) else f'"{name}"'
        return Value(node, f"{self.path}.{part}" if self.path else part, line)

    def item(self, index: int, node: Node) -> Value:
        return Value(node, f"{self.path}[{index}]", node.start_mark.line + 1)


def root_value(node: Node) -> Value:
    return Value(node, "", node.start_mark.line + 1)


class Errors:
    """Every problem found, reported in file order."""

    def __init__(self) -> None:
        self._items: list[tuple[int, int, str]] = []

    def add(self, at: Value | None, message: str, *, line: int | None = None) -> None:
        path = at.path if at is not None else ""
        where = line if line is not None else (at.line if at is not None else 0)
        text = f"{path}: {message}" if path else message
        if where:
            text += f" (line {where})"
        self._items.append((where or 1 << 30, len(self._items), text))

    def __len__(self) -> int:
        return len(self._items)

    def messages(self) -> list[str]:
        return [text for _, _, text in sorted(self._items)]


MAX_DEPTH = 64  # a real config nests about 6 levels
MAX_NODES = 200_000  # nodes visited with aliases expanded: bounds anchor and merge-key bombs
_KNOWN_COLLECTION_TAGS: dict[type[Node], str] = {
    MappingNode: "tag:yaml.org,2002:map",
    SequenceNode: "tag:yaml.org,2002:seq",
}


def check_tree(root: Node, errors: Errors) -> bool:
    """Refuse unknown collection tags (`!!python/object` on a mapping), deep nesting, alias bombs.

    Walks the tree with aliases expanded (they are shared node objects), without recursion, and
    stops at MAX_NODES, so a small file that would expand to millions of nodes costs nothing."""
    stack: list[tuple[Node, int]] = [(root, 1)]
    visited = 0
    while stack:
        node, depth = stack.pop()
        visited += 1
        line = node.start_mark.line + 1
        if visited > MAX_NODES:
            errors.add(None, f"too many nodes once anchors and merges are expanded (over {MAX_NODES})")
            return False
        if depth > MAX_DEPTH:
            errors.add(None, f"nested too deeply (over {MAX_DEPTH} levels)", line=line)
            return False
        if isinstance(node, ScalarNode):
            continue  # scalar tags are checked where they are read, with their key path
        if node.tag != _KNOWN_COLLECTION_TAGS.get(type(node)):
            errors.add(None, f"unknown or unsupported YAML tag {node.tag}", line=line)
            return False
        if isinstance(node, MappingNode):
            for key, value in node.value:
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))
        elif isinstance(node, SequenceNode):
            stack.extend((item, depth + 1) for item in node.value)
    return True


def compose(text: str, errors: Errors) -> Node | None:
    """Parse YAML to a node tree; syntax errors are recorded with their line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        return node if node is None or check_tree(node, errors) else None
    except yaml.MarkedYAMLError as e:
        problem = e.problem or "syntax error"
        if e.context:
            problem = f"{e.context}: {problem}"
        mark = e.problem_mark or e.context_mark
        errors.add(None, f"invalid YAML: {problem}", line=mark.line + 1 if mark else None)
    except yaml.YAMLError as e:
        errors.add(None, f"invalid YAML: {e}")
    return None


def describe(node: Node, value: object = None) -> str:
    """The user-facing type name of a node: mapping, list, string, integer, ..."""
    if isinstance(node, MappingNode):
        return "mapping"
    if isinstance(node, SequenceNode):
        return "list"
    if value is None:
        return "null"
    names = {bool: "boolean", int: "integer", float: "number", str: "string", bytes: "binary"}
    return names.get(type(value), "date" if type(value).__name__ in ("date", "datetime") else "value")
