"""The `rcegate` Typer app, its global `--debug` option and `main()`'s one-line errors.

Subcommands come from the `rcegate.commands` entry-point group: each member names a
`register(app)` function of one stage (`service.cli:register`, `training.cli:register`, ...).
A member whose stage is not installed is skipped; any other import error is a bug and raised.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Annotated

import typer
from typer.exceptions import TyperException

GROUP = "rcegate.commands"

logger = logging.getLogger(__name__)

_debug = False


def _options(
    debug: Annotated[
        bool,
        typer.Option("--debug", help="On an error, show the full traceback instead of one line."),
    ] = False,
) -> None:
    global _debug
    _debug = debug or bool(os.environ.get("RCEGATE_DEBUG"))


def _stage_missing(entry_point: EntryPoint, error: ModuleNotFoundError) -> bool:
    """True when `error` says the entry point's own top-level package is absent (the stage is not
    installed here), as opposed to a module that an installed stage fails to import."""
    return error.name == entry_point.module.split(".")[0]


def load_commands(app: typer.Typer, group: str = GROUP) -> list[str]:
    """Call every installed `register(app)` of `group`; return the names of those registered."""
    registered = []
    for entry_point in entry_points(group=group):
        try:
            register: Callable[[typer.Typer], None] = entry_point.load()
        except ModuleNotFoundError as error:
            if not _stage_missing(entry_point, error):
                raise
            logger.debug("skipping %s: %s is not installed", entry_point.name, error.name)
            continue
        register(app)
        registered.append(entry_point.name)
    return registered


def build_app() -> typer.Typer:
    # Typer's own exception printer would show a long framed traceback for every error; main()
    # prints one line instead, and the traceback only with --debug.
    # Plain help (no rich markup): click wraps every paragraph to the terminal and shows no
    # `<bool>` type for flags; shell completion is left to the shell.
    app = typer.Typer(
        help="rcegate: image classification that says whether to trust each answer.",
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        add_completion=False,
        context_settings={"max_content_width": 100},
    )
    app.callback()(_options)
    load_commands(app)
    return app


app = build_app()


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        code = app(standalone_mode=False)
    except TyperException as error:  # a bad option value, a missing argument (typer's click)
        typer.echo(f"error: {error.format_message()} (--help lists the options)", err=True)
        sys.exit(error.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as error:
        if _debug:
            raise
        # A user's mistake (a missing file, a bad value) deserves one line, not a traceback.
        message = str(error) or type(error).__name__
        typer.echo(f"error: {message} (--debug shows the traceback)", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
