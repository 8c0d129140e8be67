"""The `rcegate` command: one Typer app assembled from the stages that are installed.

This package sits above the stages and imports none of them. Each stage offers its subcommands
through the `rcegate.commands` entry-point group (pyproject.toml), so the service never imports
training to build the command, and an install without a stage (the container image has no
training code and no torch) simply lists fewer commands.
"""
