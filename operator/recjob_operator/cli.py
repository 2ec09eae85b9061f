"""The `recjob` command: validate RecJob files, print the CRD, run a RecJob locally."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .api.v1alpha1 import RecJob
from .documents import load_documents
from .validation import validate_document


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
    return (
        f"valid RecJob {ns}/{job.metadata.name}: {s.data.task} on {s.model.base_model} "
        f"({s.model.fine_tuning.method}), {t.nodes} node(s) x {t.processes_per_node} "
        f"process(es) ZeRO-{t.deepspeed.zero_stage} {t.precision}{compression} → "
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


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--workdir", type=click.Path(file_okay=False), default=None)
def run(file: str, workdir: str | None) -> None:
    """Run a RecJob on this machine (local mode). Not available yet."""
    click.echo(
        "recjob run: local mode is not available yet (see the local-mode issue); nothing was run.",
        err=True,
    )
    sys.exit(3)


def main() -> None:
    """Console-script entry point."""
    cli()
