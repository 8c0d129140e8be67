"""The documentation site: it builds with `mkdocs build --strict` (no warning, no broken link or
anchor), needs nothing from the network, and its generated regions match their sources."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.results import table, write_result
from scripts import docsgen
from tests.conftest import ROOT

MKDOCS = Path(sys.executable).with_name("mkdocs")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    return out, log


def test_the_site_builds_strict_without_a_warning(site: tuple[Path, str]) -> None:
    out, log = site
    assert "WARNING" not in log, log
    for page in ("index", "install", "api", "configuration", "security", "deployment"):
        assert (out / f"{page}.html").is_file(), page
    for page in ("serving", "training", "evaluation", "benchmarks", "development"):
        assert (out / f"{page}.html").is_file(), page
    # the committed reports are published with the site, so links to them are checked too
    assert (out / "reports" / "mnist-5k" / "report.html").is_file()


def test_the_site_loads_nothing_from_the_network(site: tuple[Path, str]) -> None:
    out, _ = site
    remote = re.compile(r"""<(?:script|link|img)[^>]+(?:src|href)=["'](?:https?:)?//""", re.I)
    for html in out.rglob("*.html"):
        assert not remote.search(html.read_text()), html.relative_to(out)


def test_the_committed_generated_regions_are_current() -> None:
    assert docsgen.problems() == []


def test_the_configuration_page_lists_every_setting_with_its_description() -> None:
    from service.settings import Settings

    page = (ROOT / "docs" / "configuration.md").read_text()
    for name, field in Settings.model_fields.items():
        row = next(line for line in page.splitlines() if f"`RCEGATE_{name.upper()}`" in line)
        assert docsgen._cell(field.description or "") in row, name
    assert "| `RCEGATE_PORT` | `--port` | `8000` |" in page


def test_an_edited_generated_region_is_reported_stale() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    edited = page.replace("| `RCEGATE_PORT` | `--port` | `8000` |", "| `RCEGATE_PORT` | | `80` |")
    fixed, stale = docsgen.render(edited)
    assert stale == ["settings"]
    assert fixed == page


def test_a_region_naming_nothing_is_an_error() -> None:
    with pytest.raises(docsgen.GeneratorError, match="unknown generated region"):
        docsgen.render("<!-- generated: nonsense -->\n<!-- /generated -->\n")
    with pytest.raises(docsgen.GeneratorError, match="no result file"):
        docsgen.render("<!-- generated: bench no-such-run -->\n<!-- /generated -->\n")


def test_a_bench_result_renders_as_its_tables(tmp_path: Path) -> None:
    rows = [["service @1", 410.46, 2.3, None], ["raw ORT batch 64", 2229.1, 28.4, True]]
    write_result(
        tmp_path / "demo.json",
        "demo",
        "A demonstration",
        {"anything": 1},
        [table("Throughput", ["row", "images/s", "p50 ms", "ok"], rows, ["", ".1f", ".2f", ""])],
        ["a note"],
    )
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["command"].startswith("python ") and result["commit"]
    assert result["machine"]["cpus"] == os.cpu_count()
    text = docsgen.bench_tables("demo", tmp_path)
    assert "| service @1 | 410.5 | 2.30 | - |" in text
    assert "| raw ORT batch 64 | 2229.1 | 28.40 | yes |" in text
    assert "a note" in text and "A demonstration" in text


def test_a_result_file_shown_on_no_page_is_reported(tmp_path: Path) -> None:
    write_result(tmp_path / "orphan.json", "orphan", "Nobody shows me", {}, [])
    page = tmp_path / "page.md"
    page.write_text("# A page without generated regions\n")
    found = docsgen.problems([page], tmp_path)
    assert found == [
        "bench/results/orphan.json is shown on no page: add "
        "'<!-- generated: bench orphan -->' to docs/benchmarks.md"
    ]


def test_a_table_with_a_ragged_row_is_refused() -> None:
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        table("t", ["a", "b"], [["only one"]])


def test_the_build_fails_on_a_stale_generated_region(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    subprocess.run(["cp", "-r", str(ROOT / "docs"), str(docs)], check=True)
    page = docs / "configuration.md"
    page.write_text(page.read_text().replace("| `8000` |", "| `80` |", 1))
    config = (ROOT / "mkdocs.yml").read_text()
    config = config.replace("docs_dir: docs", f"docs_dir: {docs}")
    hooks = ROOT / "scripts" / "mkdocs_hooks.py"
    config = config.replace("  - scripts/mkdocs_hooks.py", f"  - {hooks}")
    (tmp_path / "mkdocs.yml").write_text(config)
    done = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert done.returncode != 0
    assert "configuration.md: generated region 'settings' is out of date" in done.stderr


def test_the_readme_stays_a_few_screens_and_links_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    # no notes to ourselves: the only HTML comments are the examples' output markers
    assert set(re.findall(r"<!--.*?-->", readme)) <= {"<!-- output -->"}
    linked = set(re.findall(r"\]\(docs/(\w+)\.md", readme))
    pages = {page.stem for page in (ROOT / "docs").glob("*.md")}
    assert linked == pages, pages ^ linked
