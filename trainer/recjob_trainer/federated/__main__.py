"""``python -m recjob_trainer.federated --config trainer.yaml --work DIR``: a federated run
on this machine (see :mod:`.local`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import load_config
from .local import run_federation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recjob_trainer.federated")
    parser.add_argument("--config", required=True, help="trainer config with training.federated")
    parser.add_argument("--work", required=True, help="silos, TLS files, state, logs")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    metrics = run_federation(load_config(args.config), Path(args.work), args.timeout)
    print(json.dumps(metrics["federated"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
