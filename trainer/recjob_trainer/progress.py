"""Progress a person can follow (one readable line per event on stdout, a rich progress
bar on a terminal) and a program can read (``<run>/progress.jsonl``: every event as a JSON
line; local mode and the benchmarks read it). Only rank 0 reports.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from recjob_operator.api.text import one_line


class Progress:
    """Reports training events; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, total_steps: int, enabled: bool):
        self.enabled = enabled
        self.total = total_steps
        self.path = run_dir / "progress.jsonl"
        self._bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]training"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} steps"),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self._task = self._bar.add_task("train", total=total_steps, info="")
            self._bar.start()

    def stage(self, name: str, total_steps: int) -> None:
        """A new training stage (compression: distill, recover) starts from step 0."""
        self.total = total_steps
        if self._bar is not None:
            self._bar.reset(self._task, total=total_steps, completed=0)
            self._bar.columns[0].text_format = f"[bold]{name}"

    def record(self, kind: str, **fields: Any) -> str:
        """Append an event to progress.jsonl only (e.g. the digest of each step's batch,
        which shows that a resumed run sees the same data order)."""
        line = json.dumps({"event": kind, "time": round(time.time(), 3), **fields}, default=float)
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        return line

    def event(self, kind: str, **fields: Any) -> None:
        """Record and show one event (``progress``, ``eval``, ``checkpoint``, ``resumed``,
        ``done``...)."""
        if not self.enabled:
            return
        self.record(kind, **fields)
        if self._bar is not None:
            if kind == "progress":
                info = f"loss {fields.get('loss', float('nan')):.4f}"
                self._bar.update(self._task, completed=fields.get("step", 0), info=info)
            else:  # plain text: no markup, no highlighting
                self._bar.console.log(describe(kind, fields), markup=False, highlight=False)
        else:
            print(describe(kind, fields), flush=True)

    def close(self) -> None:
        """Stop the live view."""
        if self._bar is not None:
            self._bar.stop()


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _federated(kind: str, f: dict[str, Any]) -> str:
    if kind == "start":
        return f"{f.get('total_steps')} rounds over {f.get('silos')} connected silo(s)"
    if kind == "resumed":
        return f"resumed after round {f.get('step')} (its checkpoint)"
    if kind == "progress":
        return (
            f"round {f.get('step')}/{f.get('total_steps')}: mean loss "
            f"{_number(f.get('loss'))} from {f.get('silos')} silo(s)"
        )
    rest = ", ".join(f"{k} {_number(v)}" for k, v in f.items() if k not in ("stage", "time"))
    return f"{kind}: {rest}"


def describe(kind: str, fields: dict[str, Any]) -> str:
    """One event as one readable, printable line (what stdout and the logs show)."""
    f = fields
    stage = f"[{f['stage']}] " if f.get("stage") else ""
    if f.get("stage") == "federated":  # steps are rounds (federated/server_app.py)
        return stage + _federated(kind, f)
    if kind == "progress":
        text = (
            f"step {f.get('step')}/{f.get('total_steps')} (epoch {f.get('epoch')}): "
            f"loss {_number(f.get('loss'))}, lr {_number(f.get('lr'))}, "
            f"{_number(f.get('samples_per_second'))} samples/s"
        )
    elif kind == "eval":
        text = f"validation at step {f.get('step')}: {f.get('metric')} = {_number(f.get('value'))}"
    elif kind == "checkpoint":
        text = f"checkpoint saved at step {f.get('step')}"
    elif kind == "start":
        text = (
            f"training {f.get('total_steps')} steps on {f.get('world_size')} process(es), "
            f"ZeRO-{f.get('zero_stage')} {f.get('precision')}, "
            f"{f.get('steps_per_epoch')} steps/epoch, {_number(f.get('train_rows'))} rows"
        )
    elif kind == "resumed":
        weights = ", weights only" if f.get("weights_only") else ""
        text = (
            f"resumed at step {f.get('step')} ({f.get('world_size')} process(es), "
            f"checkpoint of {f.get('saved_world_size')}{weights})"
        )
    elif kind == "kept":
        text = f"keeping the model of step {f.get('step')}: {f.get('reason')}"
    elif kind == "done":
        text = (
            f"done after {f.get('step')} steps: test {f.get('main_metric')} = "
            f"{_number(f.get('value'))}"
        )
    elif "done" in f and "total" in f:  # work in parts (evaluation, catalog encoding)
        total, done = f["total"], f["done"]
        share = f" ({100 * done / total:.0f}%)" if total else ""
        what = f" {f['phase']}" if f.get("phase") else ""
        unit = f" {f['unit']}" if f.get("unit") else ""
        text = f"{kind}{what}: {done}/{total}{unit}{share}"
        if f.get("elapsed_seconds") is not None:
            text += f", {_duration(f['elapsed_seconds'])} elapsed"
        if f.get("eta_seconds") is not None and done < total:
            text += f", about {_duration(f['eta_seconds'])} left"
    else:
        details = ", ".join(f"{k} {_number(v)}" for k, v in f.items() if k != "stage")
        text = f"{kind}: {details}" if details else kind
    return one_line(stage + text)


def read_events(run_dir: Path) -> list[dict]:
    """Every event recorded for a run (in order)."""
    path = run_dir / "progress.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(events: list[dict], target: Path) -> None:
    """Training loss and validation metric against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    stages = list(dict.fromkeys(e.get("stage", "train") for e in events if "step" in e))
    for stage in stages:  # compression: one line per stage (train, distill, recover)
        mine = [e for e in events if e.get("stage", "train") == stage]
        loss = [(e["step"], e["loss"]) for e in mine if e["event"] == "progress"]
        evals = [(e["step"], e["value"]) for e in mine if e["event"] == "eval"]
        if loss:
            axes[0].plot(*zip(*loss, strict=True), label=stage)
        if evals:
            axes[1].plot(*zip(*evals, strict=True), marker="o", label=stage)
    axes[0].set(title="training loss", xlabel="step")
    metric = next((e["metric"] for e in events if e["event"] == "eval"), "metric")
    axes[1].set(title=f"validation {metric}", xlabel="step")
    if len(stages) > 1:
        axes[0].legend()
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)
