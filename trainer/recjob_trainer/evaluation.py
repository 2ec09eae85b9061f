"""Held-out evaluation of a model and of the baselines, on the same rows.

search-ranking: per-query ranking metrics with graded gains (grade - lowest grade), RMSE
of predicted grades, AUC / precision / recall / F1 / calibration of "relevant" (grade above
the middle of the scale). Baselines: BM25, the zero-shot pretrained model (cosine of
mean-pooled embeddings) — both calibrated to grades by least squares on the validation
split for RMSE — and the constant train-mean grade.

recommendation: the true next item ranked against the whole catalog (full ranking) and
against sampled negatives. Baselines: popularity and the zero-shot pretrained model.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from . import metrics as m
from .batches import Batcher, history_text
from .models import RankingModel


def _groups(frame: pl.DataFrame, key: str, max_groups: int | None) -> pl.DataFrame:
    if max_groups is None:
        return frame
    keys = frame.select(pl.col(key).unique(maintain_order=True)).to_series()[:max_groups]
    return frame.filter(pl.col(key).is_in(keys.to_list()))


@torch.no_grad()
def _batched(fn, items: list, batch_size: int) -> np.ndarray:
    out = [fn(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
    return torch.cat(out).float().cpu().numpy() if out else np.zeros(0)


def cross_encoder_logits(
    model: RankingModel, batcher: Batcher, frame: pl.DataFrame, batch_size: int
) -> np.ndarray:
    """Logit of every (query, item) row."""
    pairs = list(zip(frame["query"].to_list(), frame["item_text"].to_list(), strict=True))
    device = next(model.parameters()).device

    def fn(chunk):
        batch = batcher.pairs([q for q, _ in chunk], [t for _, t in chunk])
        return model.score_pairs(**{k: v.to(device) for k, v in batch.items()})

    return _batched(fn, pairs, batch_size)


def text_vectors(
    model: RankingModel, batcher: Batcher, texts: list[str], batch_size: int
) -> np.ndarray:
    """Unit embeddings of texts (bi-encoder, or the zero-shot pretrained encoder)."""
    device = next(model.parameters()).device

    def fn(chunk):
        batch = batcher.texts_batch(chunk, "")
        return model.item_vectors(batch["input_ids"].to(device), batch["attention_mask"].to(device))

    return _batched(fn, texts, batch_size)


# --------------------------------------------------------------------------- search
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


# --------------------------------------------------------------------------- recommendation
def _sampled_ranks(
    scores: np.ndarray, targets: np.ndarray, histories: list[set[int]], n_negatives: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_items = scores.shape[1]
    ranks, positives, negatives = [], [], []
    for u, target in enumerate(targets):
        banned = histories[u] | {int(target)}
        pool = rng.choice(n_items, size=min(n_items, n_negatives * 2 + len(banned)), replace=False)
        negs = [i for i in pool.tolist() if i not in banned][:n_negatives]
        candidate = np.concatenate([[scores[u, target]], scores[u, negs]])
        ranks.append(m.rank_of_target(candidate, 0))
        positives.append(scores[u, target])
        negatives.extend(scores[u, negs].tolist())
    return np.array(ranks), np.array(positives), np.array(negatives)


def recommendation_report(
    scores: np.ndarray,
    frame: pl.DataFrame,
    item_index: dict[str, int],
    ks: list[int],
    n_negatives: int,
    seed: int = 0,
) -> dict:
    """Full-ranking and sampled metrics from a (users x catalog) score matrix."""
    targets = np.array([item_index[i] for i in frame["item_id"].to_list()])
    histories = [{item_index[i] for i in h if i in item_index} for h in frame["history"].to_list()]
    full = [m.rank_of_target(scores[u], t) for u, t in enumerate(targets)]
    report = {f"full/{k}": v for k, v in m.target_rank_report(full, ks).items()}
    ranks, pos, neg = _sampled_ranks(scores, targets, histories, n_negatives, seed)
    report.update({f"sampled/{k}": v for k, v in m.target_rank_report(ranks, ks).items()})
    report["auc"] = m.auc(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])
    return report


def user_item_scores(
    model: RankingModel,
    batcher: Batcher,
    frame: pl.DataFrame,
    catalog_ids: list[str],
    batch_size: int,
) -> np.ndarray:
    """Cosine scores of each row's user (history text) against every catalog item."""
    items = text_vectors(model, batcher, [batcher.texts[i] for i in catalog_ids], batch_size)
    users = text_vectors(
        model,
        batcher,
        [history_text(h, batcher.texts) for h in frame["history"].to_list()],
        batch_size,
    )
    return users @ items.T


def evaluate_recommendation(
    model: RankingModel,
    batcher: Batcher,
    test: pl.DataFrame,
    ks: list[int],
    batch_size: int,
    n_negatives: int,
    max_groups: int | None = None,
) -> dict:
    """The model's full-ranking and sampled metrics on (up to ``max_groups`` users of) test."""
    test = test.head(max_groups) if max_groups else test
    ids = batcher.catalog_ids
    scores = user_item_scores(model, batcher, test, ids, batch_size)
    return recommendation_report(scores, test, {i: n for n, i in enumerate(ids)}, ks, n_negatives)


def recommendation_baselines(
    zero_shot: RankingModel,
    batcher: Batcher,
    splits: dict[str, pl.DataFrame],
    ks: list[int],
    batch_size: int,
    n_negatives: int,
    max_groups: int | None,
) -> dict:
    """Popularity (train interactions) and zero-shot baselines on the test split."""
    test = splits["test"].head(max_groups) if max_groups else splits["test"]
    ids = batcher.catalog_ids
    index = {i: n for n, i in enumerate(ids)}
    train = splits["train"]
    counts = pl.concat([train["item_id"], train["history"].explode()]).value_counts()
    popularity = np.zeros(len(ids))
    for item, count in counts.iter_rows():
        if item in index:
            popularity[index[item]] = count
    # tiny jitter breaks ties between equally popular items deterministically
    pop_scores = np.tile(popularity + np.linspace(0, 1e-6, len(ids)), (test.height, 1))
    return {
        "popularity": recommendation_report(pop_scores, test, index, ks, n_negatives),
        "zero-shot": recommendation_report(
            user_item_scores(zero_shot, batcher, test, ids, batch_size),
            test,
            index,
            ks,
            n_negatives,
        ),
    }
