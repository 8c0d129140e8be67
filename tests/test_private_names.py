"""No private name crosses a module: `_name` is the defining module's business alone.

An AST scan over the project's packages finds every `from pkg.mod import _name` and every
`mod._name` reached through an imported project module; a name another module needs is public,
so it can be found, documented and kept stable.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = tuple(p for p in ("training", "service", "models", "rcegate") if (ROOT / p).is_dir())


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    _module_name(path): path
    for package in PACKAGES
    for path in sorted((ROOT / package).rglob("*.py"))
    if ".venv" not in path.parts
}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute name of `from <node.module> import ...` written inside `module`."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not MODULES[module].name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def crossings(module: str, source: str) -> list[str]:
    """Where `module` (its source) imports or uses another project module's private name."""
    found = []
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> project module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            origin = _absolute(module, node)
            if origin.split(".")[0] not in PACKAGES or origin == module:
                continue
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"line {node.lineno}: from {origin} import {alias.name}")
                if f"{origin}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{origin}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    local = alias.asname or alias.name.split(".")[0]
                    aliases[local] = alias.name if alias.asname else local
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _private(node.attr):
            continue
        dotted, value = [], node.value
        while isinstance(value, ast.Attribute):
            dotted.insert(0, value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in aliases:
            target = ".".join([aliases[value.id], *dotted])
            if target in MODULES and target != module:
                found.append(f"line {node.lineno}: {target}.{node.attr}")
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_or_uses_another_modules_private_name(module: str) -> None:
    assert crossings(module, MODULES[module].read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    "source",
    [
        "from training.export import _source_commit\n",
        "from training import export\nexport._source_commit()\n",
        "import training.export\ntraining.export._source_commit()\n",
        "import training.export as e\ne._helper\n",
        "from .export import _source_commit\n",
    ],
)
def test_the_scan_finds_each_way_of_reaching_a_private_name(source: str) -> None:
    assert len(crossings("training.cli", source)) == 1


def test_the_scan_allows_own_private_names_and_public_ones() -> None:
    source = (
        "from training.export import export_artifact\n"
        "from models.manifest import sha256_file as _sha256\n"
        "def _local(): ...\n"
        "_local()\n"
        "from torch import _C\n"
    )
    assert crossings("training.cli", source) == []
