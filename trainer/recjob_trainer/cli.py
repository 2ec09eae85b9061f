"""The `recjob-train` command (what each PyTorchJob pod or local process runs)."""

from __future__ import annotations

import sys

import click

from . import __version__


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="recjob-train")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    required=True,
    help="Trainer config file written by the operator or local mode.",
)
def cli(config_path: str) -> None:
    """Prepare data and fine-tune a ranking model as configured by CONFIG. Not available yet."""
    click.echo(
        "recjob-train: training is not available yet (see the trainer issue); nothing was run.",
        err=True,
    )
    sys.exit(3)


def main() -> None:
    """Console-script entry point."""
    cli()
