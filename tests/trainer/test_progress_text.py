"""The trainer's stdout (what ``kubectl logs`` and local mode's train logs show) is one
readable line per event; progress.jsonl keeps every event as JSON for programs."""

from __future__ import annotations

import json
from pathlib import Path

from recjob_trainer.progress import Progress, describe, read_events


def test_events_print_as_readable_lines_and_stay_json_in_the_file(tmp_path: Path, capsys) -> None:
    progress = Progress(tmp_path, 300, enabled=True)
    progress.event("start", total_steps=300, world_size=2, zero_stage=3, precision="bf16",
                   steps_per_epoch=150, train_rows=47123)  # fmt: skip
    progress.event("progress", step=20, total_steps=300, epoch=0, loss=0.41234, lr=3e-05,
                   samples_per_second=61.23)  # fmt: skip
    progress.event("eval", step=100, metric="sampled/ndcg@10", value=0.2513425, stage="distill")
    progress.event("evaluate", phase="test", done=1200, total=12827, unit="texts",
                   elapsed_seconds=130.2, eta_seconds=1260.0)  # fmt: skip
    progress.event("error-ish", note="a \x1b[31mred\x1b[0m\nsecond line")
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "training 300 steps on 2 process(es), ZeRO-3 bf16, 150 steps/epoch, 47,123 rows",
        "step 20/300 (epoch 0): loss 0.4123, lr 3.00e-05, 61.23 samples/s",
        "[distill] validation at step 100: sampled/ndcg@10 = 0.2513",
        "evaluate test: 1200/12827 texts (9%), 2m10s elapsed, about 21m00s left",
        "error-ish: note a red | second line",
    ]
    events = read_events(tmp_path)
    assert [e["event"] for e in events] == ["start", "progress", "eval", "evaluate", "error-ish"]
    assert events[2]["value"] == 0.2513425 and events[4]["note"].startswith("a \x1b[31m")
    raw = (tmp_path / "progress.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in raw)


def test_every_event_kind_reads_without_json() -> None:
    for kind, fields in {
        "resumed": {"step": 8, "world_size": 2, "saved_world_size": 4, "weights_only": True},
        "checkpoint": {"step": 8},
        "kept": {"step": 4, "reason": "best validation ndcg@10 = 0.5 at step 4"},
        "done": {"step": 8, "main_metric": "ndcg@10", "value": 0.7, "consolidation": 1e-7},
        "encode-catalog": {"done": 64, "total": 4385},
    }.items():
        line = describe(kind, fields)
        assert "{" not in line and '"' not in line, line
    assert describe("kept", {"step": 4, "reason": "r"}) == "keeping the model of step 4: r"
