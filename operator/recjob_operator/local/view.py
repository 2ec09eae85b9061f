"""The live progress view of ``recjob run`` (rich): phase, training, gate, canary."""

from __future__ import annotations

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..api.text import one_line
from ..api.v1alpha1.recjob import RecJob


def status_table(recjob: RecJob) -> Table:
    """What a person following the run wants to see, one row per part."""
    status = recjob.status
    table = Table(show_header=False, box=None, padding=(0, 1))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    if status is None:
        return table
    table.add_row("RecJob", f"{recjob.metadata.name} (generation {recjob.generation})")
    table.add_row("Phase", Text(status.phase, style=_phase_style(status.phase)))
    table.add_row("Message", one_line(status.message or ""))
    training = status.training
    if training and training.progress:
        p = training.progress
        total = f"/{p.total_steps}" if p.total_steps else ""
        loss = f", loss {p.loss:.4f}" if p.loss is not None else ""
        speed = f", {p.samples_per_second:.1f} samples/s" if p.samples_per_second else ""
        resumed = (
            f", resumed at step {training.resumed_from_step}" if training.resumed_from_step else ""
        )
        stage = f"{p.stage} " if p.stage and p.stage != "train" else ""
        table.add_row("Training", f"{stage}step {p.step}{total}{loss}{speed}{resumed}")
    if status.quality:
        table.add_row("Quality", f"{status.quality.metric} {status.quality.value:.4f}")
    gate = status.conversion.quality_gate if status.conversion else None
    if gate and gate.converted_value is not None and gate.source_value is not None:
        table.add_row(
            "Quality gate",
            f"{'passed' if gate.passed else 'FAILED'}: {gate.metric} {gate.converted_value:.4f}"
            f" vs source {gate.source_value:.4f} (budget {gate.budget:.1%})",
        )
    rollout = status.rollout
    if rollout and rollout.state:
        table.add_row(
            "Canary",
            f"{rollout.state}: {rollout.canary_weight}% to "
            f"{rollout.canary_revision or 'the new model'} (failed {rollout.failed_checks}, "
            f"query errors {rollout.query_errors})",
        )
        latest = {}
        for record in rollout.history:
            latest[record.metric] = record
        for record in latest.values():
            table.add_row(f"  {record.metric}", record.message or record.verdict)
    return table


def _phase_style(phase: str) -> str:
    return {"Succeeded": "bold green", "Failed": "bold red", "RolledBack": "bold yellow"}.get(
        phase, "bold"
    )


class LiveView:
    """Redraws the table and prints each event once."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.live = Live(console=self.console, refresh_per_second=4, transient=False)
        self._printed = 0

    def __enter__(self) -> LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.live.__exit__(*exc)
        self.console.print()

    def __call__(self, recjob: RecJob, backend, decision) -> None:
        for event in backend.events[self._printed :]:
            style = "yellow" if event.type == "Warning" else "dim"
            line = one_line(f"[{event.reason}] {event.message}")  # quotes logs, users' data
            self.live.console.print(Text(line, style=style), markup=False, highlight=False)
        self._printed = len(backend.events)
        self.live.update(Group(status_table(recjob)))
