"""Held-out evaluation of a model and of the baselines, on the same rows.

search-ranking: per-query ranking metrics with graded gains (grade - lowest grade), RMSE
of predicted grades, AUC / precision / recall / F1 / calibration of "relevant" (grade above
the middle of the scale). Baselines: BM25, the zero-shot pretrained model (cosine of
mean-pooled embeddings) — both calibrated to grades by least squares on the validation
split for RMSE — and the constant train-mean grade.

recommendation: the true next item ranked against the whole catalog (full ranking),
against sampled negatives and, with spec.data.candidates, among its given candidate list
(candidates/...). Baselines: popularity and the zero-shot pretrained model.

During training, :func:`validation_metric` is the early-stopping metric on (a capped
part of) the validation split.

Cost: every encoding pass (:func:`_batched`) encodes each distinct text or pair once, in
batches of similar length (less padding); within :func:`evaluating` it reports
``evaluate`` progress events with an ETA and, with ``spread`` (validation, every rank on
the same rows), each rank encodes a share and the ranks all-gather the results. Ranking
a user's true item against the whole catalog or its sampled negatives is array
arithmetic over all users at once, in row chunks.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch
import torch.distributed as dist

from recjob_operator.api.model_input import history_text

from . import metrics as m
from .batches import Batcher
from .models import RankingModel, pool_history
from .sequence_data import sequence_scores

if TYPE_CHECKING:  # annotations only: serving's quality gate imports this module too
    from .config import TrainerConfig
    from .data.prepared import PreparedData

#: Key of the per-query / per-user NDCG@10 values in a report (for paired comparisons;
#: removed before metrics are written).
PER_UNIT = "_ndcg@10_per_unit"


def compare_to_baselines(model: dict, baselines: dict) -> dict[str, dict[str, float]]:
    """Paired bootstrap of the model's NDCG@10 against each baseline on the same queries
    or users; strips the per-unit values from every report."""
    out = {}
    ours = model.pop(PER_UNIT, None)
    for name, report in baselines.items():
        theirs = report.pop(PER_UNIT, None)
        if ours is not None and theirs is not None and len(ours) == len(theirs):
            out[name] = m.paired_bootstrap(ours, theirs)
    return out


def _groups(frame: pl.DataFrame, key: str, max_groups: int | None) -> pl.DataFrame:
    if max_groups is None:
        return frame
    keys = frame.select(pl.col(key).unique(maintain_order=True)).to_series()[:max_groups]
    return frame.filter(pl.col(key).is_in(keys.to_list()))


@dataclass
class _Evaluation:
    phase: str
    emit: Callable[..., None] | None
    spread: bool
    interval: float
    passes: int = 0
    vectors: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    """model -> {(batcher id, text): unit vector}: what this evaluation already encoded."""


_EVALUATION: ContextVar[_Evaluation | None] = ContextVar("recjob_evaluation", default=None)


@contextmanager
def evaluating(
    phase: str,
    emit: Callable[..., None] | None = None,
    *,
    spread: bool = False,
    interval: float = 10.0,
) -> Iterator[None]:
    """Within: every encoding pass reports ``emit("evaluate", phase=..., done=..., total=...,
    unit=..., elapsed_seconds=..., eta_seconds=...)`` every ``interval`` seconds and when
    it ends; a model's text vectors are kept, so a later pass (the cold-start rows, a
    baseline on another split) encodes only texts it has not seen; with ``spread`` (only
    where every rank of the process group evaluates the same rows, as validation does)
    the ranks share the encoding and all-gather it. The model must not change within."""
    token = _EVALUATION.set(_Evaluation(phase, emit, spread, interval))
    try:
        yield
    finally:
        _EVALUATION.reset(token)


def report_evaluation(phase: str, emit: Callable[..., None], interval: float = 10.0) -> None:
    """As :func:`evaluating` (without sharing) for the rest of this context: the end of
    a run, where rank 0 evaluates alone until the process exits."""
    _EVALUATION.set(_Evaluation(phase, emit, False, interval))


def _characters(items: list) -> list[int]:
    return [sum(map(len, i)) if isinstance(i, tuple) else len(i) for i in items]


def _token_lengths(batcher: Batcher, items: list) -> list[int]:
    """Tokens each text (or query-item pair) will take (characters where the batcher
    has no tokenizer): what orders them into batches of similar length."""
    tokenizer = getattr(batcher, "tokenizer", None)
    if tokenizer is None or not items:
        return _characters(items)
    pairs = isinstance(items[0], tuple)
    left = [i[0] for i in items] if pairs else items
    right = [i[1] for i in items] if pairs else None
    encoded = tokenizer(left, right, truncation=True, max_length=batcher.max_length)
    return [len(ids) for ids in encoded["input_ids"]]


@torch.no_grad()
def _batched(fn, items: list, batch_size: int, unit: str = "texts", lengths=None) -> np.ndarray:
    """``fn`` (a model forward over a list of items) over ``items``, as one array in the
    items' order. Each distinct item is computed once, batched with items of similar
    length (``lengths(distinct items)``, default characters); see :func:`evaluating` for
    progress and sharing the work between ranks.

    Shared, every rank runs the same number of forwards (a rank out of work runs one on
    a single item: ZeRO-3 gathers parameters collectively in each forward), then the
    ranks exchange their rows with one all_gather."""
    if not items:
        return np.zeros(0)
    unique = list(dict.fromkeys(items))
    size = (lengths or _characters)(unique)
    order = sorted(range(len(unique)), key=size.__getitem__)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    context = _EVALUATION.get()
    shared = context is not None and context.spread and dist.is_initialized()
    world = dist.get_world_size() if shared else 1
    rank = dist.get_rank() if shared else 0
    rounds = -(-len(batches) // world)
    started = last = time.time()
    if context is not None:
        context.passes += 1
    local, done, total = [], 0, len(unique)
    for n in range(rounds):
        if n * world + rank < len(batches):
            local.append(fn([unique[i] for i in batches[n * world + rank]]).float().cpu())
        else:  # out of work: join the collective forwards with a throwaway one
            shape = fn([unique[order[0]]]).float().cpu().shape[1:]
        done += sum(len(b) for b in batches[n * world : (n + 1) * world])  # all ranks'
        if context is not None and context.emit is not None:
            now = time.time()
            if done == total or now - last >= context.interval:
                elapsed, last = now - started, now
                eta = elapsed / done * (total - done)
                context.emit(
                    "evaluate",
                    phase=f"{context.phase}, pass {context.passes}",
                    done=done,
                    total=total,
                    unit=unit,
                    elapsed_seconds=round(elapsed, 1),
                    eta_seconds=round(eta, 1),
                )
    if local:
        shape = local[0].shape[1:]
    rows = torch.cat(local) if local else torch.zeros((0, *shape))
    if world == 1:
        values = rows.numpy()
        placed = [i for b in batches for i in b]
    else:
        counts = [sum(len(b) for b in batches[r::world]) for r in range(world)]
        padded = torch.zeros((max(counts), *shape))
        padded[: len(rows)] = rows
        if dist.get_backend() == "nccl":
            padded = padded.cuda()
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        values = torch.cat([g[:c].cpu() for g, c in zip(gathered, counts, strict=True)]).numpy()
        placed = [i for r in range(world) for b in batches[r::world] for i in b]
    out = np.empty_like(values)
    out[placed] = values
    position = {item: n for n, item in enumerate(unique)}
    return out[[position[item] for item in items]]


def cross_encoder_logits(
    model: RankingModel, batcher: Batcher, frame: pl.DataFrame, batch_size: int
) -> np.ndarray:
    """Logit of every (query, item) row."""
    pairs = list(zip(frame["query"].to_list(), frame["item_text"].to_list(), strict=True))
    device = next(model.parameters()).device

    def fn(chunk):
        batch = batcher.pairs([q for q, _ in chunk], [t for _, t in chunk])
        return model.score_pairs(**{k: v.to(device) for k, v in batch.items()})

    return _batched(fn, pairs, batch_size, "pairs", lambda p: _token_lengths(batcher, p))


def text_vectors(
    model: RankingModel, batcher: Batcher, texts: list[str], batch_size: int
) -> np.ndarray:
    """Unit embeddings of texts (bi-encoder, or the zero-shot pretrained encoder); within
    :func:`evaluating`, each text is encoded once per model for the whole evaluation."""
    device = next(model.parameters()).device

    def fn(chunk):
        batch = batcher.texts_batch(chunk, "")
        return model.item_vectors(batch["input_ids"].to(device), batch["attention_mask"].to(device))

    def lengths(chunk):
        return _token_lengths(batcher, chunk)

    context = _EVALUATION.get()
    if context is None or not texts:
        return _batched(fn, texts, batch_size, "texts", lengths)
    known = context.vectors.setdefault(model, {})
    key = id(batcher)
    missing = [t for t in dict.fromkeys(texts) if (key, t) not in known]
    if missing:
        vectors = _batched(fn, missing, batch_size, "texts", lengths)
        known.update(zip([(key, t) for t in missing], vectors, strict=True))
    return np.stack([known[key, t] for t in texts])


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


# --------------------------------------------------------------------------- recommendation
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
