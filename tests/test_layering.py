"""The import graph follows the data flow, checked from the source (every import statement,
including those inside functions and under TYPE_CHECKING): training -> models <- service, with
the `rcegate` command package above them knowing the stages only by entry point."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT

# package -> top-level modules it must never import
FORBIDDEN = {
    "rcegate": {"service", "training", "models", "torch"},
    "service": {"training", "torch", "rcegate"},
    "models": {"service", "training", "torch", "rcegate"},
    "training": {"service", "rcegate"},
}


def imported_modules(source: str, package: str) -> set[str]:
    """Top-level names of every module imported by `source`, a module of `package`."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # A relative import stays inside its own package.
            found.add(package if node.level else (node.module or "").split(".")[0])
    return found


def violations(package: str) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for module in sorted(imported_modules(path.read_text(encoding="utf-8"), package))
        if module in FORBIDDEN[package]
    ]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down_the_data_flow(package: str) -> None:
    assert list((ROOT / package).rglob("*.py")), f"{package}/ has no modules"
    assert violations(package) == []


def test_the_scan_sees_imports_in_functions_and_under_type_checking() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from training.nets import ResNet\n"
        "def f():\n    import torch.nn\n    from . import sibling\n"
    )
    assert imported_modules(source, "service") == {"typing", "training", "torch", "service"}
