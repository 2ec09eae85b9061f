"""Progress a person (rich, on a terminal) or a program (JSON lines) can follow.

Every event is also appended to ``<run>/progress.jsonl``; local mode and the operator read
the JSON lines. Only rank 0 reports.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


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
        line = self.record(kind, **fields)
        if self._bar is not None:
            if kind == "progress":
                info = f"loss {fields.get('loss', float('nan')):.4f}"
                self._bar.update(self._task, completed=fields.get("step", 0), info=info)
            else:
                self._bar.console.log(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        """Stop the live view."""
        if self._bar is not None:
            self._bar.stop()


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
