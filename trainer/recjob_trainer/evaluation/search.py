"""Search-ranking evaluation: per-query metrics of the model, BM25, zero-shot and constant
baselines on (query, item, grade) rows."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from .. import metrics as m
from ..batches import Batcher
from ..models import RankingModel
from .encoding import cross_encoder_logits, text_vectors
from .paired import PER_UNIT


def _groups(frame: pl.DataFrame, key: str, max_groups: int | None) -> pl.DataFrame:
    if max_groups is None:
        return frame
    keys = frame.select(pl.col(key).unique(maintain_order=True)).to_series()[:max_groups]
    return frame.filter(pl.col(key).is_in(keys.to_list()))


def search_report(
    frame: pl.DataFrame, scores: np.ndarray, predictions: np.ndarray | None, ks: list[int]
) -> dict[str, float]:
    """Metrics of scores (and predicted grades, when there are) on (query, item, grade) rows."""
    labels = frame["label"].to_numpy()
    low, high = float(labels.min()), float(labels.max())
    middle = (high - low) / 2
    gains = labels - low
    groups = []
    frame = frame.with_row_index("_i")
    for group in frame.partition_by("query", maintain_order=True):
        idx = group["_i"].to_numpy()
        groups.append((gains[idx], scores[idx]))
    report = m.ranking_report(groups, ks=ks, relevance_threshold=middle)
    per_query = [m.ndcg_at_k(g, s, 10) for g, s in groups if (g > middle).any()]
    report[PER_UNIT] = [v for v in per_query if v is not None]
    relevant = (gains > middle).astype(float)
    report["auc"] = m.auc(relevant, scores)
    if predictions is not None:
        report["rmse"] = m.rmse(labels, predictions)
        probability = (predictions - low) / max(high - low, 1e-9)
        # "relevant" is a grade above the middle of the scale, i.e. probability above 0.5
        report.update(m.precision_recall_f1(relevant, probability, 0.5))
        report["calibration_ece"] = m.calibration(relevant, probability)["ece"]
    return report


def calibrate(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Least-squares line mapping a baseline's scores to grades."""
    if len(scores) < 2 or np.std(scores) == 0:
        return 0.0, float(np.mean(labels)) if len(labels) else 0.0
    slope, intercept = np.polyfit(scores, labels, 1)
    return float(slope), float(intercept)


def bm25_scores(frame: pl.DataFrame, corpus: list[str]) -> np.ndarray:
    """BM25 (bm25s, Lucene variant) score of each row's item text for its query, with
    corpus statistics from ``corpus`` (every distinct item text)."""
    import bm25s

    index = {text: i for i, text in enumerate(corpus)}
    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False
    )
    out = np.zeros(frame.height)
    rows = frame.with_row_index("_i")
    for group in rows.partition_by("query", maintain_order=True):
        tokens = bm25s.tokenize(
            [group["query"][0]], stopwords="en", show_progress=False, return_ids=False
        )[0]
        all_scores = retriever.get_scores(tokens) if tokens else np.zeros(len(corpus))
        for i, text in zip(group["_i"].to_list(), group["item_text"].to_list(), strict=True):
            out[i] = all_scores[index[text]]
    return out


def evaluate_search(
    model: RankingModel | None,
    batcher: Batcher,
    test: pl.DataFrame,
    ks: list[int],
    batch_size: int,
    max_groups: int | None = None,
) -> dict:
    """The model's metrics on (up to ``max_groups`` queries of) ``test``."""
    test = _groups(test, "query", max_groups)
    logits = cross_encoder_logits(model, batcher, test, batch_size)
    predictions = model.predict(torch.from_numpy(logits)).numpy()
    return search_report(test, logits, predictions, ks)


def search_baselines(
    zero_shot: RankingModel,
    batcher: Batcher,
    splits: dict[str, pl.DataFrame],
    ks: list[int],
    batch_size: int,
    max_groups: int | None,
) -> dict:
    """BM25, zero-shot and constant baselines on the test split."""
    test = _groups(splits["test"], "query", max_groups)
    valid = _groups(splits["validation"], "query", max_groups)
    corpus = sorted(set(pl.concat([s["item_text"] for s in splits.values()]).to_list()))
    out = {}

    def zero_shot_scores(frame: pl.DataFrame) -> np.ndarray:
        q = text_vectors(zero_shot, batcher, frame["query"].to_list(), batch_size)
        t = text_vectors(zero_shot, batcher, frame["item_text"].to_list(), batch_size)
        return (q * t).sum(1)

    for name, score_fn in (
        ("bm25", lambda f: bm25_scores(f, corpus)),
        ("zero-shot", zero_shot_scores),
    ):
        slope, intercept = calibrate(score_fn(valid), valid["label"].to_numpy())
        scores = score_fn(test)
        labels = test["label"].to_numpy()
        predictions = np.clip(slope * scores + intercept, labels.min(), labels.max())
        out[name] = search_report(test, scores, predictions, ks)
    mean = float(splits["train"]["label"].mean())
    out["constant"] = {"rmse": m.rmse(test["label"].to_numpy(), np.full(test.height, mean))}
    return out
