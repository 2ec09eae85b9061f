"""The replay driver against a sequential recommender's top-k model: impressions are
histories of item ids and the item chosen next; a click is that item in the served top-k
of the whole catalog, the gain its NDCG@k."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from recjob_operator.local.replay import TOPK_HISTORY, impressions, outcome, request_body


def _data(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {"item_id": ["a", "b", "c", "d"], "item_text": ["A", "B", "C", "D"]}
    ).write_parquet(directory / "catalog.parquet")
    pl.DataFrame(
        {
            "history": [["a", "b"], [], [f"x{n}" for n in range(300)]],
            "item_id": ["c", "d", "gone"],
        }
    ).write_parquet(directory / "test.parquet")
    return directory


def _answer(items: list[str]) -> dict:
    return {
        "outputs": [
            {"name": "item_ids", "datatype": "BYTES", "shape": [1, len(items)], "data": items},
            {"name": "unknown_items", "datatype": "BYTES", "shape": [1, 0], "data": []},
        ]
    }


def test_topk_impressions_and_requests(tmp_path: Path) -> None:
    pool = impressions(_data(tmp_path), "recommendation", 0, topk=True)
    assert sorted(p["target"] for p in pool) == ["c", "d"]  # a target outside the catalog: out
    first = next(p for p in pool if p["target"] == "c")
    body = request_body(first, 10)
    assert body["inputs"][0] == {
        "name": "history", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"],
    }  # fmt: skip
    assert body["inputs"][1]["data"] == [10]
    cold = request_body(next(p for p in pool if p["target"] == "d"), 10)
    assert cold["inputs"][0]["data"] == [""] and cold["inputs"][0]["shape"] == [1, 1]
    assert TOPK_HISTORY == 200


def test_a_click_is_the_next_item_in_the_served_top_k() -> None:
    impression = {"history": ["a"], "target": "c"}
    assert outcome(impression, _answer(["b", "c", "d"]), 10) == (True, 1 / math.log2(3))
    assert outcome(impression, _answer(["c", "", ""]), 10) == (True, 1.0)
    assert outcome(impression, _answer(["b", "d"]), 10) == (False, 0.0)
    assert outcome(impression, _answer(["b", "d", "c"]), 2) == (False, 0.0)
