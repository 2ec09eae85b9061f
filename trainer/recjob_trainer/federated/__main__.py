"""``python -m recjob_trainer.federated --config trainer.yaml --work DIR``: a federated run
on this machine (see :mod:`.local`), as ``recjob run`` launches it.

Before the federation starts, the model owner's held-out data (the config's own ``data``
URIs: with ``silos`` the owner's reference logs, never sent to a silo; with ``partition``
the data that is split) are prepared into ``<outputUri>/data``, the layout ``recjob-train``
leaves: the conversion's quality gate and local mode's replay traffic read them there.
Neither the ServerApp nor any silo opens that folder."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from ..config import load_config
from ..data.prepare import ensure_prepared
from .local import run_federation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recjob_trainer.federated")
    parser.add_argument("--config", required=True, help="trainer config with training.federated")
    parser.add_argument("--work", required=True, help="silos, TLS files, state, logs")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if config.training.federated is None:
        print("recjob-train federated: the config has no training.federated", file=sys.stderr)
        return 2
    try:
        reference = Path(config.output_uri) / "data"
        ensure_prepared(config.data, config.model, config.base_dir, reference)
    except (ValueError, OSError) as error:  # bad data fail the same way again: say so once
        print(f"recjob-train federated: reference data: {error}", file=sys.stderr)
        traceback.print_exc()
        return 1
    metrics = run_federation(config, Path(args.work), args.timeout)
    print(json.dumps(metrics["federated"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
