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
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, exists=True),
    required=True,
    help="Conversion config (written by the operator / local mode).",
)
def convert(config_path: str) -> None:
    """Export, quantize and gate a trained model into a Triton model repository.

    Exits 0 when published, 2 when the quality gate refused the model (nothing published;
    quality-gate.json says why), 3 when the export target cannot be built here (TensorRT
    engine builds need a GPU node; the QDQ model is still gated and the command reported).
    """
    from .convert import TargetUnavailable, load_convert_config
    from .convert import convert as run_convert

    config = load_convert_config(config_path)
    try:
        report = run_convert(config)
    except TargetUnavailable as error:
        click.echo(f"recjob-serve convert: {error}", err=True)
        sys.exit(3)
    line = (
        f"{report['metric']}: source {report['source_value']:.4f}, converted "
        f"{report['converted_value']:.4f} ({report['relative_drop']:+.2%} relative drop, "
        f"budget {report['budget']:.2%}); rank correlation {report['rank_correlation']:.3f}"
    )
    if not report["passed"]:
        click.echo(f"quality gate FAILED, nothing published: {line}", err=True)
        for reason in report["reasons"]:
            click.echo(f"  - {reason}", err=True)
        sys.exit(2)
    click.echo(
        f"quality gate passed: {line}; published {config.model_name} version "
        f"{report['published_version']} in {config.repository}"
    )


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
