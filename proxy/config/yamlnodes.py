"""Typed access to a composed YAML node tree, collecting errors with key paths and line numbers.

We walk `yaml.compose` nodes instead of loaded Python objects because only nodes keep their marks:
every error can then say where it is (`routes[1].split: ... (line 12)`). Each accessor returns None
after recording an error, so the loader keeps going and reports every problem at once.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from proxy.config.units import fmt_number, parse_duration, parse_size
from proxy.config.yamltree import _MERGE_TAG, Errors, Readers, Value, describe

T = TypeVar("T")


class Reader:
    """Typed accessors over Values. Each returns None (and records an error) on a bad value."""

    def __init__(self, errors: Errors) -> None:
        self.errors = errors
        self._constructor = SafeConstructor()
        self._entries: dict[tuple[int, str], dict[str, Value]] = {}  # so a second look re-reports nothing

    def error(self, at: Value, message: str) -> None:
        self.errors.add(at, message)

    # -- collections ----------------------------------------------------------------------------

    def mapping(
        self,
        v: Value,
        allowed: Collection[str] | None,
        required: Collection[str] = (),
        *,
        keep_null: bool = False,
        extensions: bool = False,
    ) -> dict[str, Value] | None:
        """A mapping restricted to `allowed` keys (None: any key, nulls kept).

        Null values count as absent unless `keep_null`, so `version:` with nothing after it is fine.
        With `extensions`, `x-...` keys are skipped: a place for YAML anchors (as in docker-compose).
        """
        if allowed is None:
            keep_null = True
        if not isinstance(v.node, MappingNode):
            self.error(v, f"expected a mapping, got {self._describe(v)}")
            return None
        out = self.entries(v)
        for name in list(out):
            child = out[name]
            if extensions and name.startswith("x-"):
                del out[name]
            elif allowed is not None and name not in allowed:
                hint = difflib.get_close_matches(name, list(allowed), n=1)
                did = f'; did you mean "{hint[0]}"?' if hint else ""
                self.error(child, f"unknown key{did} (allowed: {', '.join(allowed)})")
                del out[name]
            elif child.is_null and not keep_null:
                del out[name]
        for name in required:
            if name not in out:
                self.error(v, f'missing required key "{name}"')
        return out

    def entries(self, v: Value) -> dict[str, Value]:
        """All entries of a mapping node (any keys), in order; duplicate keys are errors.

        `<<` merge keys are honoured; the mapping's own keys override merged ones.
        """
        node = v.node
        assert isinstance(node, MappingNode)
        cached = self._entries.get((id(node), v.path))
        if cached is not None:
            return dict(cached)
        out: dict[str, Value] = {}
        self._entries[(id(node), v.path)] = out
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, ScalarNode):
                self.errors.add(v, f"keys must be strings, got {describe(key_node)}", line=line)
                continue
            name = str(key_node.value)
            if name in first_line:
                self.error(v.key(name, line, key_node), f"duplicate key (first on line {first_line[name]})")
            else:
                first_line[name] = line
        try:
            self._constructor.flatten_mapping(node)
        except ConstructorError as e:
            self.error(v, f"invalid merge: {e.problem}")
            return {}
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode):
                name = str(key_node.value)
                out.pop(name, None)  # later (own) keys win, and move to their own position
                out[name] = v.key(name, key_node.start_mark.line + 1, value_node)
        return dict(out)

    def record(
        self,
        v: Value | None,
        cls: Callable[..., T],
        readers: Readers,
        required: Collection[str] = (),
        *,
        nullable: bool = False,
    ) -> T | None:
        """`cls(**fields)` from a mapping whose allowed keys are `readers`' keys.

        Absent or invalid fields keep the dataclass default; None when the value is not a mapping or a
        required field is missing/invalid. With `nullable`, `key: null` passes an explicit None.
        """
        m = self.mapping(v, tuple(readers), required, keep_null=nullable) if v is not None else {}
        if m is None:
            return None
        fields: dict[str, object] = {}
        for key, fv in m.items():
            got = None if fv.is_null else readers[key](fv)
            if got is not None or fv.is_null:
                fields[key] = got
        if any(fields.get(key) is None for key in required):
            return None
        return cls(**fields)

    def sequence(self, v: Value) -> list[Value] | None:
        if not isinstance(v.node, SequenceNode):
            self.error(v, f"expected a list, got {self._describe(v)}")
            return None
        return [v.item(i, n) for i, n in enumerate(v.node.value)]

    def list_of(self, v: Value, fn: Callable[[str], T], *, empty: str | None = None) -> tuple[T, ...] | None:
        """Each item's source text converted by `fn`; None if any item is bad. `empty`: error if empty."""
        items = self.sequence(v)
        if items is not None and not items and empty:
            self.error(v, empty)
        if items is None:
            return None
        out = [self.convert(item, fn, raw=True) for item in items]
        good = [x for x in out if x is not None]
        return tuple(good) if len(good) == len(items) else None

    def increasing(
        self, v: Value, what: str, hi: float | None = None, *, allow_empty: bool = False
    ) -> tuple[float, ...] | None:
        """A strictly increasing list of numbers in (0, hi] (rollout steps, histogram buckets)."""
        items = self.sequence(v)
        if items is None:
            return None
        if not items and not allow_empty:
            self.error(v, "must not be empty")
        out: list[float] = []
        for item in items:
            x = self.number(item, 0, hi, lo_open=True)
            if x is not None and out and x <= out[-1]:
                prev = fmt_number(out[-1])
                self.error(item, f"{what} must increase strictly ({fmt_number(x)} after {prev})")
            elif x is not None:
                out.append(x)
        return tuple(out) if len(out) == len(items) else None

    # -- scalars --------------------------------------------------------------------------------

    def scalar(self, v: Value, expected: str) -> tuple[object] | None:
        """The constructed scalar, boxed so a YAML null is distinguishable from an error."""
        if not isinstance(v.node, ScalarNode):
            self.error(v, f"expected {expected}, got {describe(v.node)}")
            return None
        try:
            return (self._constructor.construct_object(v.node, deep=True),)
        except ConstructorError as e:
            self.error(v, f"invalid value: {e.problem}")
            return None
        except (ValueError, OverflowError) as e:  # e.g. an integer beyond Python's 4,300-digit limit
            self.error(v, f"invalid value: {str(e).split(';')[0][:120]}")
            return None

    def _describe(self, v: Value) -> str:
        if isinstance(v.node, ScalarNode):
            try:
                return describe(v.node, self._constructor.construct_object(v.node, deep=True))
            except (ConstructorError, ValueError, OverflowError):
                return "value"
        return describe(v.node)

    def _typed(self, v: Value, expected: str, ok: Callable[[object], bool]) -> object:
        box = self.scalar(v, expected)
        if box is None:
            return None
        if not ok(box[0]):
            self.error(v, f"expected {expected}, got {describe(v.node, box[0])}")
            return None
        return box[0]

    def string(self, v: Value, *, allow_empty: bool = False) -> str | None:
        s = self._typed(v, "a string", lambda x: isinstance(x, str))
        if not isinstance(s, str):
            return None
        if not s and not allow_empty:
            self.error(v, "must not be empty")
            return None
        return s

    def text(self, v: Value) -> str | None:
        """Any non-null scalar as its source text: `version: 1.10` stays "1.10", `x: yes` stays "yes"."""
        if v.is_null or not isinstance(v.node, ScalarNode):
            self.error(v, f"expected a string, got {self._describe(v)}")
            return None
        if self.scalar(v, "a string") is None:  # still refuse unknown tags like `!thing x`
            return None
        return str(v.node.value)

    def convert(self, v: Value, fn: Callable[[Any], T], *, raw: bool = False, expected: str = "a string") -> T | None:
        """`fn(value)`, recording its ValueError message. `raw` passes the scalar's source text."""
        if raw:
            value: object = self.text(v)
            if value is None:
                return None
        else:
            box = self.scalar(v, expected)
            if box is None:
                return None
            value = box[0]
        try:
            return fn(value)
        except ValueError as e:
            self.error(v, str(e))
            return None

    def boolean(self, v: Value) -> bool | None:
        b = self._typed(v, "true or false", lambda x: isinstance(x, bool))
        return b if isinstance(b, bool) else None

    def integer(self, v: Value, lo: int | None = None, hi: int | None = None) -> int | None:
        n = self._typed(v, "an integer", lambda x: isinstance(x, int) and not isinstance(x, bool))
        if not isinstance(n, int):
            return None
        return n if self._in_range(v, n, lo, hi) else None

    def number(
        self,
        v: Value,
        lo: float | None = None,
        hi: float | None = None,
        *,
        lo_open: bool = False,
        hi_open: bool = False,
    ) -> float | None:
        n = self._typed(v, "a number", lambda x: isinstance(x, int | float) and not isinstance(x, bool))
        if not isinstance(n, int | float):
            return None
        if not math.isfinite(n):
            self.error(v, "must be a finite number")
            return None
        return float(n) if self._in_range(v, n, lo, hi, lo_open, hi_open) else None

    def duration(self, v: Value, *, allow_zero: bool = False) -> float | None:
        """Seconds from "500ms" / "2s" / "1m" / a bare number; > 0 (or >= 0 with allow_zero)."""
        seconds = self.convert(v, parse_duration, expected="a duration")
        return seconds if seconds is not None and self._in_range(v, seconds, 0, None, not allow_zero) else None

    def size(self, v: Value, *, lo: int = 0) -> int | None:
        """Bytes from an int or "32KiB" / "10MiB" / "8k" (k = 1024)."""
        size = self.convert(v, parse_size, expected="a size")
        return size if size is not None and self._in_range(v, size, lo, None) else None

    def _in_range(
        self,
        v: Value,
        x: float,
        lo: float | None,
        hi: float | None,
        lo_open: bool = False,
        hi_open: bool = False,
    ) -> bool:
        bad_lo = lo is not None and (x <= lo if lo_open else x < lo)
        bad_hi = hi is not None and (x >= hi if hi_open else x > hi)
        if not (bad_lo or bad_hi):
            return True
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {fmt_number(lo)}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {fmt_number(hi)}")
        self.error(v, f"must be {' and '.join(parts)}, got {v.raw}")
        return False
