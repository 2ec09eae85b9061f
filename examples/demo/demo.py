"""`make demo`: three RecJobs on one service, end to end on this machine.

    .venv/bin/python examples/demo/demo.py [--workdir runs/demo]

1. 1-baseline.yaml: the service's first model goes straight to 100% of traffic;
2. 2-better.yaml: a properly fine-tuned model is canaried against it and promoted;
3. 3-worse.yaml: a deliberately broken model (30x learning rate) collapses and is refused
   by the quality gate; nothing is deployed.

Each step is `recjob run` (training, conversion and quality gate, live servers behind a
weighted router, replayed traffic with click feedback, Prometheus-gated canary). At the
end the live business metric of every revision is printed, with the reports' paths.
Exits 1 if a step does not end as described.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
STEPS = [
    ("1-baseline.yaml", "demo-baseline", 0, "deployed as the first model"),
    ("2-better.yaml", "demo-better", 0, "canaried and promoted"),
    ("3-worse.yaml", "demo-worse", 1, "refused by the quality gate"),
]


def ctr_line(revision: str, values: dict) -> str:
    ci = values.get("ctr_ci95") or [float("nan")] * 2
    ctr = values.get("ctr")
    return (
        f"  {revision:24s} CTR@5 {ctr if ctr is not None else float('nan'):.3f} "
        f"[{ci[0]:.3f}, {ci[1]:.3f}]  NDCG@5 {values.get('mean_gain') or float('nan'):.3f}  "
        f"impressions {values.get('impressions', 0):.0f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--keep", action="store_true", help="do not start from scratch")
    args = parser.parse_args()
    if args.workdir.exists() and not args.keep:
        shutil.rmtree(args.workdir)
    started = time.time()
    failures = []
    reports = []
    for file, name, expected, meaning in STEPS:
        print(f"\n=== {file}: expected to be {meaning}", flush=True)
        code = subprocess.call(
            [
                str(BIN / "recjob"),
                "run",
                str(HERE / file),
                "--workdir",
                str(args.workdir),
                "--eval-groups",
                "200",
                "--replay-rate",
                "12",
            ]
        )
        if code != expected:
            failures.append(f"{file} exited {code}, expected {expected}")
        report = args.workdir / name / "g1" / "report"
        reports.append(report / "report.html")
        summary_path = report / "summary.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            for revision, values in sorted(summary.get("live_by_revision", {}).items()):
                print(ctr_line(revision, values))
            test = summary.get("canary_vs_stable_ctr") or {}
            if test.get("difference") is not None:
                print(
                    f"  canary - stable CTR@5: {test['difference']:+.3f} "
                    f"(z = {test['z']:.2f}, p = {test['p_value']:.3g})"
                )
    minutes = (time.time() - started) / 60
    print(f"\nDemo finished in {minutes:.1f} min. Reports:")
    for report in reports:
        print(f"  {report}")
    for failure in failures:
        print(f"DEMO FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
