"""The generated parts of the documentation, so that they cannot drift from their sources.

A page marks a generated region with two HTML comments; everything between them is output of
this module and nothing else:

    <!-- generated: settings -->            the configuration table, from service.settings
    <!-- /generated -->
    <!-- generated: bench serving -->       the tables of bench/results/serving.json
    <!-- /generated -->

    python scripts/docsgen.py           rewrite every region of docs/*.md in place
    python scripts/docsgen.py --check   exit 1 (and say which) when a region is out of date

The mkdocs hook (scripts/mkdocs_hooks.py) renders the same regions at build time and warns,
which fails `mkdocs build --strict`, when the committed text differs; tests/docs checks it too.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "bench" / "results"
REGION = re.compile(
    r"(<!-- generated: (?P<name>[\w .-]+?) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.S
)
REGENERATE = "python scripts/docsgen.py"


class GeneratorError(ValueError):
    """A region names something that does not exist (an unknown generator, a missing file)."""


# -- the configuration page: service.settings.Settings ----------------------------------------


def _flags() -> dict[str, str]:
    """Settings field -> the `rcegate serve` option that sets it (its parameter of the same
    name), so a flag added to the CLI shows up here without an edit."""
    from service.cli import serve

    return {name: "--" + name.replace("_", "-") for name in inspect.signature(serve).parameters}


def _kind(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return ", ".join(f"`{a}`" for a in args)
    if origin in (types.UnionType, typing.Union):
        kinds = [_kind(a) for a in args if a is not type(None)]
        return " or ".join(kinds) + (", or unset" if type(None) in args else "")
    if origin is list:
        return "JSON list"
    if origin is dict:
        return "JSON object"
    names = {bool: "`true` or `false`", int: "integer", float: "number", str: "text"}
    if annotation in names:
        return names[annotation]
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> str:
    signs = {
        annotated_types.Ge: (">=", "ge"),
        annotated_types.Gt: (">", "gt"),
        annotated_types.Le: ("<=", "le"),
        annotated_types.Lt: ("<", "lt"),
        annotated_types.MaxLen: ("entries: at most", "max_length"),
    }
    parts = []
    for meta in field.metadata:
        for cls, (sign, attr) in signs.items():
            if isinstance(meta, cls):
                parts.append(f"{sign} {getattr(meta, attr)}")
    return ", ".join(parts)


def _size(value: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale and value % scale == 0:
            return f" ({value // scale} {unit})"
    return ""


def _default(name: str, field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path):
        # The default of a source or editable install: shown relative to the checkout, so the
        # page is the same on every machine.
        try:
            return f"`{value.resolve().relative_to(ROOT)}/` of the checkout"
        except ValueError:
            return f"`{value}`"
    if isinstance(value, list | dict):
        return f"`{json.dumps(value)}`"
    if isinstance(value, int) and name.endswith("_bytes"):
        return f"`{value}`{_size(value)}"
    return f"`{value}`"


def _cell(text: str) -> str:
    """Text for one table cell: one line, `|` escaped, and `<`/`>` outside code spans written
    as entities (a description's `<name>` is not an HTML tag)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def settings_table() -> str:
    """One row per field of service.settings.Settings, in declaration order."""
    from service.settings import Settings

    flags = _flags()
    rows = [
        "| Variable | `rcegate serve` option | Default | Values | Meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        if not field.description:
            raise GeneratorError(f"Settings.{name} has no description")
        values = ", ".join(x for x in (_kind(field.annotation), _bounds(field)) if x)
        flag = f"`{flags[name]}`" if name in flags else ""
        rows.append(
            f"| `RCEGATE_{name.upper()}` | {flag} | {_cell(_default(name, field))} | "
            f"{_cell(values)} | {_cell(field.description)} |"
        )
    return "\n".join(rows) + "\n"


# -- the benchmarks page: bench/results/<name>.json --------------------------------------------


def _format(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float) and spec:
        return format(value, spec)
    if isinstance(value, float):
        return f"{value:g}"
    return _cell(str(value))


def bench_tables(name: str, results: Path = RESULTS) -> str:
    """The tables of bench/results/<name>.json, headed by how, when and where they were made."""
    path = results / f"{name}.json"
    if not path.is_file():
        raise GeneratorError(f"no result file bench/results/{name}.json")
    result = json.loads(path.read_text())
    machine = result["machine"]
    where = f"{machine['cpus']} CPUs"
    if machine.get("cpu_model"):
        where += f" ({machine['cpu_model']})"
    where += f", {machine['gpu']}" if machine.get("gpu") else ", no GPU"
    where += f", load average {machine['load_average_1m']} at the start"
    commit = (result.get("commit") or "unknown")[:10]
    lines = [
        f"**{result['title']}.** Measured {result['date'][:10]} on {where}, commit `{commit}`, "
        f"with `{result['command']}` ([raw figures](../bench/results/{name}.json)).",
        "",
    ]
    for note in result.get("notes", []):
        lines += [f"{_cell(note)}", ""]
    for table in result["tables"]:
        formats = table.get("formats") or [""] * len(table["columns"])
        lines += [f"*{table['title']}*", ""]
        lines.append("| " + " | ".join(_cell(c) for c in table["columns"]) + " |")
        lines.append("| " + " | ".join("---" for _ in table["columns"]) + " |")
        for row in table["rows"]:
            cells = [_format(v, f) for v, f in zip(row, formats, strict=True)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# -- regions -----------------------------------------------------------------------------------


def generator(name: str) -> Callable[[], str]:
    if name == "settings":
        return settings_table
    kind, _, arg = name.partition(" ")
    if kind == "bench" and arg:
        return lambda: bench_tables(arg)
    raise GeneratorError(f"unknown generated region {name!r}")


def render(markdown: str) -> tuple[str, list[str]]:
    """The page with every region regenerated, and the names of the regions that changed."""
    stale: list[str] = []

    def fill(match: re.Match[str]) -> str:
        body = generator(match["name"])()
        if body != match["body"]:
            stale.append(match["name"])
        return match[1] + body + match[4]

    return REGION.sub(fill, markdown), stale


def rendered_benchmarks(pages: list[Path]) -> set[str]:
    names = set()
    for page in pages:
        for match in REGION.finditer(page.read_text()):
            kind, _, arg = match["name"].partition(" ")
            if kind == "bench":
                names.add(arg)
    return names


def problems(pages: list[Path] | None = None, results: Path = RESULTS) -> list[str]:
    """Every way the committed docs differ from what this module generates."""
    pages = sorted(DOCS.glob("*.md")) if pages is None else pages
    found = []
    for page in pages:
        try:
            _, stale = render(page.read_text())
        except GeneratorError as error:
            found.append(f"{page.relative_to(ROOT)}: {error}")
            continue
        found += [f"{page.relative_to(ROOT)}: region {name!r} is out of date" for name in stale]
    shown = rendered_benchmarks(pages)
    for result in sorted(results.glob("*.json")):
        if result.stem not in shown:
            found.append(
                f"bench/results/{result.name} is shown on no page: add "
                f"'<!-- generated: bench {result.stem} -->' to docs/benchmarks.md"
            )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = parser.parse_args()
    if args.check:
        found = problems()
        for problem in found:
            print(f"error: {problem} (run: {REGENERATE})", file=sys.stderr)  # noqa: T201
        sys.exit(1 if found else 0)
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        new, stale = render(text)
        if stale:
            page.write_text(new)
            print(f"{page.relative_to(ROOT)}: regenerated {', '.join(stale)}")  # noqa: T201


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
