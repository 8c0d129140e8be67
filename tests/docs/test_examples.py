"""Every request example of the README and docs/*.md runs against a real `rcegate serve`, and
prints what the text shows after it (tests/docs/examples.py says how examples are found and how
output is compared). A new example is picked up without any change here."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.docs import examples as ex
from tests.service.live import Live, free_port, live_server

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = [example for page in PAGES for example in ex.examples(page)]
CURL = "/usr/bin/curl"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Live, int]]:
    log = tmp_path_factory.mktemp("examples") / "server.log"
    grpc_port = free_port()
    with live_server(log, grpc_port=str(grpc_port)) as live:
        yield live, grpc_port


@pytest.fixture(scope="module")
def failing_curl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose `curl` fails on an HTTP error status: an example that shows no output
    must at least not be answered with an error."""
    bin_dir = tmp_path_factory.mktemp("bin")
    shim = bin_dir / "curl"
    shim.write_text(f'#!/bin/sh\nexec {CURL} --fail-with-body "$@"\n')
    shim.chmod(0o755)
    return bin_dir


def run(example: ex.Example, live: Live, grpc_port: int, bin_dir: Path) -> str:
    code = example.code.replace("127.0.0.1:8000", f"127.0.0.1:{live.port}")
    code = code.replace("127.0.0.1:8001", f"127.0.0.1:{grpc_port}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCEGATE_")}
    python_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(
        ([str(bin_dir)] if example.output is None else []) + [python_dir, env.get("PATH", "")]
    )
    if example.lang == "python":
        command = [sys.executable, "-c", code]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", code]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (
        f"{example.name} exited with {done.returncode}:\n{code}\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def test_the_docs_have_request_examples() -> None:
    pages = {example.path.name for example in EXAMPLES}
    assert {"README.md", "api.md", "install.md"} <= pages
    assert any(example.lang == "python" for example in EXAMPLES)
    assert sum(example.output is not None for example in EXAMPLES) >= 8


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.name for example in EXAMPLES])
def test_the_example_runs_and_prints_what_the_text_shows(
    example: ex.Example, served: tuple[Live, int], failing_curl: Path
) -> None:
    live, grpc_port = served
    printed = run(example, live, grpc_port, failing_curl)
    if example.output is None:
        return
    if example.output_lang == "json":
        problems = ex.compare_json(example.output, printed)
    else:
        problems = ex.compare_text(example.output, printed)
    assert not problems, f"{example.name}:\n" + "\n".join(problems) + f"\nprinted:\n{printed}"


def test_shown_json_is_compared_on_the_keys_and_precision_shown() -> None:
    printed = '{"a": 1, "b": {"score": -2.57991, "x": [1, 2]}, "c": "text", "d": null}'
    assert ex.compare_json('{"b": {"score": -2.58}, "c": "..."}', printed) == []
    assert ex.compare_json('{"b": {"score": -2.5799, "x": [1, 2]}, "d": null}', printed) == []
    assert ex.compare_json('{"b": {"score": -2.57}}', printed) == [
        "$.b.score: expected -2.57, got -2.57991"
    ]
    assert ex.compare_json('{"b": {"x": [1]}}', printed) == ["$.b.x: expected 1 items, got [1, 2]"]
    assert ex.compare_json('{"e": 1}', printed) == ["$.e: missing"]
    assert ex.compare_json('{"a": true}', printed) == ["$.a: expected True, got 1"]
    assert ex.compare_json('{"a": 1}', "not json")[0].startswith("the example printed no")


def test_shown_text_is_compared_line_by_line_within_the_precision_shown() -> None:
    printed = "[ 7 -1] [ True False] [-2.579911 -8.197964]\n"
    assert ex.compare_text("[ 7 -1] [ True False] [-2.58 -8.20]", printed) == []
    assert ex.compare_text("[ 7  -1]   [ True False] [-2.579911 -8.197964]", printed) == []
    assert ex.compare_text("[ 7 -1] [ True True] [-2.58 -8.20]", printed) != []
    assert ex.compare_text("[ 7 -1] [ True False] [-2.57 -8.20]", printed) == [
        "line 1: expected -2.57, got -2.579911 ('[ 7 -1] [ True False] [-2.579911 -8.197964]')"
    ]
    assert ex.compare_text("one\ntwo", printed)[0].startswith("expected 2 lines, got 1")


def test_request_examples_are_told_from_other_code_blocks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```bash\nbash scripts/serve   # serves http://127.0.0.1:8000\n```\n\n"
        "```bash\ncurl -s localhost:8000/v1/models   # a container\n```\n\n"
        "```bash\ncurl -s http://127.0.0.1:8000/health/live\n```\n\n"
        '<!-- output -->\n\n```json\n{"status": "live"}\n```\n\n'
        "```python\nprint(InferenceServerClient('127.0.0.1:8001'))\n```\n"
    )
    found = ex.examples(page)
    assert [(e.line, e.lang, e.output_lang) for e in found] == [
        (9, "bash", "json"),
        (19, "python", None),
    ]
    assert found[0].output == '{"status": "live"}\n'
