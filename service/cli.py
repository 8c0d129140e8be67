"""The `rcegate` command. Service commands live here; the training package adds its own
subcommands when it is installed (it imports torch only inside them)."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(help="rcegate: image classification that says whether to trust each answer.")

try:
    from training.cli import register as _register_training
except ModuleNotFoundError:  # a service-only install (the container image)
    pass
else:
    _register_training(app)

from service.triton import register as _register_triton  # noqa: E402

_register_triton(app)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app()


if __name__ == "__main__":
    main()
