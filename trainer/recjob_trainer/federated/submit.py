"""``python -m recjob_trainer.federated.submit``: run a federated config on a SuperLink that
is already up (Kubernetes: the operator's SuperLink Deployment and its Service, with one
SuperNode Deployment per silo connected to it) and wait for its end.

It runs as the RecJob's training Job (one pod, no silo data mounted):

1. prepares the model owner's held-out reference data (the config's ``data``) into
   ``<outputUri>/data``, as the local launcher does (the gate and replay traffic read them);
2. writes the ServerApp's settings (:class:`.plan.ServerSettings`: no data URI) to
   ``<outputUri>/federated/server-settings.json`` on the artifacts volume, which the
   SuperLink's pod mounts at the same path (the ServerApp runs there, as the SuperLink's
   subprocess);
3. waits for the SuperLink's API, then submits the Flower App with ``flwr run`` (TLS,
   verified against the CA of the operator's Secret) or, restarted while a run it submitted
   is still going, adopts that run instead of starting a second ServerApp on the same
   output;
4. waits for the run's end and leaves what ``recjob-train`` leaves: ``metrics.json`` (with
   the SuperLink's count of the traffic) and the summary in the termination message.

A failed or killed run is resumed by the Job's next pod: the ServerApp restarts from its
last completed round's checkpoint on the artifacts volume.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from ..cli import write_error_message
from ..config import load_config
from ..data.prepare import ensure_prepared
from ..finish import write_termination_message
from ..storage import resolve
from .bundle import write_bundle
from .local import CONNECTION, Federation, flwr_env, record_run, submit, wait
from .plan import server_settings

#: ``flwr ls`` states of a run that has not ended.
LIVE_STATES = ("pending", "starting", "running")


def wait_for_superlink(fed: Federation, timeout: float) -> list[dict]:
    """``flwr ls`` until the SuperLink answers (its pod may still be starting); returns the
    runs it knows."""
    deadline = time.time() + timeout
    while True:
        try:
            answer = fed.flwr("ls", CONNECTION, timeout=60)
        except (RuntimeError, OSError) as error:  # not reachable yet: DNS, refused, TLS
            answer = {"success": False, "error": str(error)}
        if answer.get("success"):
            return list(answer.get("runs") or [])
        if time.time() > deadline:
            raise TimeoutError(f"the SuperLink did not answer within {timeout:.0f}s: {answer}")
        time.sleep(3.0)


def live_run(runs: list[dict]) -> str | None:
    """The newest run that has not ended (submitted by an earlier pod of this Job)."""
    live = [r for r in runs if str(r.get("status", "")).split(":")[0] in LIVE_STATES]
    if not live:
        return None
    return str(max(live, key=lambda r: str(r.get("pending-at") or ""))["run-id"])


def run(
    config_path: str, superlink: str, ca_cert: Path, timeout: float, connect: float
) -> tuple[dict, dict]:
    """Prepare, submit (or adopt), wait; returns metrics.json and model-card.json (raises if
    the run failed)."""
    config = load_config(config_path)
    if config.training.federated is None:
        raise ValueError(f"{config_path}: the config has no training.federated")
    output = Path(resolve(config.output_uri, config.base_dir))
    ensure_prepared(config.data, config.model, config.base_dir, output / "data")
    settings_path = output / "federated" / "server-settings.json"
    settings_path.parent.mkdir(parents=True, exist_ok=True)
    server_settings(config, output).write(settings_path)
    work = Path(tempfile.mkdtemp(prefix="recjob-federation-"))
    (work / "logs").mkdir()
    write_bundle(work / "app")
    fed = Federation(work, flwr_env(work / "flwr-home", superlink, ca_cert), port=0)
    runs = wait_for_superlink(fed, connect)
    run_id = live_run(runs)
    if run_id is not None:
        print(f"adopting run {run_id}, still going on the SuperLink", flush=True)
        since = time.time() - 5.0
    else:
        since = time.time()
        run_id = submit(fed, settings_path)
        print(f"submitted run {run_id} to {superlink}", flush=True)
    state = wait(fed, run_id, output, since, timeout)
    if state.get("status") != "finished:completed" or state.get("server-error"):
        raise RuntimeError(
            f"federated run {run_id} ended {state.get('status')}: "
            f"{state.get('server-error') or state.get('status-details')}"
        )
    metrics = record_run(output, run_id, state)
    return metrics, json.loads((output / "model-card.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recjob_trainer.federated.submit")
    parser.add_argument("--config", required=True, help="trainer config with training.federated")
    parser.add_argument("--superlink", required=True, help="the SuperLink's host:port")
    parser.add_argument(
        "--root-certificates", required=True, type=Path,
        help="the CA certificate the SuperLink's TLS certificate is checked against",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=7 * 24 * 3600.0)
    parser.add_argument("--connect-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    try:
        metrics, card = run(
            args.config, args.superlink, args.root_certificates, args.timeout, args.connect_timeout
        )
    except Exception as error:  # the operator reads why from the termination message
        print(f"recjob-train federated: {type(error).__name__}: {error}", file=sys.stderr)
        traceback.print_exc()
        write_error_message(f"{type(error).__name__}: {error}")
        return 1
    write_termination_message(metrics, card)
    print(json.dumps(metrics["federated"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
