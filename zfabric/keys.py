"""Task keys as users give them (str, int, float, bytes, tuples) and as the wire carries them.

Dask names its tasks with keys such as ``("sum-aggregate-3f2a", 0, 1)``; dask.distributed's
users may pass any such key to ``submit(key=...)``. The scheduler and workers only ever see
strings: a string key travels unchanged (the common case costs nothing), any other key travels
as :data:`MARK` followed by its canonical ``repr`` and is turned back into the original object
at the client's door (:func:`from_wire`). So the scheduler keeps its cheap ``str``-keyed dicts
and checks, and every key the user sees is the one they gave.

Strings that begin with :data:`MARK` (a control character no key name uses) are refused, so
the encoding is unambiguous.
"""

from __future__ import annotations

import ast
import numbers
import re

__all__ = ["MARK", "check_user_key", "from_wire", "readable", "to_wire"]

#: First character of an encoded non-string key (ASCII unit separator).
MARK = "\x1f"


def to_wire(key) -> str:
    """The string that stands for ``key`` on the wire (the key itself when it is a str)."""
    if type(key) is str:
        if key.startswith(MARK):
            raise ValueError(f"task keys may not begin with {MARK!r} (zfabric reserves it)")
        return key
    if type(key) is tuple and all(type(k) is str or type(k) is int for k in key):
        return MARK + repr(key)  # dask's usual (name, i, j, ...): already canonical
    return MARK + repr(_canonical(key))


def _canonical(key):
    if type(key) is tuple:
        return tuple(_canonical(k) for k in key)
    if isinstance(key, str):
        return str(key)
    if isinstance(key, bool):
        raise TypeError(f"a key may not be a bool, got {key!r}")
    if isinstance(key, numbers.Integral):
        return int(key)
    if isinstance(key, float):
        return float(key)
    if isinstance(key, bytes):
        return bytes(key)
    if isinstance(key, tuple):  # a namedtuple: plain tuple
        return tuple(_canonical(k) for k in key)
    raise TypeError(
        f"a key must be a str, int, float, bytes or a tuple of those (as dask's keys are),"
        f" got {type(key).__name__} {key!r:.100}"
    )


def check_user_key(key) -> None:
    """Raise TypeError/ValueError for a key that cannot be used (see :func:`to_wire`)."""
    to_wire(key)


def from_wire(key: str):
    """The user's key back from its wire form."""
    if type(key) is str and key.startswith(MARK):
        try:
            return ast.literal_eval(key[1:])
        except (ValueError, SyntaxError):
            return key
    return key


def group_label(name: str) -> str:
    """A task group's name as dask names it (``sum-aggregate``, ``random_sample``), also for
    a group the scheduler named from a tuple key's wire form (``"\x1f('sum-aggregate"``)."""
    if type(name) is str and name.startswith(MARK):
        return name[1:].lstrip("('\"") or name
    return name


def key_label(key) -> str:
    """A key as the user gave it, for display: ``('sum-aggregate-…', 0, 0)``, ``inc-1``."""
    return str(from_wire(key))


# repr() of an encoded key inside the scheduler's messages: "\x1f('x', 1)" (double quotes,
# since the tuple's repr holds single ones).
_QUOTED = re.compile(r'"\\x1f([^"]*)"' + r"|'\\x1f([^']*)'|\x1f(\([^\n]*?\)|[^\s,:]+)")


def readable(text: str) -> str:
    """A message from the scheduler or a worker with encoded keys shown as the user's keys."""
    if MARK not in text and "\\x1f" not in text:
        return text
    return _QUOTED.sub(lambda m: next(g for g in m.groups() if g is not None), text)
