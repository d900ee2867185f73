"""Linear-time regexes for match rules: every pattern in the config is compiled with RE2.

Python's `re` backtracks: `(a+)+$` against 31 bytes of `a` takes minutes, and one such header
value would freeze the event loop (every connection). RE2 matches in time linear in the input, and
refuses what it cannot do in linear time (backreferences, lookaround), so such a pattern is refused
when the config is loaded. This is why Envoy only accepts RE2 (`safe_regex`).

Patterns are matched against raw header/cookie/query bytes with fullmatch semantics. The Latin-1
encoding makes every byte one character, as Python's `re` did on bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import re2

# RE2's own memory budget for one compiled program (its default is 8 MiB); a pattern whose
# automaton would need more (e.g. huge counted repetitions) is refused at load.
MAX_MEM = 8 << 20


class RegexError(ValueError):
    """The pattern is not one RE2 can compile (message says why)."""


def _options() -> Any:
    opts = re2.Options()
    opts.log_errors = False  # errors come back to us as exceptions, not lines on stderr
    opts.encoding = re2.Options.Encoding.LATIN1
    opts.max_mem = MAX_MEM
    return opts


def compile_fullmatch(pattern: str) -> Callable[[bytes], bool]:
    """A test that `pattern` matches the whole of a byte string; raises RegexError."""
    try:
        rx = re2.compile(pattern.encode("utf-8"), options=_options())
    except re2.error as e:
        why = e.args[0] if e.args else e
        if isinstance(why, bytes):
            why = why.decode("utf-8", "replace")
        raise RegexError(f"{why} (regexes use RE2 syntax: no backreferences or lookaround)") from None
    fullmatch = rx.fullmatch

    def test(value: bytes) -> bool:
        return fullmatch(value) is not None

    return test
