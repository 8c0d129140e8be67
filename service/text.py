"""Client text made safe to echo: in a log line, an error message or a metric label.

Anything a client sends (paths, names, parameter values, header values) may be long, hold
control characters or be of any type. An error message quotes it through `shown` (a bounded
repr), a log line through `printable` (control characters escaped, bounded), so no client input
can make a message or a line large, split it, or forge another.
"""

from __future__ import annotations

SHOWN_CHARS = 64


def printable(text: str, limit: int = 1024) -> str:
    """`text` safe for one log line: control characters escaped, length bounded."""
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """A bounded repr of a client's value for an error message: `'abc'`, `12`, `'xxx...'`."""
    if isinstance(value, str | bytes) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} long)"
    if isinstance(value, list | tuple | dict | set):
        return f"a {type(value).__name__} of {len(value)}"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
