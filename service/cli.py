"""`rcegate serve`: the service's subcommand of the `rcegate` command (package `rcegate`).

Registered through the `rcegate.commands` entry-point group; `--help` shows the value in force
for every option (an `RCEGATE_*` variable, else the built-in default).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from service.settings import Settings

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
    workers: Annotated[
        str | None,
        typer.Option(
            help="Server processes behind the ports: a number, or auto (from the cores and the "
            "provider). " + _FROM_ENV.format("WORKERS"),
            show_default=_in_force("workers"),
        ),
    ] = None,
) -> None:
    """Serve every model version under the model repository over HTTP (see /docs)."""
    from pydantic import ValidationError

    given: dict[str, Any] = {
        "host": host,
        "port": port,
        "model_dir": model_dir,
        "default_model": default_model,
        "providers": providers,
        "mode": mode,
        "log_level": log_level,
        "grpc_port": grpc_port,
        "workers": workers,
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
    from service.workers import run_supervisor, worker_count

    count = worker_count(settings)
    if count > 1:  # the supervisor loads no model: each worker process does
        raise typer.Exit(run_supervisor(settings, count))
    from service.app import create_app
    from service.server import serve as serve_app

    serve_app(create_app(settings), settings)


def register(app: typer.Typer) -> None:
    """Add `rcegate serve` to the command."""
    app.command()(serve)
