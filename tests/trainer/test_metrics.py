"""Metric functions agree with scikit-learn / scipy and with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn import metrics as skm

from recjob_trainer import metrics as m

RNG = np.random.default_rng(0)


def test_pointwise_metrics_match_sklearn() -> None:
    y = RNG.integers(0, 2, 500)
    p = np.clip(RNG.random(500) * 0.6 + y * 0.3, 0, 1)
    assert m.auc(y, p) == pytest.approx(skm.roc_auc_score(y, p))
    assert m.log_loss(y, p) == pytest.approx(skm.log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)))
    assert m.rmse(y, p) == pytest.approx(math.sqrt(skm.mean_squared_error(y, p)))
    prf = m.precision_recall_f1(y, p, 0.5)
    sk = skm.precision_recall_fscore_support(y, p >= 0.5, average="binary")
    assert (prf["precision"], prf["recall"], prf["f1"]) == pytest.approx(sk[:3])


def test_auc_with_ties_and_one_class() -> None:
    y = [0, 0, 1, 1, 1, 0]
    s = [0.1, 0.5, 0.5, 0.9, 0.5, 0.2]
    assert m.auc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    assert math.isnan(m.auc([1, 1], [0.2, 0.3]))


@pytest.mark.parametrize("k", [1, 3, 5, 10])
def test_ndcg_matches_sklearn_with_exponential_gains(k: int) -> None:
    for _ in range(20):
        gains = RNG.integers(0, 3, 12).astype(float)
        if not gains.any():
            continue
        scores = RNG.random(12)
        expected = skm.ndcg_score([2**gains - 1], [scores], k=k)
        assert m.ndcg_at_k(gains, scores, k) == pytest.approx(expected)


def test_ranking_metrics_by_hand() -> None:
    relevant = [0, 1, 0, 1]
    scores = [0.9, 0.8, 0.7, 0.1]  # ranks: item0, item1, item2, item3
    assert m.reciprocal_rank(relevant, scores) == 0.5
    assert m.recall_at_k(relevant, scores, 2) == 0.5
    assert m.precision_at_k(relevant, scores, 2) == 0.5
    assert m.ndcg_at_k([0, 1, 0, 0], [0.1, 0.9, 0.2, 0.3], 10) == 1.0
    assert m.ndcg_at_k([0, 0], [0.1, 0.2], 10) is None


def test_ranking_report_skips_groups_without_relevant_items() -> None:
    report = m.ranking_report([([0, 1], [0.2, 0.9]), ([0, 0], [0.1, 0.2])], ks=(1,))
    assert report["ndcg@1"] == 1.0 and report["mrr"] == 1.0
    assert report["groups"] == 1 and report["groups_without_relevant"] == 1


def test_target_rank_report() -> None:
    report = m.target_rank_report([0, 1, 9, 50], ks=(1, 10))
    assert report["hr@1"] == 0.25 and report["hr@10"] == 0.75
    assert report["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 51) / 4)
    assert report["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 4)


def test_rank_of_target_counts_ties_against_the_target() -> None:
    assert m.rank_of_target(np.array([0.5, 0.5, 0.5]), 1) == 2
    assert m.rank_of_target(np.array([0.1, 0.9, 0.5]), 1) == 0


def test_spearman_matches_scipy() -> None:
    a, b = RNG.random(50), RNG.random(50)
    b[:10] = b[0]  # ties
    assert m.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)


def test_calibration() -> None:
    y = np.array([0, 1, 0, 1])
    p = np.array([0.1, 0.9, 0.1, 0.9])
    report = m.calibration(y, p, bins=10)
    assert report["predicted_rate"] == pytest.approx(0.5)
    assert report["observed_rate"] == 0.5
    assert report["ece"] == pytest.approx(0.1)


def test_paired_bootstrap() -> None:
    better = m.paired_bootstrap([0.9, 0.8, 0.7, 0.95] * 25, [0.5, 0.6, 0.7, 0.5] * 25)
    assert better["mean_difference"] == pytest.approx(0.2625)
    assert 0 < better["ci95_low"] <= better["mean_difference"] <= better["ci95_high"]
    assert better["share_of_resamples_better"] == 1.0
    noise = m.paired_bootstrap(RNG.random(200), RNG.random(200))
    assert noise["ci95_low"] < 0 < noise["ci95_high"]


def test_candidates_metrics_rank_the_true_item_among_its_list() -> None:
    """spec.data.candidates: the true item ranked among its row's given list; a list
    without it is a miss; rows without a list are left out."""
    import polars as pl

    from recjob_trainer.evaluation import PER_UNIT, ranking_part

    items = ["a", "b", "c", "d", "e"]
    scores = np.array(
        [
            [0.9, 0.5, 0.1, 0.8, 0.7],  # true b: 4th of the catalog, 2nd among [a, b, c]
            [0.1, 0.2, 0.3, 0.4, 0.5],  # true e, list [a, b]: a miss
            [0.1, 0.2, 0.3, 0.4, 0.5],  # no list
            [0.5, 0.5, 0.1, 0.1, 0.1],  # true a ties with b: ties count against it
        ]
    )
    frame = pl.DataFrame(
        {
            "user_id": ["u", "v", "w", "x"],
            "history": [[], [], [], []],
            "item_id": ["b", "e", "c", "a"],
            "candidates": [["a", "b", "c"], ["a", "b"], None, ["b", "c", "a"]],
        }
    )
    negatives = [["c"], ["a"], ["a"], ["c"]]
    report = ranking_part(scores, items, frame, negatives, [1, 2], full=True)
    report.pop(PER_UNIT)
    ranks = np.array([1, np.inf, 1])
    assert report["candidates/users"] == 3
    assert report["candidates/target_in_list"] == pytest.approx(2 / 3)
    assert report["candidates/hr@1"] == 0.0
    assert report["candidates/hr@2"] == pytest.approx(2 / 3)
    assert report["candidates/mrr"] == pytest.approx(np.mean(1 / (ranks + 1)))
    assert report["candidates/ndcg@2"] == pytest.approx(2 / 3 / math.log2(3))
    assert report["full/users"] == 4  # beside the full-catalog and sampled metrics
    assert "sampled/hr@1" in report
    assert not any(k.startswith("candidates/") for k in ranking_part(
        scores, items, frame.drop("candidates"), negatives, [1], full=True
    ))  # fmt: skip
