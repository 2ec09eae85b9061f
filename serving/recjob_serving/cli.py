"""The `recjob-serve` command: convert, serve and bench."""

from __future__ import annotations

import sys

import click

from . import __version__

_NOT_YET = "not available yet (see the serving issue); nothing was run."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="recjob-serve")
def cli() -> None:
    """Convert trained models for serving, serve them, and load-test them."""


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True)
def convert(config_path: str) -> None:
    """Export, quantize and gate a trained model into a Triton model repository."""
    click.echo(f"recjob-serve convert: {_NOT_YET}", err=True)
    sys.exit(3)


@cli.command()
@click.argument("repository", type=click.Path(file_okay=False))
def serve(repository: str) -> None:
    """Serve a Triton model repository over the Open Inference Protocol v2."""
    click.echo(f"recjob-serve serve: {_NOT_YET}", err=True)
    sys.exit(3)


@cli.command()
@click.argument("url")
def bench(url: str) -> None:
    """Load-test an Open Inference Protocol endpoint with tritonclient."""
    click.echo(f"recjob-serve bench: {_NOT_YET}", err=True)
    sys.exit(3)


def main() -> None:
    """Console-script entry point."""
    cli()
