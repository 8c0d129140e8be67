"""The demo page (`GET /demo`): drop or pick an image, see the label, the verdict, the score
against the threshold and the class probabilities as bars.

A static page (service/static/: HTML, one script, one stylesheet; no external assets, no inline
script or style, a strict Content-Security-Policy) whose script posts to the ordinary
`POST /v1/predict`, so every limit, the API keys and the metrics apply to it as to any client.
The page, its assets and the sample images carry nothing about the models, so they are open
even when API keys are set; the script sends the key the user types. `RCEGATE_DEMO=false` turns
it all off (404). Samples come from `RCEGATE_DEMO_SAMPLES_DIR` (`samples/` of a source or
editable install, made by `rcegate samples`): only the PNGs its samples.json lists.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from service.errors import NotFound
from service.settings import Settings

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
PAGE = "/demo"
SAMPLES = "/demo/samples/"
ASSETS = {
    PAGE: ("demo.html", "text/html; charset=utf-8"),
    "/demo/app.js": ("demo.js", "text/javascript; charset=utf-8"),
    "/demo/style.css": ("demo.css", "text/css; charset=utf-8"),
}
OPEN_PATHS = frozenset({*ASSETS, "/demo/samples.json"})
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_SAMPLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\.png")
MAX_SAMPLES = 32
MAX_SAMPLE_BYTES = 1 << 20


def is_open(path: str) -> bool:
    """A demo path that needs no API key (the page, its assets, the sample images)."""
    return path in OPEN_PATHS or path.startswith(SAMPLES)


def load_samples(directory: Path) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """The samples listed in `directory/samples.json`: their descriptions and PNG bytes.

    Anything odd (no file, bad JSON, a name that is not a plain .png, a missing or oversized
    file) leaves that sample, or all of them, out with a log line; the page works without."""
    record = directory / "samples.json"
    if not record.is_file():
        return [], {}
    try:
        entries = json.loads(record.read_text(encoding="utf-8"))["samples"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("demo samples: %s is unreadable (%s); none served", record, exc)
        return [], {}
    listed: list[dict[str, Any]] = []
    data: dict[str, bytes] = {}
    for entry in entries[:MAX_SAMPLES]:
        name = entry.get("file") if isinstance(entry, dict) else None
        path = directory / str(name)
        if not (isinstance(name, str) and _SAMPLE_NAME.fullmatch(name) and path.is_file()):
            logger.warning("demo samples: skipping %r", name)
            continue
        if path.stat().st_size > MAX_SAMPLE_BYTES:
            logger.warning("demo samples: skipping %s (over %d bytes)", name, MAX_SAMPLE_BYTES)
            continue
        data[name] = path.read_bytes()
        listed.append(
            {"file": name, "kind": entry.get("kind"), "true_label": entry.get("true_label")}
        )
    return listed, data


def install_demo(app: FastAPI, settings: Settings) -> None:
    """Add the demo routes when `settings.demo`; the assets are read once, here."""
    if not settings.demo:
        return
    assets = {path: ((STATIC / file).read_bytes(), media) for path, (file, media) in ASSETS.items()}
    listed, samples = load_samples(settings.demo_samples_dir)

    def asset(path: str) -> Response:
        body, media = assets[path]
        return Response(body, media_type=media, headers=HEADERS)

    @app.get(PAGE, include_in_schema=False)
    async def page() -> Response:
        return asset(PAGE)

    @app.get("/demo/app.js", include_in_schema=False)
    async def script() -> Response:
        return asset("/demo/app.js")

    @app.get("/demo/style.css", include_in_schema=False)
    async def style() -> Response:
        return asset("/demo/style.css")

    @app.get("/demo/samples.json", include_in_schema=False)
    async def sample_list() -> JSONResponse:
        return JSONResponse(listed, headers=HEADERS)

    @app.get(SAMPLES + "{name}", include_in_schema=False)
    async def sample(name: str) -> Response:
        if name not in samples:
            raise NotFound(f"no sample {name!r}")
        return Response(samples[name], media_type="image/png", headers=HEADERS)
