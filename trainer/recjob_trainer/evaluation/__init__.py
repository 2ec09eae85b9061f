"""Held-out evaluation of a model and of the baselines, on the same rows.

search-ranking (:mod:`.search`): per-query ranking metrics with graded gains (grade -
lowest grade), RMSE of predicted grades, AUC / precision / recall / F1 / calibration of
"relevant" (grade above the middle of the scale). Baselines: BM25, the zero-shot
pretrained model (cosine of mean-pooled embeddings) — both calibrated to grades by least
squares on the validation split for RMSE — and the constant train-mean grade.

recommendation (:mod:`.recommendation`): the true next item ranked against the whole
catalog (full ranking), against sampled negatives and, with spec.data.candidates, among
its given candidate list (candidates/...). Baselines: popularity and the zero-shot
pretrained model.

During training, :func:`validation_metric` (:mod:`.validation`) is the early-stopping
metric on (a capped part of) the validation split.

Cost (:mod:`.encoding`): every encoding pass encodes each distinct text or pair once, in
batches of similar length (less padding); within :func:`evaluating` it reports
``evaluate`` progress events with an ETA and, with ``spread`` (validation, every rank on
the same rows), each rank encodes a share and the ranks all-gather the results. Ranking
a user's true item against the whole catalog or its sampled negatives is array
arithmetic over all users at once, in row chunks.

This package's modules import each other relatively, so a copy of it from another commit
loads beside the current one (``bench/eval_cost.py --reference``).
"""

from .encoding import cross_encoder_logits, evaluating, report_evaluation, text_vectors
from .paired import PER_UNIT, compare_to_baselines
from .recommendation import (
    RANK_CHUNK,
    candidates_part,
    cold_start_rows,
    draw_negatives,
    evaluate_recommendation,
    ranking_part,
    recommendation_baselines,
    recommendation_report,
    target_ranks,
    user_item_scores,
)
from .search import bm25_scores, calibrate, evaluate_search, search_baselines, search_report
from .validation import validation_metric

__all__ = [
    "PER_UNIT",
    "RANK_CHUNK",
    "bm25_scores",
    "calibrate",
    "candidates_part",
    "cold_start_rows",
    "compare_to_baselines",
    "cross_encoder_logits",
    "draw_negatives",
    "evaluate_recommendation",
    "evaluate_search",
    "evaluating",
    "ranking_part",
    "recommendation_baselines",
    "recommendation_report",
    "report_evaluation",
    "search_baselines",
    "search_report",
    "target_ranks",
    "text_vectors",
    "user_item_scores",
    "validation_metric",
]
