"""Ranking and prediction metrics shared by training, conversion and canary analysis.

Pointwise metrics take flat arrays; ranking metrics take one group (a query's candidates or
a user's ranked catalog) at a time and are averaged over groups by :func:`ranking_report`.
Conventions: NDCG uses exponential gains ``2**gain - 1`` with the gain supplied by the
caller (graded relevance minus its floor), ties in scores are broken by position in the
input (stable sort), and a group without any relevant item is skipped (it has no ideal
ranking).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def _arr(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def rmse(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Root mean squared error."""
    t, p = _arr(y_true), _arr(y_pred)
    return float(np.sqrt(np.mean((t - p) ** 2)))


def log_loss(y_true: ArrayLike, p_pred: ArrayLike, eps: float = 1e-7) -> float:
    """Binary cross-entropy of probabilities (clipped to [eps, 1-eps])."""
    t, p = _arr(y_true), np.clip(_arr(p_pred), eps, 1 - eps)
    return float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))


def auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    NaN when only one class is present.
    """
    t, s = _arr(y_true) > 0.5, _arr(scores)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s) + 1.0
    return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def precision_recall_f1(y_true: ArrayLike, p_pred: ArrayLike, threshold: float = 0.5) -> dict:
    """Precision, recall and F1 of ``p_pred >= threshold`` against binary labels."""
    t, p = _arr(y_true) > 0.5, _arr(p_pred) >= threshold
    tp = float(np.sum(t & p))
    precision = tp / max(float(p.sum()), 1.0)
    recall = tp / max(float(t.sum()), 1.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def calibration(y_true: ArrayLike, p_pred: ArrayLike, bins: int = 10) -> dict:
    """Predicted vs observed positive rate overall and per probability bin, and the
    expected calibration error (ECE)."""
    t, p = _arr(y_true), np.clip(_arr(p_pred), 0.0, 1.0)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        if not mask.any():
            continue
        predicted, observed = float(p[mask].mean()), float(t[mask].mean())
        ece += mask.mean() * abs(predicted - observed)
        table.append(
            {"bin": b, "count": int(mask.sum()), "predicted": predicted, "observed": observed}
        )
    return {
        "predicted_rate": float(p.mean()),
        "observed_rate": float(t.mean()),
        "ece": float(ece),
        "bins": table,
    }


def dcg_at_k(gains_in_rank_order: ArrayLike, k: int) -> float:
    """Discounted cumulative gain of the first k items (exponential gains)."""
    g = _arr(gains_in_rank_order)[:k]
    return float(np.sum((2.0**g - 1.0) / np.log2(np.arange(2, len(g) + 2))))


def ndcg_at_k(gains: ArrayLike, scores: ArrayLike, k: int) -> float | None:
    """NDCG@k of one group; None when the group has no positive gain."""
    g, s = _arr(gains), _arr(scores)
    ideal = dcg_at_k(np.sort(g)[::-1], k)
    if ideal <= 0:
        return None
    order = np.argsort(-s, kind="stable")
    return dcg_at_k(g[order], k) / ideal


def reciprocal_rank(relevant: ArrayLike, scores: ArrayLike) -> float | None:
    """1 / rank of the first relevant item; None when nothing is relevant."""
    r, s = _arr(relevant) > 0, _arr(scores)
    if not r.any():
        return None
    order = np.argsort(-s, kind="stable")
    first = int(np.flatnonzero(r[order])[0])
    return 1.0 / (first + 1)


def recall_at_k(relevant: ArrayLike, scores: ArrayLike, k: int) -> float | None:
    """Share of the relevant items ranked in the top k (hit rate when one is relevant)."""
    r, s = _arr(relevant) > 0, _arr(scores)
    if not r.any():
        return None
    order = np.argsort(-s, kind="stable")[:k]
    return float(r[order].sum() / r.sum())


def precision_at_k(relevant: ArrayLike, scores: ArrayLike, k: int) -> float | None:
    """Share of the top k that is relevant."""
    r, s = _arr(relevant) > 0, _arr(scores)
    if not r.any():
        return None
    order = np.argsort(-s, kind="stable")[:k]
    return float(r[order].sum() / min(k, len(s)))


def rank_of_target(scores: np.ndarray, target: int) -> int:
    """0-based rank of index ``target`` among ``scores`` (ties count against the target,
    so a constant model earns no credit)."""
    return int(np.sum(scores >= scores[target]) - 1)


def ranking_report(
    groups: Iterable[tuple[ArrayLike, ArrayLike]],
    ks: Sequence[int] = (1, 5, 10),
    relevance_threshold: float = 0.0,
) -> dict[str, float]:
    """Mean NDCG@k, MRR, recall@k (= HR@k with one relevant item) and precision@k over groups.

    Each group is ``(gains, scores)``; an item is relevant when its gain exceeds
    ``relevance_threshold``. Groups without a relevant item are skipped and counted.
    """
    sums: dict[str, list[float]] = {}
    n_groups = skipped = 0
    for gains, scores in groups:
        g = _arr(gains)
        relevant = (g > relevance_threshold).astype(np.float64)
        if not relevant.any():
            skipped += 1
            continue
        n_groups += 1
        values = {"mrr": reciprocal_rank(relevant, scores)}
        for k in ks:
            values[f"ndcg@{k}"] = ndcg_at_k(g, scores, k)
            values[f"recall@{k}"] = recall_at_k(relevant, scores, k)
            values[f"precision@{k}"] = precision_at_k(relevant, scores, k)
        for name, value in values.items():
            if value is not None:
                sums.setdefault(name, []).append(value)
    report = {name: float(np.mean(v)) for name, v in sums.items()}
    report["groups"] = float(n_groups)
    report["groups_without_relevant"] = float(skipped)
    return report


def target_rank_report(ranks: ArrayLike, ks: Sequence[int] = (1, 5, 10, 20)) -> dict[str, float]:
    """HR@k, NDCG@k and MRR from the 0-based ranks of one true item per user."""
    r = _arr(ranks)
    report = {"mrr": float(np.mean(1.0 / (r + 1))), "users": float(len(r))}
    for k in ks:
        hit = r < k
        report[f"hr@{k}"] = float(np.mean(hit))
        report[f"ndcg@{k}"] = float(np.mean(np.where(hit, 1.0 / np.log2(r + 2), 0.0)))
    return report


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    ra, rb = _average_ranks(_arr(a)), _average_ranks(_arr(b))
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """0-based ranks, tied values sharing the mean of their positions (array arithmetic:
    an AUC over a million sampled scores took seconds as a loop over tie groups)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    boundaries = np.flatnonzero(np.diff(sorted_x)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    ranks[order] = np.repeat((starts + ends - 1) / 2.0, ends - starts)
    return ranks


def paired_bootstrap(
    a: ArrayLike, b: ArrayLike, resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Mean of ``a - b`` over paired units (queries, users) with a 95% bootstrap interval
    and the share of resamples in which ``a`` wins."""
    x, y = _arr(a), _arr(b)
    diff = x - y
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return {
        "mean_difference": float(diff.mean()),
        "ci95_low": float(low),
        "ci95_high": float(high),
        "share_of_resamples_better": float((means > 0).mean()),
        "units": float(len(diff)),
    }
