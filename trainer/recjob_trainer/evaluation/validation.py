"""The early-stopping metric during training."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..batches import Batcher
from ..models import RankingModel
from .recommendation import evaluate_recommendation
from .search import evaluate_search

if TYPE_CHECKING:  # annotations only: serving's quality gate imports this package too
    from ..config import TrainerConfig
    from ..data.prepared import PreparedData


def validation_metric(
    model: RankingModel, batcher: Batcher, prepared: PreparedData, config: TrainerConfig
) -> tuple[str, float]:
    """(name, value) of the early-stopping metric on (a capped part of) the validation split.

    Every rank computes it on the same rows (ZeRO-3 forwards are collective)."""
    ev = config.evaluation
    metric = "ndcg@10"
    if config.training.early_stopping and config.training.early_stopping.metric != "auto":
        metric = config.training.early_stopping.metric
    valid = prepared.splits["validation"]
    if valid.height == 0:
        return metric, float("nan")
    # the sequential recommender ranks the whole catalog from vectors computed once: cheap
    # enough for a steadier estimate over more users, on the full-ranking protocol
    sequential = model.info.kind == "sequential"
    groups = ev.max_groups or (2000 if sequential else 200)
    model.eval()
    try:
        if config.data.task == "search-ranking":
            report = evaluate_search(
                model, batcher, valid, sorted({*ev.ks, 10}), ev.batch_size, groups
            )
            value = report.get(metric, report.get("ndcg@10", float("nan")))
            if metric in ("rmse", "logloss"):
                value = -value  # higher is better for early stopping
        else:
            report = evaluate_recommendation(
                model,
                batcher,
                valid,
                sorted({*ev.ks, 10}),
                ev.batch_size,
                ev.sampled_negatives,
                groups,
                full=sequential,
            )
            protocol = "full" if sequential else "sampled"
            if "label" in valid.columns:  # labelled impressions: pointwise AUC
                metric = "auc"
            elif f"{protocol}/{metric}" in report:
                metric = f"{protocol}/{metric}"
            elif sequential:
                metric = "full/ndcg@10"
            elif f"sampled/{metric}" in report:
                metric = f"sampled/{metric}"
            else:
                metric = "sampled/ndcg@10"
            value = report[metric]
    finally:
        model.train()
    return metric, float(value)
