"""mkdocs hooks (mkdocs.yml `hooks:`): the generated regions and the files beside docs/.

- Every generated region (scripts/docsgen.py) is rendered afresh at build time; when the
  committed text differs, a warning names the page and region, so `mkdocs build --strict` fails
  until `python scripts/docsgen.py` is run and its output committed.
- The committed evaluation reports (reports/) and benchmark results (bench/results/) live beside
  docs/, where the pages link them as `../reports/...` (so the links also work when browsing the
  repository). The hook adds those files to the site and points the links at the copies, so
  strict link checking covers them too.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts import docsgen  # noqa: E402

log = logging.getLogger("mkdocs.hooks.rcegate")

# Directories of the repository published with the site, and the files of them that are.
BESIDE = {"reports": ("*.md", "*.png", "*.json"), "bench/results": ("*.json",)}
LINK = re.compile(r"\]\(\.\./(" + "|".join(re.escape(d) for d in BESIDE) + r")/")


def on_files(files: Files, config: Any) -> Files:
    for directory, patterns in BESIDE.items():
        for pattern in patterns:
            for path in sorted((ROOT / directory).rglob(pattern)):
                files.append(
                    File(
                        str(path.relative_to(ROOT)),
                        src_dir=str(ROOT),
                        dest_dir=config["site_dir"],
                        use_directory_urls=config["use_directory_urls"],
                    )
                )
    return files


def on_page_markdown(markdown: str, page: Page, config: Any, files: Files) -> str:
    if page.file.src_uri.startswith(tuple(BESIDE)):
        return markdown  # a report as committed
    try:
        markdown, stale = docsgen.render(markdown)
    except docsgen.GeneratorError as error:
        log.warning("%s: %s", page.file.src_uri, error)
        return markdown
    for name in stale:
        log.warning(
            "%s: generated region %r is out of date; run `%s` and commit the result",
            page.file.src_uri,
            name,
            docsgen.REGENERATE,
        )
    return LINK.sub(r"](\1/", markdown)
