"""The `recjob-serve` command: convert, serve and bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__


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
@click.option(
    "--termination-log",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write a short JSON summary of the quality gate here (a Kubernetes "
    "container's terminationMessagePath, read back by the operator).",
)
def convert(config_path: str, termination_log: str | None) -> None:
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
        if termination_log:
            write_termination_log(termination_log, {"passed": None, "error": str(error)})
        sys.exit(3)
    if termination_log:
        write_termination_log(termination_log, report)
    line = (
        f"{report['metric']}: source {report['source_value']:.4f}, converted "
        f"{report['converted_value']:.4f} ({report['relative_drop']:+.2%} relative drop, "
        f"budget {report['budget']:.2%}); rank correlation {report['rank_correlation']:.3f}"
    )
    if report.get("teacher_value") is not None:
        line += (
            f"; teacher {report['teacher_value']:.4f} "
            f"({report['relative_drop_vs_teacher']:+.2%} vs teacher)"
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


#: Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_LIMIT = 4096
_SUMMARY_KEYS = (
    "passed", "metric", "source_value", "converted_value", "relative_drop", "budget",
    "teacher_value", "relative_drop_vs_teacher", "rank_correlation", "top_k_overlap",
    "published_version", "target", "error",
)  # fmt: skip


def write_termination_log(path: str, report: dict) -> None:
    """The gate's verdict in at most 4096 bytes (reasons shortened to fit)."""
    summary = {k: report[k] for k in _SUMMARY_KEYS if k in report}
    reasons = [str(r) for r in report.get("reasons") or []]
    while True:
        text = json.dumps({**summary, "reasons": reasons}, default=float)
        if len(text.encode()) <= TERMINATION_LIMIT or not reasons:
            break
        longest = max(range(len(reasons)), key=lambda i: len(reasons[i]))
        reasons[longest] = reasons[longest][: len(reasons[longest]) // 2] + "..."
    Path(path).write_text(text[:TERMINATION_LIMIT])


@cli.command()
@click.argument("repository", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--http-port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--grpc-port", default=8081, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--model-version",
    type=click.IntRange(min=1),
    default=None,
    help="Serve this version of every model (default: each model's newest).",
)
@click.option("--grace-period", default=10, show_default=True, help="Seconds to drain on stop.")
@click.option(
    "--max-body-bytes",
    default=16 << 20,
    show_default=True,
    type=click.IntRange(min=1024),
    help="Largest request body (HTTP: 413 before parsing; gRPC: largest message).",
)
@click.option(
    "--header-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds a client has to send complete request headers (else 408, closed).",
)
@click.option(
    "--read-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds a client has to send a request's body once its headers are in.",
)
@click.option(
    "--model-control-mode",
    type=click.Choice(["none", "explicit"]),
    default="none",
    show_default=True,
    help="none: /v2/repository/models/<m>/load|unload answer 403; explicit: allowed "
    "(unauthenticated: trusted networks only), readiness false while a model is unloaded.",
)
@click.option(
    "--max-k",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest k a top-k request (a sequential recommender's <model>-topk) may ask for.",
)
@click.option(
    "--max-history",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most item ids in one top-k request's history row (the model keeps its own "
    "window of the most recent ones).",
)
@click.option(
    "--log-requests/--no-log-requests",
    default=False,
    show_default=True,
    help="Log every request (KServe's gRPC method line, per-request latency and the HTTP "
    "access log). Off by default, as in Triton: at thousands of requests a second the "
    "lines cost CPU the models need; the /metrics histograms have the latencies.",
)
@click.option(
    "--revision",
    envvar="RECJOB_REVISION",
    default="",
    show_envvar=True,
    callback=lambda _ctx, _param, value: _revision(value),
    help="Serving revision this server runs as: the 'revision' label of its metrics, the "
    "x-recjob-revision response header, and the only revision POST /v2/feedback counts "
    "(default: none; label empty, no header, feedback refused).",
)
def serve(
    repository: str,
    host: str,
    http_port: int,
    grpc_port: int,
    model_version: int | None,
    grace_period: int,
    max_body_bytes: int,
    header_timeout: float,
    read_timeout: float,
    model_control_mode: str,
    max_k: int,
    max_history: int,
    log_requests: bool,
    revision: str,
) -> None:
    """Serve a Triton model repository over the Open Inference Protocol v2 (HTTP + gRPC)."""
    sys.argv = sys.argv[:1]  # kserve parses the process's arguments when imported
    from .limits import ServerLimits
    from .server import RepositoryError
    from .server import serve as run_server

    try:
        run_server(
            Path(repository),
            host=host,
            http_port=http_port,
            grpc_port=grpc_port,
            version=model_version,
            grace_period=grace_period,
            limits=ServerLimits(
                max_body_bytes,
                header_timeout,
                read_timeout,
                model_control_mode,
                max_k=max_k,
                max_history=max_history,
            ),
            revision=revision,
            log_requests=log_requests,
        )
    except RepositoryError as error:
        click.echo(f"recjob-serve serve: {error}", err=True)
        sys.exit(2)


def _revision(value: str | None) -> str:
    """A checked ``--revision`` ("" when not given)."""
    from .feedback import check_revision

    try:
        return check_revision(value or "")
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@cli.command()
@click.argument("url")
@click.option("--model", required=True, help="Model name (e.g. product-search-text).")
@click.option(
    "--protocol",
    type=click.Choice(["http", "grpc"]),
    default="grpc",
    show_default=True,
    help="gRPC (protobuf tensors) or HTTP with the binary tensor extension.",
)
@click.option("--concurrency", type=click.IntRange(1, 1024), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 4096), default=1, show_default=True)
@click.option("--requests", type=click.IntRange(min=1), default=None, help="Stop after N.")
@click.option(
    "--duration",
    type=click.FloatRange(0.1, 3600),
    default=10.0,
    show_default=True,
    help="Seconds to run (when --requests is not given).",
)
@click.option("--sequence-length", type=click.IntRange(1, 512), default=32, show_default=True)
@click.option(
    "--texts",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="JSON lines whose keys are the model's BYTES inputs (default: built-in pairs).",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None)
def bench(
    url: str,
    model: str,
    protocol: str,
    concurrency: int,
    batch_size: int,
    requests: int | None,
    duration: float,
    sequence_length: int,
    texts: str | None,
    output: str | None,
) -> None:
    """Load-test an Open Inference Protocol endpoint (host:port) with tritonclient and
    print throughput and p50/p90/p99 latency as JSON."""
    from .loadgen import LoadSpec, load_texts, run_load

    spec = LoadSpec(
        url=url,
        model=model,
        protocol=protocol,
        concurrency=concurrency,
        batch_size=batch_size,
        requests=requests,
        duration_s=duration,
        sequence_length=sequence_length,
    )
    if texts:
        spec.texts = load_texts(Path(texts))
    try:
        report = run_load(spec)
    except Exception as error:  # any failure is reported
        click.echo(f"recjob-serve bench: {type(error).__name__}: {error}", err=True)
        sys.exit(2)
    text = json.dumps(report, indent=2)
    if output:
        Path(output).write_text(text + "\n")
    click.echo(text)
    if report["errors"]:
        sys.exit(1)


def main() -> None:
    """Console-script entry point."""
    cli()
