"""The quality gate: a converted model must keep the source model's ranking quality.

Both models are measured on the same held-out labelled rows with the trainer's metrics;
fidelity (Spearman correlation of the scores, top-10 overlap per query/user) is reported
beside. Over budget -> not published; the report is kept either way.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl
import torch

from recjob_operator.api.v1alpha1.spec_delivery import QualityBudget
from recjob_trainer import metrics as m
from recjob_trainer.batches import Batcher
from recjob_trainer.evaluation import (
    PER_UNIT,
    cross_encoder_logits,
    draw_negatives,
    recommendation_report,
    search_report,
    user_item_scores,
)

LOWER_IS_BETTER = {"rmse", "logloss"}
KS = [1, 5, 10]


def report_key(metric: str, task: str, labelled: bool) -> str:
    """Where ``metric`` (a RecJob metric name, or auto) lives in an evaluation report."""
    if metric == "auto":
        return "ndcg@10" if task == "search-ranking" else ("auc" if labelled else "full/ndcg@10")
    if task == "recommendation" and "@" in metric:
        name, k = metric.split("@")
        return f"full/{'hr' if name == 'recall' else name}@{k}"
    if task == "recommendation" and metric == "mrr":
        return "full/mrr"
    return metric


def relative_drop(source: float, converted: float, metric: str) -> float:
    """How much worse ``converted`` is, relative to ``source`` (negative: better)."""
    if source == 0 or math.isnan(source) or math.isnan(converted):
        return math.inf if converted != source else 0.0
    change = (converted - source) / abs(source)
    return (change if metric in LOWER_IS_BETTER else -change) + 0.0  # no "-0.00%"


def _top_k_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    top_a, top_b = set(np.argsort(-a)[:k].tolist()), set(np.argsort(-b)[:k].tolist())
    return len(top_a & top_b) / max(1, min(k, len(a)))


def scores(model, batcher: Batcher, test: pl.DataFrame, batch_size: int) -> np.ndarray:
    """Every score the gate needs from one model, computed once: a logit per (query,
    item) row (search), or a users x catalog cosine matrix (recommendation)."""
    if batcher.task == "search-ranking":
        return cross_encoder_logits(model, batcher, test, batch_size)
    return user_item_scores(model, batcher, test, batcher.catalog_ids, batch_size)


def metrics_of(
    model, score: np.ndarray, batcher: Batcher, test: pl.DataFrame, negatives: list[list[str]]
) -> dict[str, float]:
    """The trainer's test metrics from a model's scores (see :func:`scores`)."""
    if batcher.task == "search-ranking":
        report = search_report(test, score, model.predict(torch.from_numpy(score)).numpy(), KS)
    else:
        scale = float(model.scale().detach().float().reshape(-1)[0])
        report = recommendation_report(score, batcher.catalog_ids, test, negatives, KS, True, scale)
    report.pop(PER_UNIT, None)
    return report


def fidelity(
    a: np.ndarray, b: np.ndarray, batcher: Batcher, test: pl.DataFrame, max_users: int = 200
) -> dict[str, float]:
    """Spearman correlation of source vs converted scores and mean top-10 overlap (per
    query for search, per user over the catalog for recommendation)."""
    if batcher.task == "search-ranking":
        frame = test.with_row_index("_i")
        overlaps = [
            _top_k_overlap(a[g["_i"].to_numpy()], b[g["_i"].to_numpy()])
            for g in frame.partition_by("query", maintain_order=True)
        ]
        return {"rank_correlation": m.spearman(a, b), "top_k_overlap": float(np.mean(overlaps))}
    pairs = list(zip(a[:max_users], b[:max_users], strict=True))
    return {
        "rank_correlation": float(np.nanmean([m.spearman(x, y) for x, y in pairs])),
        "top_k_overlap": float(np.mean([_top_k_overlap(x, y) for x, y in pairs])),
    }


def quality_gate(
    source,
    converted,
    batcher: Batcher,
    test: pl.DataFrame,
    budget: QualityBudget,
    batch_size: int = 64,
    max_groups: int | None = None,
    teacher_value: float | None = None,
    n_negatives: int = 100,
    teacher=None,
) -> dict[str, Any]:
    """Measure both models on ``test`` and decide; the dict is quality-gate.json.

    With compression, ``teacher`` (the uncompressed model, measured on the same rows) or
    ``teacher_value`` bounds the drop against the teacher too."""
    labelled = "label" in test.columns and batcher.task == "recommendation"
    key = report_key(budget.metric, batcher.task, labelled)
    if batcher.task == "search-ranking" and max_groups:
        keep = test["query"].unique(maintain_order=True)[:max_groups]
        test = test.filter(pl.col("query").is_in(keep.to_list()))
    elif max_groups:
        test = test.head(max_groups)
    negatives = (
        draw_negatives(test, batcher.catalog_ids, n_negatives)
        if batcher.task == "recommendation"
        else []
    )
    a = scores(source, batcher, test, batch_size)
    b = scores(converted, batcher, test, batch_size)
    src = metrics_of(source, a, batcher, test, negatives)
    conv = metrics_of(converted, b, batcher, test, negatives)
    if key not in src:
        raise ValueError(
            f"metric {budget.metric!r} is not measured for {batcher.task} "
            f"(measured: {', '.join(sorted(src))})"
        )
    teacher_report = None
    if teacher is not None:
        teacher_report = metrics_of(
            teacher, scores(teacher, batcher, test, batch_size), batcher, test, negatives
        )
        teacher_value = teacher_report[key]
    drop = relative_drop(src[key], conv[key], key)
    fid = fidelity(a, b, batcher, test)
    reasons = []
    if drop > budget.max_relative_drop:
        reasons.append(
            f"{key} went from {src[key]:.4f} to {conv[key]:.4f}: {drop:.2%} worse (relative), "
            f"over the budget of {budget.max_relative_drop:.2%}"
        )
    if fid["rank_correlation"] < budget.min_rank_correlation:
        reasons.append(
            f"rank correlation with the source model is "
            f"{fid['rank_correlation']:.3f}, below {budget.min_rank_correlation}"
        )
    teacher_drop = None
    if teacher_value is not None:
        teacher_drop = relative_drop(teacher_value, conv[key], key)
        limit = budget.max_relative_drop_vs_teacher
        if limit is not None and teacher_drop > limit:
            reasons.append(
                f"{key} is {teacher_drop:.2%} below the teacher's {teacher_value:.4f},"
                f" over the budget of {limit:.2%}"
            )
    return {
        "metric": key,
        "source_value": src[key],
        "converted_value": conv[key],
        "relative_drop": drop,
        "budget": budget.max_relative_drop,
        "teacher_value": teacher_value,
        "relative_drop_vs_teacher": teacher_drop,
        **fid,
        "passed": not reasons,
        "reasons": reasons,
        "rows": test.height,
        "source": src,
        "converted": conv,
        "teacher": teacher_report,
    }
