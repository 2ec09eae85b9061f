"""Where a served batch-1 request's time goes: the model, the server's own work, the wire.

    .venv/bin/python bench/request_path.py [--repository runs/bench/serving/repository]
                                           [--model search-int8] [--requests 800]

From the repository ``bench/serving.py`` leaves, one run measures:

- ``in_process``: the model's ONNX Runtime session alone in this process (no PyTorch
  loaded), batch 1 at length 32, in rounds that alternate with the served rounds;
- ``bare_round_trip``: a gRPC ``ModelReady`` call to ``recjob-serve serve`` from the same
  client library the load generator uses (tritonclient's asyncio gRPC): the transport and
  both sides' gRPC stacks with no payload and no model;
- ``served``: ``recjob-serve bench`` at batch 1, one client, length-32 ids (the served
  p50 of ``serving.py``), and over the same requests the server's own histograms
  (``/metrics`` before and after): ``predict`` (KServe's timer around the model's
  ``predict``: the checks, the dynamic-batching queue, the hand-off to the instance thread
  and back, and the model call), the queue alone, pre- and post-processing.

``predict_beyond_model_ms`` is the server's mean predict less the model's mean time in
process; ``unexplained_ms`` the client's mean latency less the server's predict, pre and
post and the bare round trip: the payload's encoding and decoding on both sides and the
gRPC threads' hand-offs. Writes bench/results/request_path.json and prints the breakdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from common import load_test, served
from machine import machine
from prometheus_client.parser import text_string_to_metric_families

from serving import fixed_batches, timed_calls

HERE = Path(__file__).resolve().parent
#: The server's per-request histograms (name -> what the breakdown calls it).
HISTOGRAMS = {
    "recjob_batch_queue_seconds": "queue",
    "request_predict_seconds": "predict",
    "request_preprocess_seconds": "preprocess",
    "request_postprocess_seconds": "postprocess",
}


def histogram_sums(metrics_text: str, model: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each of ``HISTOGRAMS`` for ``model`` in a Prometheus exposition."""
    sums: dict[str, list[float]] = {name: [0.0, 0.0] for name in HISTOGRAMS.values()}
    for family in text_string_to_metric_families(metrics_text):
        if family.name not in HISTOGRAMS:
            continue
        for sample in family.samples:
            labels = sample.labels
            if model not in (labels.get("model"), labels.get("model_name")):
                continue
            if sample.name.endswith("_sum"):
                sums[HISTOGRAMS[family.name]][0] += sample.value
            elif sample.name.endswith("_count"):
                sums[HISTOGRAMS[family.name]][1] += sample.value
    return {name: (total, count) for name, (total, count) in sums.items()}


def mean_ms_between(before: dict, after: dict) -> dict[str, float]:
    """Mean ms per request of each histogram over the requests between two snapshots."""
    out = {}
    for name, (total, count) in after.items():
        calls = count - before[name][1]
        out[name] = (total - before[name][0]) / calls * 1000 if calls else 0.0
    return out


def in_process_session(model_path: Path):
    """The model's session and a batch-1, length-32 feed, warmed up."""
    from recjob_serving.export import session

    sess = session(model_path)
    feed = fixed_batches(1, 1)[0]
    for _ in range(20):
        sess.run(None, feed)
    return sess, feed


def bare_round_trip_ms(grpc: int, model: str, calls: int) -> dict[str, float]:
    """p50 / mean ms of gRPC ModelReady calls (tritonclient asyncio, as the load generator)."""
    import tritonclient.grpc.aio as client_module

    async def measure() -> list[float]:
        client = client_module.InferenceServerClient(f"127.0.0.1:{grpc}")
        try:
            for _ in range(50):
                await client.is_model_ready(model)
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                await client.is_model_ready(model)
                times.append(time.perf_counter() - started)
            return times
        finally:
            await client.close()

    ms = np.asarray(asyncio.run(measure())) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "mean_ms": float(ms.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--repository", type=Path, default=HERE.parent / "runs/bench/serving/repository"
    )
    parser.add_argument("--model", default="search-int8")
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "request_path.json")
    args = parser.parse_args()
    repository = args.repository.resolve()
    started_on = machine()
    sess, feed = in_process_session(repository / args.model / "1" / "model.onnx")

    def run(batch: dict) -> None:
        sess.run(None, batch)

    local_times, client_p50s, client_means = [], [], []
    with tempfile.TemporaryDirectory() as tmp, served(repository, Path(tmp)) as (_, http, grpc):
        work = Path(tmp)

        def metrics() -> dict:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics") as response:
                return histogram_sums(response.read().decode(), args.model)

        load_test(grpc, args.model, 1, 1, 100, work)  # warm-up
        bare = bare_round_trip_ms(grpc, args.model, args.requests)
        before = metrics()
        # rounds alternate the model in process and the served model, so a machine that
        # speeds up or slows down during the run shifts both alike
        for _ in range(args.rounds):
            local_times += timed_calls(run, [feed], args.requests // args.rounds)["times"]
            report = load_test(grpc, args.model, 1, 1, args.requests // args.rounds, work)
            client_p50s.append(report["p50_ms"])
            client_means.append(report["mean_ms"])
        inside = mean_ms_between(before, metrics())
    ms = np.asarray(local_times) * 1000
    local = {"p50_ms": float(np.percentile(ms, 50)), "mean_ms": float(ms.mean())}
    served_p50, mean_ms = float(np.median(client_p50s)), float(np.mean(client_means))
    server_ms = inside["predict"] + inside["preprocess"] + inside["postprocess"]
    results = {
        "machine": started_on,
        "model": args.model,
        "in_process": local,
        "bare_round_trip": bare,
        "served": {
            "p50_ms": served_p50,
            "p50_ms_per_round": client_p50s,
            "mean_ms": mean_ms,
            "server_ms": inside,
        },
        "predict_beyond_model_ms": inside["predict"] - local["mean_ms"],
        "unexplained_ms": mean_ms - server_ms - bare["mean_ms"],
        "served_p50_vs_in_process_p50": served_p50 / local["p50_ms"],
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'part':40} {'mean ms':>8}")
    print(f"{'in process (model alone), p50 ' + format(local['p50_ms'], '.2f'):40} "
          f"{local['mean_ms']:8.2f}")  # fmt: skip
    print(f"{'served, client side, p50 ' + format(served_p50, '.2f'):40} {mean_ms:8.2f}")
    for name, value in inside.items():
        print(
            f"{'  server ' + name + (' (in predict)' if name == 'queue' else ''):40} {value:8.2f}"
        )
    beyond = results["predict_beyond_model_ms"]
    print(f"{'  server predict beyond the model':40} {beyond:8.2f}")
    print(f"{'  bare gRPC round trip':40} {bare['mean_ms']:8.2f}")
    print(f"{'  the rest (payload, thread hops)':40} {results['unexplained_ms']:8.2f}")
    print(f"served p50 / in-process p50: {results['served_p50_vs_in_process_p50']:.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
