"""Regexes from untrusted files (target_modules, rank_pattern keys, layers_pattern, ...), matched in bounded time.

PEFT compiles them with `re`, whose backtracking can take exponential time ("(.|.)*Z" hangs on a module
path). lorafit validates each one with `re`, so that it accepts exactly what PEFT accepts, and matches
with the `regex` package, which takes the same syntax, avoids most such blow-ups and takes a timeout.
A pattern that still runs past the timeout is a RegexTimeout (exit 2), never a hang.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from .errors import AdapterFormatError

TIMEOUT_S = 2.0  # per match; a sane module-path regex takes microseconds


class RegexTimeout(AdapterFormatError):
    """A user regex ran past TIMEOUT_S on one module path (catastrophic backtracking)."""


@lru_cache(maxsize=4096)
def _compiled(pattern: str) -> Any:
    re.compile(pattern)  # PEFT's engine decides what is valid: raises re.error as PEFT would
    try:
        import regex

        return regex.compile(pattern)
    except Exception:  # `regex` lacks this construct: fall back to `re`, unbounded but correct
        return re.compile(pattern)


def _call(pattern: str, method: str, text: str, *args: Any) -> Any:
    compiled = _compiled(pattern)
    if isinstance(compiled, re.Pattern):
        return getattr(compiled, method)(text, *args)
    try:
        return getattr(compiled, method)(text, *args, timeout=TIMEOUT_S)
    except TimeoutError:
        raise RegexTimeout(f"the regex {pattern!r} takes over {TIMEOUT_S:g} s to match the module path {text!r} "
                           "(catastrophic backtracking; PEFT's re would hang on it); simplify it") from None


def match(pattern: str, text: str) -> Any:
    """re.match(pattern, text), bounded in time. Raises re.error for an invalid pattern, RegexTimeout."""
    return _call(pattern, "match", text)


def fullmatch(pattern: str, text: str) -> Any:
    """re.fullmatch(pattern, text), bounded in time. Raises re.error for an invalid pattern, RegexTimeout."""
    return _call(pattern, "fullmatch", text)


def subn(pattern: str, repl: str, text: str) -> tuple[str, int]:
    """re.subn(pattern, repl, text), bounded in time."""
    compiled = _compiled(pattern)
    if isinstance(compiled, re.Pattern):
        return compiled.subn(repl, text)
    try:
        out: tuple[str, int] = compiled.subn(repl, text, timeout=TIMEOUT_S)
        return out
    except TimeoutError:
        raise RegexTimeout(f"the regex {pattern!r} takes over {TIMEOUT_S:g} s to match the module path {text!r} "
                           "(catastrophic backtracking); simplify it") from None
