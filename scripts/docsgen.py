"""The generated parts of the documentation, so that they cannot drift from their sources.

A page marks a generated region with two HTML comments; everything between them is output of
this module and nothing else:

    <!-- generated: settings -->            the configuration table, from service.settings
    <!-- /generated -->
    <!-- generated: bench serving -->       the tables of bench/results/serving.json
    <!-- /generated -->
    <!-- generated: evaluation mnist-5k oblivious -->   reports/mnist-5k/results.json: K-density,
    <!-- /generated -->                                 Mahalanobis, combined (or: adaptive)
    <!-- generated: variants mnist-5k -->   reports/mnist-5k/variants/results.json
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


# -- the evaluation page: reports/<dataset>/results.json and variants/results.json ----------

REPORTS = ROOT / "reports"
ATTACK_TITLES = {
    "fgsm": "FGSM", "bim": "BIM", "illcm": "ILLCM", "jsma": "JSMA", "cw-l2": "C&W-L2",
    "cw-hc": "C&W-hc", "pgd": "PGD (label only)", "pgd-adaptive": "PGD-adaptive",
    "cw-wb": "C&W-wb", "pgd-adaptive-mahalanobis": "PGD-adaptive",
    "cw-wb-mahalanobis": "C&W-wb", "pgd-adaptive-combined": "PGD-adaptive",
    "cw-wb-combined": "C&W-wb",
}  # fmt: skip
METRIC_TITLES = {"log_kd": "K-density", "mahalanobis": "Mahalanobis", "combined": "combined"}
OBLIVIOUS = ("fgsm", "bim", "illcm", "jsma", "cw-l2", "cw-hc", "pgd")
ADAPTIVE = (
    "pgd-adaptive", "cw-wb", "pgd-adaptive-mahalanobis", "cw-wb-mahalanobis",
    "pgd-adaptive-combined", "cw-wb-combined",
)  # fmt: skip
# The variants shown on the page (the report has every one): K-density, the Mahalanobis score
# on the final features (the simplest form), the layer ensemble fitted on the training split
# (deployed) or on the K-density bank's images, and the deployed union.
VARIANTS = {
    "K-density": "K-density",
    "features (train)": "Maha. features",
    "stage1+features (train)": "Maha. stage1 + features",
    "all (train)": "Maha. all layers",
    "all (bank)": "Maha. all layers, fitted on the bank",
    "K-density or all (train)": "K-density or Maha. all layers (deployed)",
}


def _report(reports: Path, relative: str) -> dict[str, Any]:
    path = reports / relative
    if not path.is_file():
        raise GeneratorError(f"no result file reports/{relative}")
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _auc_rejected(cell: dict[str, Any] | None) -> str:
    if not cell or cell.get("roc_auc") is None:
        return "-"
    return f"{cell['roc_auc']:.3f} / {_pct(cell.get('detection_rate'))}"


def evaluation_tables(dataset: str, part: str, reports: Path = REPORTS) -> str:
    """From reports/<dataset>/results.json: the oblivious attacks under K-density, Mahalanobis
    and the combined decision (AUC / rejected), or the adaptive attacks aimed at each test."""
    result = _report(reports, f"{dataset}/results.json")
    models = result["models"]
    objectives = [o for o in ("ce", "rce") if o in models]
    names = " and ".join(f"`{models[o]['name']}/{models[o]['version']}`" for o in objectives)
    head = (
        f"*{dataset}* ({names}; [report](../reports/{dataset}/report.md), "
        f"{result['images_fast']} test images for FGSM/BIM/ILLCM, {result['images_slow']} for "
        f"the rest, eps {result['settings']['eps']:g}, PGD eps {result['settings']['pgd_eps']:g} "
        f"x {result['settings']['pgd_steps']} steps)"
    )
    if part == "oblivious":
        metrics = [
            m for m in METRIC_TITLES if all(m in models[o]["thresholds"] for o in objectives)
        ]
        lines = [
            head + ": ROC-AUC / rejected at the deployed threshold.",
            "",
            "| attack | "
            + " | ".join(f"{METRIC_TITLES[m]} {o.upper()}" for m in metrics for o in objectives)
            + " |",
            "| --- |" + " ---: |" * (len(metrics) * len(objectives)),
        ]
        clean = ["clean test images rejected"] + [
            _pct(models[o]["clean"]["rejection_rate"].get(m)) for m in metrics for o in objectives
        ]
        lines.append("| " + " | ".join(clean) + " |")
        for attack in OBLIVIOUS:
            row = [ATTACK_TITLES[attack]]
            for metric in metrics:
                for o in objectives:
                    found = models[o]["attacks"].get(attack)
                    row.append(_auc_rejected(found["metrics"].get(metric) if found else None))
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines) + "\n"
    if part == "adaptive":
        lines = [
            head + ": each adaptive attack aims at the label and one test at its deployed "
            "threshold. *Rejected*: kept adversarial images that test rejects; *accepted and "
            "wrong*: clean-correct images the attack turned into misclassified images that "
            "test accepts.",
            "",
            "| attack | aimed at | "
            + " | ".join(
                f"{o.upper()} rejected | {o.upper()} accepted and wrong" for o in objectives
            )
            + " |",
            "| --- | --- |" + " ---: | ---: |" * len(objectives),
        ]
        for attack in ADAPTIVE:
            if not all(attack in models[o]["attacks"] for o in objectives):
                continue
            aim = models[objectives[0]]["attacks"][attack]["params"]["metric"]
            row = [ATTACK_TITLES[attack], METRIC_TITLES.get(aim, aim)]
            for o in objectives:
                found = models[o]["attacks"][attack]
                rejected = (found["metrics"].get(aim) or {}).get("detection_rate")
                through = None if rejected is None else found["success_rate"] * (1 - rejected)
                row += [_pct(rejected), _pct(through)]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines) + "\n"
    raise GeneratorError(f"unknown evaluation table {part!r}: oblivious or adaptive")


def variants_table(dataset: str, reports: Path = REPORTS) -> str:
    """From reports/<dataset>/variants/results.json: the detectors tried, one table per model."""
    result = _report(reports, f"{dataset}/variants/results.json")
    models = result["models"]
    lines = [
        f"*{dataset}* ([report](../reports/{dataset}/variants/report.md), {result['images']} test "
        "images, oblivious attacks, every variant at its own threshold for "
        f"{result['target_fpr']:g} clean FPR): ROC-AUC / rejected.",
        "",
    ]
    for objective in (o for o in ("rce", "ce") if o in models):
        model = models[objective]
        attacks = list(model["attacks"])
        lines += [
            f"`{model['name']}/{model['version']}` ({objective.upper()}):",
            "",
            "| variant | clean rejected | " + " | ".join(attacks) + " |",
            "| --- | ---: |" + " ---: |" * len(attacks),
        ]
        for variant, title in VARIANTS.items():
            cells = [_auc_rejected(model["attacks"][a].get(variant)) for a in attacks]
            rejected = _pct(model["clean_test_rejection"].get(variant))
            lines.append(f"| {title} | {rejected} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# -- regions -----------------------------------------------------------------------------------


def generator(name: str) -> Callable[[], str]:
    if name == "settings":
        return settings_table
    kind, _, arg = name.partition(" ")
    if kind == "bench" and arg:
        return lambda: bench_tables(arg)
    if kind == "evaluation" and len(arg.split()) == 2:
        dataset, part = arg.split()
        return lambda: evaluation_tables(dataset, part)
    if kind == "variants" and arg:
        return lambda: variants_table(arg)
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
