"""The `rcegate` command. Service commands live here; the training package adds its own
subcommands when it is installed (it imports torch only inside them)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.exceptions import TyperException

from models.triton import register as _register_triton
from service.settings import Settings
from service.signing import register as _register_signing

# Typer's own exception printer would show a long framed traceback for every error; main()
# prints one line instead, and the traceback only with --debug.
app = typer.Typer(
    help="rcegate: image classification that says whether to trust each answer.",
    pretty_exceptions_enable=False,
)
_debug = False


@app.callback()
def _options(
    debug: Annotated[
        bool,
        typer.Option("--debug", help="On an error, show the full traceback instead of one line."),
    ] = False,
) -> None:
    global _debug
    _debug = debug or bool(os.environ.get("RCEGATE_DEBUG"))


try:
    from training.cli import register as _register_training
except ModuleNotFoundError:  # a service-only install (the container image)
    pass
else:
    _register_training(app)
_register_triton(app)
_register_signing(app)

_FROM_ENV = "When not given: RCEGATE_{}, else the built-in default."
# What an unset setting means, for --help.
_UNSET = {"default_model": "mnist-rce if loaded, else the first loaded name"}


def _in_force(field: str) -> str:
    """The value `serve` uses when an option is not given: RCEGATE_<FIELD>, else the built-in
    default, as --help shows it."""
    variable = f"RCEGATE_{field.upper()}"
    if variable in os.environ:
        return f"{os.environ[variable]} (from {variable})"
    default = Settings.model_fields[field].get_default(call_default_factory=True)
    return _UNSET.get(field, "unset") if default is None else str(default)


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help=_FROM_ENV.format("HOST"), show_default=_in_force("host"))
    ] = None,
    port: Annotated[
        int | None, typer.Option(help=_FROM_ENV.format("PORT"), show_default=_in_force("port"))
    ] = None,
    model_dir: Annotated[
        Path | None,
        typer.Option(help=_FROM_ENV.format("MODEL_DIR"), show_default=_in_force("model_dir")),
    ] = None,
    default_model: Annotated[
        str | None,
        typer.Option(
            help=_FROM_ENV.format("DEFAULT_MODEL"), show_default=_in_force("default_model")
        ),
    ] = None,
    providers: Annotated[
        str | None,
        typer.Option(
            help="auto | cpu | cuda. " + _FROM_ENV.format("PROVIDERS"),
            show_default=_in_force("providers"),
        ),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help="annotate | enforce. " + _FROM_ENV.format("MODE"), show_default=_in_force("mode")
        ),
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(help=_FROM_ENV.format("LOG_LEVEL"), show_default=_in_force("log_level")),
    ] = None,
    grpc_port: Annotated[
        int | None,
        typer.Option(
            help="OIP gRPC port, 0 = off. " + _FROM_ENV.format("GRPC_PORT"),
            show_default=_in_force("grpc_port"),
        ),
    ] = None,
) -> None:
    """Serve every model version under the model repository over HTTP (see /docs)."""
    from pydantic import ValidationError

    from service.app import create_app
    from service.server import serve as serve_app

    given: dict[str, Any] = {
        "host": host,
        "port": port,
        "model_dir": model_dir,
        "default_model": default_model,
        "providers": providers,
        "mode": mode,
        "log_level": log_level,
        "grpc_port": grpc_port,
    }
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"RCEGATE_{'_'.join(map(str, e['loc'])).upper() or 'SETTINGS'}: {e['msg']} "
            f"(got {e['input']!r})"
            for e in exc.errors()
        )
        typer.echo(f"error: invalid settings: {problems}", err=True)
        raise typer.Exit(2) from None
    logging.getLogger().setLevel(settings.log_level.upper())
    serve_app(create_app(settings), settings)


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


if __name__ == "__main__":
    main()
