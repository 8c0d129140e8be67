"""The committed benchmark result files, bench/results/<name>.json, and how they are written.

Every bench script that takes `--json PATH` writes one file through `write_result`: the raw
figures of the run, the tables a reader should see (the docs' benchmarks page renders exactly
these, so its figures come from runs, never from hand edits), and what is needed to judge and
repeat the run: the command, the date, the commit and the machine (CPUs, load, accelerator).

    {"benchmark": "serving", "title": "...", "command": "python bench/serving.py --json ...",
     "date": "2026-12-05T10:00:00Z", "commit": "<sha>", "machine": {...},
     "figures": {... everything the script measured ...},
     "tables": [{"title": "...", "columns": ["configuration", "images/s"],
                 "formats": ["", ".1f"], "rows": [["service @1", 410.5]]}],
     "notes": ["..."]}

`formats` (optional) gives a Python format spec per column, applied to numeric cells.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def table(
    title: str, columns: list[str], rows: list[list[Any]], formats: list[str] | None = None
) -> dict[str, Any]:
    """One table of a result file; `formats` holds a format spec per column ('' = as is)."""
    if any(len(row) != len(columns) for row in rows):
        raise ValueError(f"table {title!r}: every row needs {len(columns)} cells")
    if formats is not None and len(formats) != len(columns):
        raise ValueError(f"table {title!r}: one format per column")
    return {"title": title, "columns": columns, "formats": formats, "rows": rows}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _gpu() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def _commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
        )
    except OSError:
        return None
    return done.stdout.strip() or None


def machine() -> dict[str, Any]:
    """The machine a figure was measured on: enough to tell a quiet 16-core GPU box from a
    loaded 2-core laptop when comparing runs."""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "gpu": _gpu(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def command() -> str:
    """The command line of this run, as a user would retype it from the repository root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def write_result(
    path: Path,
    benchmark: str,
    title: str,
    figures: dict[str, Any],
    tables: list[dict[str, Any]],
    notes: list[str] | None = None,
) -> None:
    """Write one result file (see the module docstring); the date, commit, machine and command
    are filled in here so no script can forget them."""
    result = {
        "benchmark": benchmark,
        "title": title,
        "command": command(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _commit(),
        "machine": machine(),
        "figures": figures,
        "tables": tables,
        "notes": notes or [],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
