"""Recommendation evaluation: the true next item ranked against the whole catalog, sampled
negatives and given candidate lists; popularity and zero-shot baselines."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from recjob_operator.api.model_input import history_text

from .. import metrics as m
from ..batches import Batcher
from ..models import RankingModel, pool_history
from ..sequence_data import sequence_scores
from .encoding import text_vectors
from .paired import PER_UNIT


def draw_negatives(
    frame: pl.DataFrame, catalog_ids: list[str], n_negatives: int, seed: int = 0
) -> list[list[str]]:
    """Per row, ``n_negatives`` catalog items drawn uniformly (seeded), never the true item
    nor one in the user's history: the sampled ranking protocol."""
    rng = np.random.default_rng(seed)
    out = []
    for target, history in zip(frame["item_id"].to_list(), frame["history"].to_list(), strict=True):
        banned = set(history) | {target}
        pool = rng.choice(
            len(catalog_ids),
            size=min(len(catalog_ids), n_negatives * 2 + len(banned)),
            replace=False,
        )
        out.append(
            [catalog_ids[i] for i in pool.tolist() if catalog_ids[i] not in banned][:n_negatives]
        )
    return out


def recommendation_report(
    scores: np.ndarray,
    item_ids: list[str],
    frame: pl.DataFrame,
    negatives: list[list[str]],
    ks: list[int],
    full: bool,
    scale: float | None = None,
) -> dict:
    """Next-item metrics (see :func:`ranking_part`); for labelled impressions (a ``label``
    column) also the pointwise AUC of each impression's score — log-loss and calibration
    too when ``scale`` turns scores into click logits — with the ranking metrics computed
    on the clicked impressions."""
    if "label" not in frame.columns:
        return ranking_part(scores, item_ids, frame, negatives, ks, full)
    index = {item: n for n, item in enumerate(item_ids)}
    own = scores[np.arange(frame.height), [index[i] for i in frame["item_id"].to_list()]]
    clicked = frame["label"].to_numpy() > 0
    report: dict[str, float] = {}
    keep = np.flatnonzero(clicked)
    if keep.size:
        report.update(
            ranking_part(
                scores[keep], item_ids, frame[keep.tolist()], [negatives[k] for k in keep], ks, full
            )
        )
    report.update(
        {
            "auc": m.auc(clicked, own),
            "impressions": float(frame.height),
            "clicks": float(clicked.sum()),
        }
    )
    if scale is not None:
        probability = 1.0 / (1.0 + np.exp(-own * scale))
        calibration = m.calibration(clicked, probability)
        report.update(
            {
                "logloss": m.log_loss(clicked, probability),
                "calibration_ece": calibration["ece"],
                "predicted_ctr": calibration["predicted_rate"],
                "observed_ctr": calibration["observed_rate"],
            }
        )
    return report


def ranking_part(
    scores: np.ndarray,
    item_ids: list[str],
    frame: pl.DataFrame,
    negatives: list[list[str]],
    ks: list[int],
    full: bool,
) -> dict:
    """Metrics from a (users x items) score matrix: full ranking over ``item_ids`` (when
    ``full``, i.e. they are the whole catalog) and the sampled protocol (true item vs its
    row's negatives), plus AUC of true items against sampled negatives."""
    index = {item: n for n, item in enumerate(item_ids)}
    targets = np.asarray([index[i] for i in frame["item_id"].to_list()], dtype=np.int64)
    users = np.arange(len(targets))
    report: dict[str, float] = {}
    if full:
        ranks = target_ranks(scores, targets)
        report.update({f"full/{k}": v for k, v in m.target_rank_report(ranks, ks).items()})
        r = np.asarray(ranks, dtype=np.float64)
        report[PER_UNIT] = np.where(r < 10, 1.0 / np.log2(r + 2), 0.0).tolist()
        report.update(candidates_part(scores, index, frame, ks))
    # the sampled protocol: each row's true item against its own negatives (rows may have
    # fewer negatives than others: a mask), ties counting against the true item as in
    # metrics.rank_of_target
    width = max((len(n) for n in negatives), default=0)
    columns = np.zeros((len(targets), width), dtype=np.int64)
    listed = np.zeros((len(targets), width), dtype=bool)
    for u, negs in enumerate(negatives):
        columns[u, : len(negs)], listed[u, : len(negs)] = [index[i] for i in negs], True
    pos = scores[users, targets] if len(targets) else np.zeros(0)
    negative_scores = scores[users[:, None], columns] if width else np.zeros((len(targets), 0))
    sampled = ((negative_scores >= pos[:, None]) & listed).sum(1) + (pos >= pos) - 1
    neg = negative_scores[listed]  # row by row, each row's negatives in order
    report.update({f"sampled/{k}": v for k, v in m.target_rank_report(sampled, ks).items()})
    report["auc"] = m.auc(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])
    return report


#: Users ranked at a time against the whole catalog (bounds the users x items temporaries).
RANK_CHUNK = 1024


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each row's 0-based rank of its ``targets`` column among all of the row's scores,
    ties counting against the target: :func:`metrics.rank_of_target` for every row at
    once, :data:`RANK_CHUNK` rows at a time."""
    ranks = np.empty(len(targets), dtype=np.int64)
    for start in range(0, len(targets), RANK_CHUNK):
        chunk = scores[start : start + RANK_CHUNK]
        own = chunk[np.arange(len(chunk)), targets[start : start + RANK_CHUNK]]
        ranks[start : start + len(chunk)] = (chunk >= own[:, None]).sum(1) - 1
    return ranks


def candidates_part(
    scores: np.ndarray, index: dict[str, int], frame: pl.DataFrame, ks: list[int]
) -> dict:
    """Metrics on given candidate lists (the test split's ``candidates`` column, from
    spec.data.candidates): each listed row's true item ranked among its list (ties count
    against it); a list without the true item is a miss (infinite rank: no hit, no
    reciprocal rank). Rows without a list are left out; ``candidates/users`` counts the
    rows evaluated and ``candidates/target_in_list`` the share of lists holding the true
    item. ``scores`` must cover every listed item (full ranking)."""
    if "candidates" not in frame.columns:
        return {}
    ranks: list[float] = []
    held = 0
    rows = zip(frame["item_id"].to_list(), frame["candidates"].to_list(), strict=True)
    for u, (target, listed) in enumerate(rows):
        if listed is None:
            continue
        if target in listed:
            held += 1
            others = [index[i] for i in listed if i != target]
            ranks.append(m.rank_of_target(scores[u, [index[target], *others]], 0))
        else:
            ranks.append(np.inf)
    if not ranks:
        return {}
    report = {f"candidates/{k}": v for k, v in m.target_rank_report(ranks, ks).items()}
    report["candidates/target_in_list"] = held / len(ranks)
    return report


def user_item_scores(
    model: RankingModel, batcher: Batcher, frame: pl.DataFrame, item_ids: list[str], batch_size: int
) -> np.ndarray:
    """Cosine scores of each row's user against each of ``item_ids``: the user is the
    history text, or the mean of the history items' vectors (item-embeddings); for the
    sequential recommender, its ordered history through the model's transformer."""
    if model.info.kind == "sequential":
        return sequence_scores(model, batcher, frame, item_ids, max(batch_size, 256))
    histories = frame["history"].to_list()
    if model.info.history_encoding != "item-embeddings":
        items = text_vectors(model, batcher, [batcher.texts[i] for i in item_ids], batch_size)
        users = text_vectors(
            model, batcher, [history_text(h, batcher.texts) for h in histories], batch_size
        )
        return users @ items.T
    needed = list(
        dict.fromkeys([*item_ids, *(i for h in histories for i in h if i in batcher.texts)])
    )
    vectors = text_vectors(model, batcher, [batcher.texts[i] for i in needed], batch_size)
    row = {item: n for n, item in enumerate(needed)}
    width = max(1, max((len(h) for h in histories), default=1))
    index = np.zeros((len(histories), width), dtype=np.int64)
    mask = np.zeros((len(histories), width), dtype=np.float32)
    for u, history in enumerate(histories):
        known = [row[i] for i in history if i in row]
        index[u, : len(known)], mask[u, : len(known)] = known, 1.0
    users = pool_history(torch.from_numpy(vectors[index]), torch.from_numpy(mask)).numpy()
    return users @ vectors[: len(item_ids)].T


def evaluate_recommendation(
    model: RankingModel,
    batcher: Batcher,
    test: pl.DataFrame,
    ks: list[int],
    batch_size: int,
    n_negatives: int,
    max_groups: int | None = None,
    full: bool = True,
) -> dict:
    """The model's metrics on (up to ``max_groups`` users of) ``test``: full ranking over
    the catalog when ``full``, else only the sampled protocol (encodes just the items it
    needs, for cheap evaluation during training)."""
    test = test.head(max_groups) if max_groups else test
    negatives = draw_negatives(test, batcher.catalog_ids, n_negatives)
    items = (
        batcher.catalog_ids
        if full
        else sorted(set(test["item_id"].to_list()) | {i for n in negatives for i in n})
    )
    if "label" in test.columns:  # impressions: every row's own item must be scored
        items = list(dict.fromkeys([*items, *test["item_id"].to_list()]))
    scores = user_item_scores(model, batcher, test, items, batch_size)
    scale = float(model.scale().detach().float().reshape(-1)[0])
    return recommendation_report(scores, items, test, negatives, ks, full, scale)


def cold_start_rows(splits: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """The test rows whose true item never appears in the training split (as a target or
    in a history)."""
    train = splits["train"]
    seen = pl.concat([train["item_id"], train["history"].explode()]).drop_nulls().unique()
    return splits["test"].filter(~pl.col("item_id").is_in(seen.implode()))


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
    if "label" in train.columns:  # impressions: popularity is clicks, not exposures
        train = train.filter(pl.col("label") > 0)
    counts = pl.concat([train["item_id"], train["history"].explode()]).value_counts()
    popularity = np.zeros(len(ids))
    for item, count in counts.iter_rows():
        if item in index:
            popularity[index[item]] = count
    # tiny jitter breaks ties between equally popular items deterministically; every user
    # gets the same row (a read-only view, not users x items copies)
    pop_scores = np.broadcast_to(
        popularity + np.linspace(0, 1e-6, len(ids)), (test.height, len(ids))
    )
    negatives = draw_negatives(test, ids, n_negatives)
    return {
        "popularity": recommendation_report(pop_scores, ids, test, negatives, ks, True),
        "zero-shot": recommendation_report(
            user_item_scores(zero_shot, batcher, test, ids, batch_size),
            ids,
            test,
            negatives,
            ks,
            True,
        ),
    }
