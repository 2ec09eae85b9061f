"""The `recjob` command: validate RecJob files, print the CRD, run a RecJob locally."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .api.documents import load_documents
from .api.v1alpha1 import RecJob
from .api.validation import validate_document


def summarize(job: RecJob) -> str:
    """One line that says what a valid RecJob will do."""
    s = job.spec
    ns = job.metadata.namespace or "default"
    t = s.training
    metric = s.export.quality_budget.metric
    metric = "ndcg@10" if metric == "auto" else metric
    steps = "→".join(str(x) for x in s.rollout.steps)
    compression = ""
    if s.compression is not None:
        parts = [name for name in ("distillation", "pruning") if getattr(s.compression, name)]
        compression = f" + {' & '.join(parts)}"
    training = (
        f"{t.nodes} node(s) x {t.processes_per_node} process(es) ZeRO-{t.deepspeed.zero_stage} "
        f"{t.precision}{compression}"
    )
    if (fed := t.federated) is not None:
        silos = (
            f"{len(fed.silos)} silos" if fed.silos
            else f"{fed.partition.count} silos by {fed.partition.by}"
        )  # fmt: skip
        dp = ", DP" if fed.differential_privacy else ""
        training = (
            f"federated over {silos}: {fed.rounds} rounds x {fed.local_steps} steps, "
            f"{fed.strategy.type}, {fed.exchange} exchanged{dp}"
        )
    return (
        f"valid RecJob {ns}/{job.metadata.name}: {s.data.task} on {s.model.base_model} "
        f"({s.model.fine_tuning.method}), {training} → "
        f"{s.export.target} (max {s.export.quality_budget.max_relative_drop:.1%} {metric} drop) "
        f"→ {job.service_name}: canary {steps}% every {s.rollout.interval}"
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="recjob")
def cli() -> None:
    """RecJob: fine-tune, quantize and canary e-commerce ranking models from one resource."""


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def validate(files: tuple[str, ...]) -> None:
    """Validate RecJob FILES (schema and semantic rules); print every problem.

    Exits 1 if any document has a problem, 0 if all are valid.
    """
    failed = False
    for path in files:
        for doc in load_documents(path):
            problems = list(doc.problems)
            job = None
            if not problems:
                job, problems = validate_document(doc.content)
            if problems:
                failed = True
                click.echo(f"{doc.label}: {len(problems)} problem(s)", err=True)
                for problem in problems:
                    click.echo(f"  {problem}", err=True)
            elif job is not None:
                click.echo(f"{doc.label}: {summarize(job)}")
    sys.exit(1 if failed else 0)


@cli.command()
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    help="Write to this file instead of standard output.",
)
def crd(output: str | None) -> None:
    """Print the RecJob CustomResourceDefinition generated from the API types."""
    from .crd import render_crd_yaml

    text = render_crd_yaml()
    if output:
        target = Path(output)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)  # atomic: a reader never sees half a CRD
    else:
        click.echo(text, nl=False)


def _load_one(file: str) -> RecJob:
    """The single valid RecJob in ``file`` (exit 1 listing every problem otherwise)."""
    documents = load_documents(file)
    if len(documents) != 1:
        click.echo(f"{file}: expected one RecJob document, found {len(documents)}", err=True)
        sys.exit(1)
    (doc,) = documents
    problems = list(doc.problems)
    job = None
    if not problems:
        job, problems = validate_document(doc.content)
    if problems or job is None:
        click.echo(f"{doc.label}: {len(problems)} problem(s)", err=True)
        for problem in problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(1)
    return job


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default="runs/local",
    show_default=True,
    help="Where artifacts, status and reports are kept (resumable).",
)
@click.option(
    "--prometheus",
    default=None,
    help="The default Prometheus for canary metrics (it must scrape the router and label "
    "series with the RecJob's namespace); default: a private one.",
)
@click.option(
    "--prometheus-source",
    "prometheus_sources",
    multiple=True,
    metavar="NAME=URL",
    help="A named Prometheus a RecJob may pick with spec.rollout.prometheus (repeatable).",
)
@click.option(
    "--eval-groups",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Held-out queries/users the trainer and the quality gate evaluate.",
)
@click.option("--replay-rate", type=click.FloatRange(0.1, 1000), default=8.0, show_default=True)
@click.option(
    "--no-baselines", is_flag=True, help="Do not evaluate BM25/popularity/zero-shot baselines."
)
@click.option("--no-report", is_flag=True, help="Skip the HTML report.")
def run(
    file: str,
    workdir: str,
    prometheus: str | None,
    prometheus_sources: tuple[str, ...],
    eval_groups: int,
    replay_rate: float,
    no_baselines: bool,
    no_report: bool,
) -> None:
    """Run the RecJob in FILE on this machine (local mode): training, conversion, two live
    servers and a metric-gated canary.

    Exits 0 when the model was promoted, 1 when the RecJob failed, 3 when the canary was
    rolled back, 130 when interrupted (run it again to continue).
    """
    from .local.options import LocalOptions
    from .local.run import EXIT_CODES, Interrupted
    from .local.run import run as run_local
    from .local.view import LiveView
    from .prometheus import named_urls

    job = _load_one(file)
    try:
        named = named_urls(prometheus_sources, "--prometheus-source")
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--prometheus-source") from None
    options = LocalOptions(
        eval_groups=eval_groups,
        replay_rate=replay_rate,
        prometheus_url=prometheus,
        prometheus_sources=named,
        baselines=not no_baselines,
    )
    try:
        options.sources()
    except ValueError as error:
        raise click.BadParameter(
            str(error), param_hint="--prometheus/--prometheus-source"
        ) from None
    try:
        with LiveView() as view:
            job = run_local(job, Path(file), Path(workdir), options, view=view)
    except Interrupted as signal_name:
        click.echo(f"recjob run: stopped by {signal_name}; run it again to continue", err=True)
        sys.exit(130)
    status = job.status
    assert status is not None
    if not no_report:
        from .local.report import write_report

        report = write_report(job, Path(workdir))
        click.echo(f"report: {report}")
    click.echo(f"{job.metadata.name}: {status.phase}: {status.message}")
    sys.exit(EXIT_CODES.get(status.phase, 1))


@cli.command()
@click.argument("name")
@click.option(
    "--workdir", type=click.Path(file_okay=False), default="runs/local", show_default=True
)
def status(name: str, workdir: str) -> None:
    """Print a local RecJob with its status (as `kubectl get recjob NAME -o yaml`)."""
    from .local.run import status_path

    path = status_path(Path(workdir), name)
    if not path.exists():
        known = sorted(p.parent.name for p in Path(workdir).glob("*/status.yaml"))
        click.echo(
            f"no RecJob {name!r} in {workdir}" + (f" (known: {', '.join(known)})" if known else ""),
            err=True,
        )
        sys.exit(1)
    click.echo(path.read_text(), nl=False)


def main() -> None:
    """Console-script entry point."""
    cli()
