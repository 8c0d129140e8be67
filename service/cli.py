"""`rcegate serve`: the service's subcommand of the `rcegate` command (package `rcegate`).

Registered through the `rcegate.commands` entry-point group; `--help` shows the value in force
for every option (an `RCEGATE_*` variable, else the built-in default).

A mistake stops `serve` before anything is loaded, with one line on stderr that names what the
user typed: an invalid value (the option, or the `RCEGATE_*` variable it came from; exit 2), a
model directory that does not exist, or a port that is in use (HTTP or gRPC; exit 1).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
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


def _help(field: str, extra: str = "") -> str:
    """An option's help: the setting's own description (the configuration page's text), its
    variable, and the value in force when the option is not given."""
    description = Settings.model_fields[field].description or ""
    return f"{description}{extra} [RCEGATE_{field.upper()}; now: {_in_force(field)}]"


def _option(field: str, extra: str = "") -> Any:
    return typer.Option(help=_help(field, extra), show_default=False)


class ServeError(Exception):
    """A mistake in how `serve` was started, said in one line (exit 1)."""


def _source(field: str, given: dict[str, Any]) -> str:
    """Where a setting's value came from, as the user typed it: the option, the variable, or
    the default (then both ways to change it)."""
    option = "--" + field.replace("_", "-")
    variable = f"RCEGATE_{field.upper()}"
    if given.get(field) is not None:
        return option
    if variable in os.environ:
        return variable
    return f"the default; set {option} or {variable}"


def _settings_error(exc: Exception, given: dict[str, Any]) -> str:
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        # pydantic-settings: a variable that is not valid JSON, say
        named = re.search(r'for field "(\w+)"', str(exc))
        if named is None:
            return str(exc)
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        return f"RCEGATE_{named[1].upper()}: cannot be parsed{cause}"
    problems = []
    for error in exc.errors():
        field = "_".join(map(str, error["loc"][:1]))
        message = error["msg"].removeprefix("Value error, ")
        if field in Settings.model_fields:
            where = _source(field, given).removeprefix("the default; set ")
            problems.append(f"{where}: {message} (got {error['input']!r})")
        else:
            problems.append(message)
    return "; ".join(problems)


def _check_port(kind: str, field: str, host: str, port: int, given: dict[str, Any]) -> None:
    """Refuse a port that cannot be listened on now, before any model is loaded."""
    if port == 0:
        return
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ServeError(
            f"cannot listen on {host}: {exc.strerror} ({_source('host', given)})"
        ) from None
    family, kind_, proto, _, address = found[0]
    with socket.socket(family, kind_, proto) as probe:
        # As the servers bind: an address in TIME_WAIT is free, one with a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            reason = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be used: {exc}"
            raise ServeError(
                f"the {kind} port {port} on {host} {reason} ({_source(field, given)})"
            ) from None


def _check(settings: Settings, given: dict[str, Any]) -> None:
    if not settings.model_dir.is_dir():
        raise ServeError(
            f"model directory {settings.model_dir} does not exist ({_source('model_dir', given)})"
        )
    if settings.grpc_port and settings.grpc_port == settings.port:
        raise ServeError(
            f"the HTTP and gRPC ports are both {settings.port} ({_source('port', given)}, "
            f"{_source('grpc_port', given)})"
        )
    _check_port("HTTP", "port", settings.host, settings.port, given)
    _check_port("gRPC", "grpc_port", settings.host, settings.grpc_port, given)


def serve(
    host: Annotated[str | None, _option("host")] = None,
    port: Annotated[int | None, _option("port")] = None,
    model_dir: Annotated[Path | None, _option("model_dir")] = None,
    default_model: Annotated[str | None, _option("default_model")] = None,
    providers: Annotated[str | None, _option("providers")] = None,
    mode: Annotated[str | None, _option("mode")] = None,
    log_level: Annotated[str | None, _option("log_level")] = None,
    grpc_port: Annotated[int | None, _option("grpc_port")] = None,
    workers: Annotated[str | None, _option("workers")] = None,
) -> None:
    """Serve every model version under the model repository over HTTP and gRPC (see /docs)."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

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
    except (ValidationError, SettingsError) as exc:
        typer.echo(f"error: invalid settings: {_settings_error(exc, given)}", err=True)
        raise typer.Exit(2) from None
    try:
        _check(settings, given)
    except ServeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
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
