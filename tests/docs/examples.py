"""The request examples of the README and docs/*.md, found by their text, and how their shown
output is compared (docs/development.md, "Examples that run").

- A fenced `bash` block in which `curl` reaches `http://127.0.0.1:8000` (outside comments) is a
  request example; so is a fenced `python` block that names `127.0.0.1:8000` or `:8001`.
- `<!-- output -->` right after an example, then a fenced block: the output it must print.
  `json`: compared as JSON; objects on the keys shown (a shown key must be there and match),
  lists element by element, numbers within the precision written, `"..."` matches anything.
  Anything else: line by line, whitespace runs alike, numbers within the precision written.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
OUTPUT = re.compile(r"\A\s*<!-- output -->\s*\n")
HTTP = "http://127.0.0.1:8000"
HOSTS = ("127.0.0.1:8000", "127.0.0.1:8001")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Example:
    path: Path
    line: int
    lang: str
    code: str
    output_lang: str | None = None
    output: str | None = None

    @property
    def name(self) -> str:
        return f"{self.path.name}:{self.line}"


def _without_comments(code: str) -> str:
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in code.splitlines())


def is_request(lang: str, code: str) -> bool:
    if lang in ("bash", "sh", "shell"):
        bare = _without_comments(code)
        return "curl" in bare and HTTP in bare
    if lang == "python":
        return any(host in code for host in HOSTS)
    return False


def examples(path: Path) -> list[Example]:
    """The request examples of one Markdown file, each with the output shown after it."""
    text = path.read_text()
    blocks = list(FENCE.finditer(text))
    found = []
    for i, block in enumerate(blocks):
        lang, code = block["lang"], block["body"]
        if not is_request(lang, code):
            continue
        line = text.count("\n", 0, block.start()) + 1
        output_lang = output = None
        if i + 1 < len(blocks):
            between = text[block.end() : blocks[i + 1].start()]
            if OUTPUT.match(between) and between.strip() == "<!-- output -->":
                output_lang, output = blocks[i + 1]["lang"], blocks[i + 1]["body"]
        found.append(Example(path, line, lang, code, output_lang, output))
    return found


# -- comparing shown output with what the example printed --------------------------------------


@dataclass(frozen=True)
class _Number:
    """A number as the docs write it, so its precision is known."""

    text: str


def _tolerance(shown: str) -> float:
    mantissa, _, exponent = shown.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10.0 ** (-decimals + (int(exponent) if exponent else 0)) * 1.0001


def _close(shown: str, got: float) -> bool:
    return math.isclose(float(shown), got, rel_tol=0, abs_tol=_tolerance(shown))


def _compare(want: Any, got: Any, where: str) -> list[str]:
    if isinstance(want, str) and want == "...":
        return []
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [f"{where}: expected an object, got {got!r}"]
        problems = []
        for key, value in want.items():
            if key not in got:
                problems.append(f"{where}.{key}: missing")
            else:
                problems += _compare(value, got[key], f"{where}.{key}")
        return problems
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{where}: expected {len(want)} items, got {got!r}"]
        return [p for i, (w, g) in enumerate(zip(want, got, strict=True)) for p in
                _compare(w, g, f"{where}[{i}]")]  # fmt: skip
    if isinstance(want, _Number):
        if isinstance(got, bool) or not isinstance(got, int | float):
            return [f"{where}: expected {want.text}, got {got!r}"]
        return [] if _close(want.text, got) else [f"{where}: expected {want.text}, got {got!r}"]
    same = want == got and isinstance(want, bool) == isinstance(got, bool)
    return [] if same else [f"{where}: expected {want!r}, got {got!r}"]


def compare_json(shown: str, printed: str) -> list[str]:
    """Differences between the JSON the docs show and the JSON the example printed."""
    want = json.loads(shown, parse_float=_Number, parse_int=_Number)
    try:
        got = json.loads(printed)
    except json.JSONDecodeError as error:
        return [f"the example printed no single JSON document ({error}): {printed!r}"]
    return _compare(want, got, "$")


def compare_text(shown: str, printed: str) -> list[str]:
    """Differences, line by line, between the text the docs show and the example's output."""
    want_lines = shown.strip().splitlines()
    got_lines = printed.strip().splitlines()
    if len(want_lines) != len(got_lines):
        return [f"expected {len(want_lines)} lines, got {len(got_lines)}:\n{printed}"]
    problems = []
    for n, (want, got) in enumerate(zip(want_lines, got_lines, strict=True), 1):
        want_words, got_words = NUMBER.split(want), NUMBER.split(got)
        want_numbers, got_numbers = NUMBER.findall(want), NUMBER.findall(got)
        same_words = [" ".join(w.split()) for w in want_words] == [
            " ".join(g.split()) for g in got_words
        ]
        if not same_words or len(want_numbers) != len(got_numbers):
            problems.append(f"line {n}: expected {want!r}, got {got!r}")
            continue
        for w, g in zip(want_numbers, got_numbers, strict=True):
            if not _close(w, float(g)):
                problems.append(f"line {n}: expected {w}, got {g} ({got!r})")
    return problems
