"""The `recjob-train` command: one training process, started per rank by torchrun (in each
PyTorchJob pod and in local mode)."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import click

from . import __version__


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="recjob-train")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Trainer config file written by the operator or local mode.",
)
@click.option(
    "--recjob",
    "recjob_path",
    type=click.Path(dir_okay=False, exists=True),
    help="Or: a RecJob file (its data/model/training sections are used).",
)
@click.option("--output", default=None, help="With --recjob: the run directory.")
@click.option(
    "--max-eval-groups",
    type=int,
    default=None,
    help="Evaluate at most this many queries/users per split.",
)
@click.option("--prepare-only", is_flag=True, help="Prepare the data and print its report.")
@click.option(
    "--launch",
    is_flag=True,
    help="In a PyTorchJob pod: start this pod's processes with torchrun from the Training "
    "Operator's PET_* variables, each running the trainer with the other options.",
)
def cli(
    config_path: str | None,
    recjob_path: str | None,
    output: str | None,
    max_eval_groups: int | None,
    prepare_only: bool,
    launch: bool,
) -> None:
    """Prepare data and fine-tune a ranking model with DeepSpeed.

    Run one process per rank (torchrun, as each PyTorchJob pod does, or the deepspeed
    launcher); the rendezvous comes from MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK and
    LOCAL_RANK.
    """
    if launch:
        from .launch import LaunchError, exec_torchrun

        if prepare_only:
            raise click.UsageError("--launch trains; --prepare-only runs without it")
        forwarded = [
            *(["--config", config_path] if config_path else []),
            *(["--recjob", recjob_path] if recjob_path else []),
            *(["--output", output] if output else []),
            *(["--max-eval-groups", str(max_eval_groups)] if max_eval_groups else []),
        ]
        try:
            exec_torchrun(forwarded)
        except LaunchError as error:
            raise click.ClickException(str(error)) from error
        return
    from .config import config_from_recjob, load_config

    if recjob_path:
        from recjob_operator.api.documents import load_documents
        from recjob_operator.api.validation import RecJobInvalid, parse_recjob

        try:
            job = parse_recjob(load_documents(recjob_path)[0].content)
        except RecJobInvalid as error:
            raise click.ClickException(f"{recjob_path}: {error}") from error
        run_dir = Path(output or f"runs/{job.metadata.name}").resolve()  # relative to cwd
        config = config_from_recjob(job, str(run_dir), str(Path(recjob_path).resolve().parent))
    elif config_path:
        config = load_config(config_path)
    else:
        raise click.UsageError("give --config FILE or --recjob FILE")
    if max_eval_groups:
        config.evaluation.max_groups = max_eval_groups
    if config.training.federated is not None and not prepare_only:
        raise click.ClickException(
            "training.federated is set: a federated run trains in its silos, each on its own "
            "data, launched by `python -m recjob_trainer.federated --config FILE --work DIR`; "
            "recjob-train trains on one dataset"
        )
    if prepare_only:
        from .data.prepare import prepare

        prepared = prepare(config.data, config.model, config.base_dir)
        click.echo(json.dumps(prepared.report(), indent=2))
        return
    from .distributed import exit_cleanly
    from .train import train

    try:
        train(config)
    except Exception as error:  # one clear line, then the traceback for the logs
        click.echo(f"recjob-train: {type(error).__name__}: {error}", err=True)
        traceback.print_exc()
        write_error_message(f"{type(error).__name__}: {error}")
        exit_cleanly(1)
    exit_cleanly(0)


#: Most characters of an error left as the termination message (Kubernetes keeps 4096 bytes).
MAX_ERROR_CHARS = 2000


def write_error_message(error: str) -> None:
    """With $RECJOB_TERMINATION_LOG set (a PyTorchJob's container), leave ``{"error": ...}``
    there for the operator, unless a process of this container already left one (the
    first rank to fail says why; the others often fail because it did)."""
    from .finish import TERMINATION_LOG_ENV

    path = os.environ.get(TERMINATION_LOG_ENV)
    if not path:
        return
    if len(error) > MAX_ERROR_CHARS:
        error = error[: MAX_ERROR_CHARS - 3] + "..."
    target = Path(path)
    try:
        if target.exists() and target.read_text(encoding="utf-8").strip():
            return  # another rank's error stands
        target.write_text(json.dumps({"error": error}), encoding="utf-8")
    except OSError:  # not writable here: the exit code and the logs still tell
        return


def main() -> None:
    """Console-script entry point."""
    cli()
