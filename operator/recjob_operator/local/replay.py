"""Local mode's live traffic: held-out queries / users replayed through the router, and
what the user really chose reported back as clicks.

    python -m recjob_operator.local.replay --router URL --model NAME --data DIR --task T

On a cluster the same driver plays the storefront against the Gateway: ``--router`` the
Gateway's address, ``--host`` the HTTPRoute's hostname, ``--feedback-path /v2/feedback``
(the model servers' own feedback endpoint). Feedback carries the ``x-recjob-revision``
header of the response it is about, so the HTTPRoute's pinning rule delivers it to a pod
of that revision.

Recommendation: each impression is a held-out user (history as text) and 20 candidates
(the item the user really chose next + 19 random catalog items); the served embeddings
rank them; a click is the chosen item in the top ``k``, the gain its NDCG@k. With
``--topk K`` (a sequential recommender: ``--model <service>-topk``) each impression is a
held-out user's history (item ids, oldest first, the last :data:`TOPK_HISTORY`) and the
server's top ``K`` of the whole catalog (history items excluded, the server's default); a
click is the item the user really chose next among them, the gain its NDCG@K
(1 / log2(rank + 2)): so live click-through estimates the offline full-catalog HR@K and
the live gain its NDCG@K. Search: each
impression is a held-out query and its judged products; a click is the best-judged
product in the top ``k``, the gain the ranking's NDCG@k. Requests go to the raw-text
ensemble through the router, which tells which revision answered; feedback goes to the
router's ``/feedback`` for that revision.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from pathlib import Path

import aiohttp
import numpy as np
import polars as pl

from ..api.model_input import history_text

CANDIDATES = 20
#: Most recent history items a top-k request sends (the model keeps its own window).
TOPK_HISTORY = 200


def ndcg_at_k(gains_in_served_order: list[float], k: int) -> float:
    """NDCG@k of a served ranking (gains in the order served)."""

    def dcg(values: list[float]) -> float:
        return sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(values[:k]))

    ideal = dcg(sorted(gains_in_served_order, reverse=True))
    return dcg(gains_in_served_order) / ideal if ideal > 0 else 0.0


def impressions(data: Path, task: str, seed: int, topk: bool = False) -> list[dict]:
    """The impressions to replay: texts to send and the gain of each candidate, or (with
    ``topk``) a history of item ids and the item chosen next."""
    rng = random.Random(seed)
    test = pl.read_parquet(data / "test.parquet")
    out = []
    if task == "recommendation" and topk:
        catalog = set(pl.read_parquet(data / "catalog.parquet")["item_id"].to_list())
        for history, item in zip(test["history"].to_list(), test["item_id"].to_list(), strict=True):
            if item in catalog:
                out.append({"history": list(history)[-TOPK_HISTORY:], "target": item})
    elif task == "recommendation":
        catalog = pl.read_parquet(data / "catalog.parquet")
        texts = dict(zip(catalog["item_id"], catalog["item_text"], strict=True))
        ids = list(texts)
        for history, item in zip(test["history"].to_list(), test["item_id"].to_list(), strict=True):
            if item not in texts:
                continue
            negatives = [i for i in rng.sample(ids, CANDIDATES) if i != item][: CANDIDATES - 1]
            candidates = [item, *negatives]
            rng.shuffle(candidates)
            out.append(
                {
                    "user": history_text(history, texts),
                    "items": [texts[i] for i in candidates],
                    "gains": [1.0 if i == item else 0.0 for i in candidates],
                }
            )
    else:
        for (query,), group in test.group_by(["query"], maintain_order=True):
            if group.height < 2:
                continue
            labels = group["label"].to_numpy().astype(float)
            low = float(labels.min())
            out.append(
                {
                    "query": query,
                    "items": group["item_text"].to_list(),
                    "gains": (labels - low).tolist(),
                }
            )
    rng.shuffle(out)
    return out


def request_body(impression: dict, k: int = 5) -> dict:
    """The Open Inference Protocol request for one impression (raw text, JSON; or item ids
    and ``k`` for a top-k model)."""
    if "target" in impression:
        history = impression["history"] or [""]  # "" is padding: a user without history
        return {
            "inputs": [
                {"name": "history", "datatype": "BYTES", "shape": [1, len(history)],
                 "data": history},
                {"name": "k", "datatype": "INT32", "shape": [1, 1], "data": [k]},
            ]
        }  # fmt: skip
    if "user" in impression:
        texts = [impression["user"], *impression["items"]]
        return {
            "inputs": [
                {"name": "text", "datatype": "BYTES", "shape": [len(texts), 1], "data": texts}
            ]
        }
    n = len(impression["items"])
    return {
        "inputs": [
            {"name": "query", "datatype": "BYTES", "shape": [n, 1],
             "data": [impression["query"]] * n},
            {"name": "item", "datatype": "BYTES", "shape": [n, 1], "data": impression["items"]},
        ]
    }  # fmt: skip


def served_order(impression: dict, response: dict) -> list[int]:
    """Candidate indices in the order the model ranks them."""
    outputs = {o["name"]: o for o in response["outputs"]}
    if "embedding" in outputs:
        shape = outputs["embedding"]["shape"]
        vectors = np.asarray(outputs["embedding"]["data"], dtype=np.float32).reshape(shape)
        scores = vectors[1:] @ vectors[0]
    else:
        scores = np.asarray(outputs["score"]["data"], dtype=np.float32).reshape(-1)
    return list(np.argsort(-scores, kind="stable"))


def outcome(impression: dict, response: dict, k: int) -> tuple[bool, float]:
    """(clicked, gain) of one served answer: the chosen item in the served top ``k``, and
    the NDCG@k of the ranking."""
    if "target" in impression:
        outputs = {o["name"]: o for o in response["outputs"]}
        served = [item for item in outputs["item_ids"]["data"][:k] if item]
        if impression["target"] not in served:
            return False, 0.0
        return True, 1.0 / math.log2(served.index(impression["target"]) + 2)
    order = served_order(impression, response)
    gains = [impression["gains"][i] for i in order]
    best = max(impression["gains"])
    return best > 0 and best in gains[:k], ndcg_at_k(gains, k)


async def replay(args: argparse.Namespace) -> None:
    """Send impressions at ``rate`` per second until stopped (cycling through the data)."""
    topk = args.topk is not None
    k = args.topk if topk else args.k
    pool = impressions(args.data, args.task, args.seed, topk)
    if not pool:
        raise SystemExit(f"no impressions in {args.data}")
    infer = f"{args.router}/v2/models/{args.model}/infer"
    sent = ok = failed = 0
    window = asyncio.Semaphore(args.concurrency)
    headers = {"Host": args.host} if args.host else {}
    feedback_url = f"{args.router}{args.feedback_path}"
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:

        async def one(impression: dict) -> None:
            nonlocal ok, failed
            async with window:
                try:
                    body = request_body(impression, k)
                    async with session.post(infer, json=body) as response:
                        revision = response.headers.get("x-recjob-revision")
                        if response.status != 200 or revision is None:
                            failed += 1
                            return
                        body = await response.json()
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    failed += 1
                    return
                try:
                    clicked, gain = outcome(impression, body, k)
                except (KeyError, TypeError, ValueError, IndexError):  # not the answer asked
                    failed += 1
                    return
                feedback = {"revision": revision, "clicked": clicked, "gain": gain}
                pin = {"x-recjob-revision": revision}
                try:
                    async with session.post(feedback_url, json=feedback, headers=pin) as answer:
                        if answer.status == 200:
                            ok += 1
                        else:
                            failed += 1
                except (aiohttp.ClientError, TimeoutError):
                    failed += 1

        started = time.monotonic()
        last_report = started
        tasks: set[asyncio.Task] = set()
        while True:
            impression = pool[sent % len(pool)]
            task = asyncio.create_task(one(impression))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
            target = started + sent / args.rate
            await asyncio.sleep(max(0.0, target - time.monotonic()))
            if args.duration is not None and time.monotonic() - started > args.duration:
                await asyncio.gather(*tasks, return_exceptions=True)
                print(json.dumps({"sent": sent, "ok": ok, "failed": failed}), flush=True)
                return
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                print(json.dumps({"sent": sent, "ok": ok, "failed": failed}), flush=True)


def main() -> None:
    """Replay until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--router", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--task", choices=["search-ranking", "recommendation"], required=True)
    parser.add_argument("--rate", type=float, default=8.0, help="impressions per second")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--k", type=int, default=5, help="clicks within the top k shown")
    parser.add_argument(
        "--topk",
        type=int,
        default=None,
        help="ask a top-k model for the top K of the whole catalog (a sequential "
        "recommender's <service>-topk) and click when the user's next item is in it",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host", default=None, help="Host header (a Gateway's HTTPRoute)")
    parser.add_argument(
        "--feedback-path",
        default="/feedback",
        help="/feedback (local router) or /v2/feedback (model servers)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="stop after this many seconds (default: until SIGTERM)",
    )
    asyncio.run(replay(parser.parse_args()))


if __name__ == "__main__":
    main()
