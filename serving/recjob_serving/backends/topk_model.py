"""Triton Python-backend model: a user's history (item ids) -> the top-k of the whole
catalog for a RecJob sequential recommender, or a ranking of given candidates.

``recjob-serve convert`` copies this file into the model repository as
``<model>-topk/<version>/model.py``. It reads the user tower's version folder
(``<model>/<version>/``: ``item_vectors.npy``, row n the vector of ``item_ids.json``[n],
whose history index is n + 1, and ``recjob.json``), asks the user tower ``<model>`` for
the user's vector through Triton's BLS (``pb_utils.InferenceRequest(...).exec()``; in
``recjob-serve serve`` the same call runs the loaded ONNX model) and scores with dot
products. It is written for Triton's Python backend (with numpy, and faiss-cpu for large
catalogs; not run in a real Triton here) and runs in ``recjob-serve serve``.

Inputs (batch first; BYTES rows shorter than the batch's widest are padded with ``""``):

- ``history`` BYTES [-1]: the user's item ids, oldest first. Unknown ids are skipped and
  returned in ``unknown_items``; of the known ones the most recent ``max_history`` of the
  model (its training window) make the user. A user without history: ``[""]``.
- ``k`` INT32 [1] (optional, default 10; one value for the whole batch): how many items.
- ``exclude_history`` BOOL [1] (optional): leave the history's items out of the answer.
  Default true for the catalog top-k, false for given candidates (send false / true to
  change it).
- ``candidates`` BYTES [-1] (optional): rank only these items (unknown ones reported),
  the top ``k`` of them (default: all).

Outputs: ``item_ids`` BYTES [-1] and ``scores`` FP32 [-1] (best first; a row with fewer
items than the widest row is padded with ``""`` and the lowest float32), and
``unknown_items`` BYTES [-1] (the request's ids the catalog lacks, ``""``-padded; width 0
when there are none).

Search (config parameters): catalogs of at most ``exact_max_items`` items (default
200,000) are ranked exactly (one matrix product, then ``argpartition``); larger ones with
a faiss index built once at load (``index``: ``ivf``, an inverted file of flat
inner-product lists, ``ivf_nlist`` lists (default sqrt(items)) of which ``ivf_nprobe``
are searched (default nlist / 16): recall vs exact search measured in
``bench/topk_latency.py``; or ``hnsw``, slower to build). History items are excluded from
a faiss answer by fetching ``k`` + (history items) and filtering; a row left with fewer
than ``k`` is ranked exactly instead. ``search: exact`` or ``faiss`` forces one.

Limits (config parameters, lowered by ``recjob-serve serve --max-k / --max-history``):
``max_k`` (default 1000), ``max_history`` ids per history row (default 1000) and
``max_candidates`` per row (default 10000); over them a request gets an error (400).
"""

import json
import math
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils

DEFAULT_K = 10
DEFAULTS = {
    "max_k": "1000",
    "max_history": "1000",
    "max_candidates": "10000",
    "exact_max_items": "200000",
    "search": "auto",
    "index": "ivf",
    "ivf_nlist": "0",
    "ivf_nprobe": "0",
    "hnsw_m": "32",
    "hnsw_ef_search": "128",
}
#: Score given to padding entries of a row shorter than the batch's widest.
PAD_SCORE = float(np.finfo(np.float32).min)


class RequestError(ValueError):
    """The request cannot be answered as sent (an error response, HTTP 400)."""


class CatalogSearch:
    """Top-k inner-product search over ``vectors`` (items x hidden, float32): exact, or
    through a faiss index built here (``method``: ``exact``, ``ivf`` or ``hnsw``)."""

    def __init__(self, vectors, method="exact", nlist=0, nprobe=0, hnsw_m=32, ef_search=128):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.method, self.index = method, None
        items, dim = self.vectors.shape
        started = time.perf_counter()
        if method == "ivf":
            import faiss

            self.nlist = nlist or max(1, min(round(math.sqrt(items)), items // 39 or 1))
            self.nprobe = nprobe or max(1, self.nlist // 16)
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
            sample = min(items, 64 * self.nlist)
            rows = np.random.default_rng(0).choice(items, size=sample, replace=False)
            index.train(self.vectors[np.sort(rows)])
            index.add(self.vectors)
            index.nprobe = self.nprobe
            self.index = index
        elif method == "hnsw":
            import faiss

            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = ef_search
            index.add(self.vectors)
            self.index = index
        elif method != "exact":
            raise ValueError(f"unknown search method {method!r} (exact, ivf or hnsw)")
        self.build_seconds = time.perf_counter() - started

    def describe(self) -> dict:
        """What this search is (for logs and benchmarks)."""
        out = {"method": self.method, "items": len(self.vectors)}
        if self.method == "ivf":
            out.update(nlist=self.nlist, nprobe=self.nprobe)
        return {**out, "build_seconds": round(self.build_seconds, 3)}

    def exact(self, user, k, excluded):
        """(rows, scores) of the ``k`` best items for one user vector, ``excluded`` rows
        left out."""
        scores = self.vectors @ user
        if len(excluded):
            scores[excluded] = -np.inf
        kk = min(k, len(scores) - len(excluded))
        if kk <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        top = np.argpartition(-scores, kk - 1)[:kk]
        top = top[np.argsort(-scores[top], kind="stable")]
        return top, scores[top]

    def top(self, users, k, excluded):
        """Per user: (rows, scores) of its ``k`` best items, its ``excluded`` rows (an
        array of unique rows per user) left out."""
        if self.index is None:
            return [self.exact(u, k, e) for u, e in zip(users, excluded, strict=True)]
        fetch = min(len(self.vectors), k + max(len(e) for e in excluded))
        distances, rows = self.index.search(np.ascontiguousarray(users, np.float32), fetch)
        out = []
        for user, drop, found, score in zip(users, excluded, rows, distances, strict=True):
            keep = (found >= 0) & ~np.isin(found, drop)
            found, score = found[keep][:k], score[keep][:k]
            if len(found) < min(k, len(self.vectors) - len(drop)):
                found, score = self.exact(user, k, drop)  # too few survived the filter
            out.append((found, score))
        return out


def _strings(tensor, name):
    """A [batch, n] BYTES tensor -> rows of non-empty strings (RequestError on bad UTF-8)."""
    rows = []
    for row in tensor.as_numpy().reshape(tensor.as_numpy().shape[0], -1):
        values = []
        for value in row:
            try:
                text = value.decode() if isinstance(value, bytes) else str(value)
            except UnicodeDecodeError:
                raise RequestError(f"{name}: an item id is not UTF-8") from None
            if text:
                values.append(text)
        rows.append(values)
    return rows


def _padded(rows, fill, dtype):
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), fill, dtype=dtype)
    for n, row in enumerate(rows):
        out[n, : len(row)] = row
    return out


class TritonPythonModel:
    """Top-k of the catalog (or of given candidates) for each user's history."""

    def initialize(self, args):
        """Load the item ids and vectors beside the user tower's version and build the
        search (faiss index for large catalogs)."""
        config = json.loads(args["model_config"])
        given = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        p = {**DEFAULTS, **given}
        self.tower = p["user_tower"]
        self.max_k, self.max_history = int(p["max_k"]), int(p["max_history"])
        self.max_candidates = int(p["max_candidates"])
        folder = os.path.join(
            os.path.dirname(os.path.abspath(args["model_repository"])),
            self.tower,
            args["model_version"],
        )
        with open(os.path.join(folder, "recjob.json"), encoding="utf-8") as f:
            card = json.load(f)
        self.window = int(card["max_history"])  # the model's history window
        with open(
            os.path.join(folder, card.get("item_ids", "item_ids.json")), encoding="utf-8"
        ) as f:
            self.ids = [str(i) for i in json.load(f)]
        vectors = np.load(
            os.path.join(folder, card.get("item_vectors", "item_vectors.npy")), allow_pickle=False
        )
        if vectors.shape[0] != len(self.ids):
            raise ValueError(f"{len(self.ids)} item ids but {vectors.shape[0]} item vectors")
        self.row = {item: n for n, item in enumerate(self.ids)}
        method = p["search"]
        if method == "auto":
            method = "exact" if len(self.ids) <= int(p["exact_max_items"]) else "faiss"
        if method == "faiss":
            method = p["index"]
        self.search = CatalogSearch(
            vectors,
            method,
            nlist=int(p["ivf_nlist"]),
            nprobe=int(p["ivf_nprobe"]),
            hnsw_m=int(p["hnsw_m"]),
            ef_search=int(p["hnsw_ef_search"]),
        )
        print(f"{config['name']}: {json.dumps(self.search.describe())}", flush=True)

    # ------------------------------------------------------------------ one request
    def _optional(self, request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy().reshape(-1)

    def _users(self, histories):
        """User vectors of the known history rows (BLS call to the user tower)."""
        indices = [[self.row[i] + 1 for i in h if i in self.row][-self.window :] for h in histories]
        batch = np.zeros((len(indices), max(1, max(len(r) for r in indices))), dtype=np.int64)
        for n, row in enumerate(indices):
            if row:
                batch[n, batch.shape[1] - len(row) :] = row
        response = pb_utils.InferenceRequest(
            model_name=self.tower,
            requested_output_names=["user_vector"],
            inputs=[pb_utils.Tensor("history", batch)],
        ).exec()
        if response.has_error():
            raise RuntimeError(f"user tower {self.tower}: {response.error().message()}")
        users = pb_utils.get_output_tensor_by_name(response, "user_vector").as_numpy()
        return users.astype(np.float32)

    def _answer(self, request):
        histories = _strings(pb_utils.get_input_tensor_by_name(request, "history"), "history")
        for row in histories:
            if len(row) > self.max_history:
                raise RequestError(
                    f"history has {len(row)} items, over the limit of {self.max_history} "
                    "(send the most recent ones)"
                )
        k_values = self._optional(request, "k")
        if k_values is not None and len(set(k_values.tolist())) > 1:
            raise RequestError(f"k must be the same for every row of a batch, got {k_values}")
        k = int(k_values[0]) if k_values is not None else None
        if k is not None and not 1 <= k <= self.max_k:
            raise RequestError(f"k must be between 1 and {self.max_k}, got {k}")
        tensor = pb_utils.get_input_tensor_by_name(request, "candidates")
        candidates = None if tensor is None else _strings(tensor, "candidates")
        flags = self._optional(request, "exclude_history")
        exclude = [candidates is None] * len(histories) if flags is None else flags.tolist()
        unknown = [list(dict.fromkeys(i for i in h if i not in self.row)) for h in histories]
        users = self._users(histories)
        excluded = [
            np.unique(np.array([self.row[i] for i in h if i in self.row], dtype=np.int64))
            if drop
            else np.zeros(0, dtype=np.int64)
            for h, drop in zip(histories, exclude, strict=True)
        ]
        if candidates is None:
            found = self.search.top(users, k or DEFAULT_K, excluded)
        else:
            found = []
            for n, (user, row) in enumerate(zip(users, candidates, strict=True)):
                if len(row) > self.max_candidates:
                    raise RequestError(
                        f"{len(row)} candidates, over the limit of {self.max_candidates}"
                    )
                unknown[n] += [i for i in dict.fromkeys(row) if i not in self.row]
                rows = np.array([self.row[i] for i in row if i in self.row], dtype=np.int64)
                rows = rows[~np.isin(rows, excluded[n])]
                scores = self.search.vectors[rows] @ user
                order = np.argsort(-scores, kind="stable")[: k or len(rows)]
                found.append((rows[order], scores[order]))
        items = [[self.ids[r] for r in rows] for rows, _ in found]
        return [
            pb_utils.Tensor("item_ids", _padded(items, "", np.object_)),
            pb_utils.Tensor(
                "scores", _padded([s.tolist() for _, s in found], PAD_SCORE, np.float32)
            ),
            pb_utils.Tensor("unknown_items", _padded(unknown, "", np.object_)),
        ]

    def execute(self, requests):
        """One response per request; a bad request gets an error response, not a crash."""
        responses = []
        for request in requests:
            try:
                outputs = self._answer(request)
            except RequestError as error:
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(str(error))
                    )
                )
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
