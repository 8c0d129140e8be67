"""The `rcegate` command. Service commands live here; the training package adds its own
subcommands when it is installed (it imports torch only inside them)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from service.signing import register as _register_signing
from service.triton import register as _register_triton

app = typer.Typer(help="rcegate: image classification that says whether to trust each answer.")

try:
    from training.cli import register as _register_training
except ModuleNotFoundError:  # a service-only install (the container image)
    pass
else:
    _register_training(app)
_register_triton(app)
_register_signing(app)

_FROM_ENV = "Default: RCEGATE_{} or its built-in default."


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help=_FROM_ENV.format("HOST"))] = None,
    port: Annotated[int | None, typer.Option(help=_FROM_ENV.format("PORT"))] = None,
    model_dir: Annotated[Path | None, typer.Option(help=_FROM_ENV.format("MODEL_DIR"))] = None,
    default_model: Annotated[
        str | None, typer.Option(help=_FROM_ENV.format("DEFAULT_MODEL"))
    ] = None,
    providers: Annotated[
        str | None, typer.Option(help="auto | cpu | cuda. " + _FROM_ENV.format("PROVIDERS"))
    ] = None,
    mode: Annotated[
        str | None, typer.Option(help="annotate | enforce. " + _FROM_ENV.format("MODE"))
    ] = None,
    log_level: Annotated[str | None, typer.Option(help=_FROM_ENV.format("LOG_LEVEL"))] = None,
    grpc_port: Annotated[
        int | None, typer.Option(help="OIP gRPC port, 0 = off. " + _FROM_ENV.format("GRPC_PORT"))
    ] = None,
) -> None:
    """Serve every model version under the model repository over HTTP (see /docs)."""
    from pydantic import ValidationError

    from service.app import create_app
    from service.server import serve as serve_app
    from service.settings import Settings

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
        typer.echo(f"invalid settings:\n{exc}", err=True)
        raise typer.Exit(2) from None
    logging.getLogger().setLevel(settings.log_level.upper())
    serve_app(create_app(settings), settings)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app()


if __name__ == "__main__":
    main()
