"""A service-only install (`pip install -e '.[cpu]'`: the training package is there, torch is
not) runs the real `rcegate` command: --help lists only what can run and names the extra the
rest needs; a training command invoked anyway is one `error:` line and exit 1."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT
from tests.rcegate.test_cli import SERVICE_COMMANDS

# torch (and what only the training extra brings) cannot be imported, as in such an install.
WITHOUT_TORCH = """
import sys

for name in ("torch", "onnx", "onnxscript", "art"):
    sys.modules[name] = None  # import fails, find_spec finds nothing: not installed
sys.argv = ["rcegate", *sys.argv[1:]]
import rcegate.cli
rcegate.cli.main()
"""


def rcegate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={"COLUMNS": "100", "TERM": "dumb", "PATH": "/usr/bin:/bin"},
    )


def test_help_lists_the_service_commands_and_names_the_extra_for_the_rest() -> None:
    result = rcegate("--help")
    assert result.returncode == 0, result.stderr
    listed = result.stdout.split("Commands:")[1].split("\n\n")[0].split()
    assert sorted(word for word in listed if word in SERVICE_COMMANDS + ["train"]) == (
        SERVICE_COMMANDS
    )
    note = " ".join(result.stdout.split("Commands:")[1].split("\n\n", 1)[1].split())
    assert note.startswith(
        "Not available in this install: ablation, calibrate, detector-variants, evaluate,"
    )
    assert "needs the training extra: pip install 'rcegate[train]'" in note


def test_a_training_command_is_one_error_line_naming_the_extra() -> None:
    for command in (["train", "--dry-run"], ["stamp", "models/mnist-rce/2"]):
        result = rcegate(*command)
        assert result.returncode == 1, command
        assert result.stderr.strip().splitlines() == [
            "error: this command needs the training extra: pip install 'rcegate[train]' "
            "(in a checkout: '.[train]')"
        ], command
