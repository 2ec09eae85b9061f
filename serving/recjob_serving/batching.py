"""Triton's dynamic batcher for ``recjob-serve serve``, with length-aware batches.

A model whose ``config.pbtxt`` declares ``dynamic_batching`` gets a :class:`DynamicBatcher`:
requests wait in one queue per model and are run together, as Triton's scheduler does:

- a batch is formed only when one of the model's ``instance_group`` instances is free, so
  while every instance is busy the queue grows and the next batch is bigger;
- it is sent at once when it reaches ``max_batch_size`` or, where
  ``preferred_batch_size`` is declared, the largest preferred size the queue can fill;
  otherwise the batcher waits for more requests until the oldest has waited
  ``max_queue_delay_microseconds``, then sends what it has;
- a request is never split, and the oldest request is always in the next batch.

Length-aware (beyond Triton, which batches only requests of one shape unless ragged
batching is configured): token models (those with an ``attention_mask`` input) take
requests of different sequence lengths in one batch, every 2-D input padded with 0 on the
right to the longest row of *that batch*, never to the model's maximum; the attention mask
keeps padding out of every real token's result. The oldest request is joined by the queued
requests nearest to it in length, and only while the batch's padded tokens stay within
``PADDING_BUDGET`` times its real ones: on CPU a transformer's cost grows with the tokens
it runs, padding included, while batching rows of one length gains little (measured for
the int8 MiniLM cross-encoder in bench/serving.py), so a short query is not padded to a
long title when the queue offers a choice; the others go in the next batch. Other models
batch only requests of one shape.

A Python-backend model's batch is not merged: as in Triton, its ``execute`` gets the list of
requests and answers each (``merge_requests`` False); one request's error is that
request's alone.

Queue time and batch size are exported per model (``recjob_batch_queue_seconds``,
``recjob_batch_size``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Histogram

#: Labels of the batching series (as the server's inference series).
LABELS = ["model", "version", "revision"]
QUEUE_SECONDS = Histogram(
    "recjob_batch_queue_seconds",
    "Time a request waited in its model's dynamic-batching queue",
    LABELS,
    buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
BATCH_SIZE = Histogram(
    "recjob_batch_size",
    "Rows in each batch a model executed (dynamic batching)",
    LABELS,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)

Tensors = dict[str, np.ndarray]

#: Padded tokens a length-aware batch may run per real token (see the module docstring).
PADDING_BUDGET = 1.25


@dataclass(frozen=True)
class BatchingPolicy:
    """What a model's ``config.pbtxt`` says about batching."""

    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_s: float = 0.0
    instances: int = 1
    pad_to_longest: bool = False
    merge_requests: bool = True

    @classmethod
    def from_config(cls, config) -> BatchingPolicy | None:
        """The policy of a parsed ``ModelConfig``; None when it declares no
        ``dynamic_batching`` (or cannot batch: ``max_batch_size`` 0 or 1)."""
        if not config.HasField("dynamic_batching") or int(config.max_batch_size) <= 1:
            return None
        batching = config.dynamic_batching
        maximum = int(config.max_batch_size)
        inputs = {i.name for i in config.input}
        outputs_fixed = all(all(int(d) > 0 for d in o.dims) for o in config.output)
        python = config.backend == "python"
        return cls(
            max_batch_size=maximum,
            preferred_batch_sizes=tuple(
                sorted(int(s) for s in batching.preferred_batch_size if 0 < int(s) <= maximum)
            ),
            max_queue_delay_s=int(batching.max_queue_delay_microseconds) / 1e6,
            instances=sum(int(g.count) for g in config.instance_group) or 1,
            # right padding is exact only where a mask says which tokens are real, and
            # outputs must not have a length axis to cut back
            pad_to_longest="attention_mask" in inputs and outputs_fixed and not python,
            merge_requests=not python,
        )


@dataclass
class _Pending:
    tensors: Tensors
    rows: int
    length: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


def _rows(tensors: Tensors) -> int:
    return int(next(iter(tensors.values())).shape[0])


def _length(tensors: Tensors) -> int:
    return max((int(v.shape[1]) for v in tensors.values() if v.ndim >= 2), default=0)


def _shape_key(tensors: Tensors) -> tuple:
    return tuple(sorted((name, value.shape[1:]) for name, value in tensors.items()))


def merge(requests: list[Tensors], pad_to_longest: bool) -> Tensors:
    """One batch of ``requests`` (same input names): concatenated on the batch axis, 2-D
    inputs right-padded with 0 to the longest row when ``pad_to_longest``."""
    names = requests[0].keys()
    merged = {}
    for name in names:
        values = [r[name] for r in requests]
        if pad_to_longest and values[0].ndim == 2:
            longest = max(v.shape[1] for v in values)
            values = [
                v if v.shape[1] == longest else np.pad(v, ((0, 0), (0, longest - v.shape[1])))
                for v in values
            ]
        merged[name] = np.concatenate(values) if len(values) > 1 else values[0]
    return merged


def split(outputs: Tensors, rows: list[int]) -> list[Tensors]:
    """Each request's rows of a batch's ``outputs``, in order."""
    bounds = np.cumsum([0, *rows])
    return [
        {name: value[start:end] for name, value in outputs.items()}
        for start, end in itertools.pairwise(bounds)
    ]


class DynamicBatcher:
    """One model's queue and scheduler; ``run`` executes a merged batch (in a thread), or
    with ``merge_requests`` False the list of requests, answering each with its outputs
    or an exception."""

    def __init__(self, policy: BatchingPolicy, run: Callable, labels: dict) -> None:
        self.policy, self._run = policy, run
        self._queue: list[_Pending] = []
        self._wake: asyncio.Event | None = None
        self._free: asyncio.Semaphore | None = None
        self._scheduler: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(policy.instances, thread_name_prefix="batch")
        self._queue_seconds = QUEUE_SECONDS.labels(**labels)
        self._batch_size = BATCH_SIZE.labels(**labels)

    async def submit(self, tensors: Tensors) -> Tensors:
        """Queue one checked request; its outputs once its batch has run."""
        if self._scheduler is None or self._scheduler.done():
            self._wake, self._free = asyncio.Event(), asyncio.Semaphore(self.policy.instances)
            self._scheduler = asyncio.get_running_loop().create_task(self._schedule())
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(tensors, _rows(tensors), _length(tensors), future))
        self._wake.set()
        return await future

    def close(self) -> None:
        """Stop the scheduler and the instance threads."""
        if self._scheduler is not None:
            self._scheduler.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _drop_cancelled(self) -> None:
        self._queue = [p for p in self._queue if not p.future.done()]

    def _queued_rows(self) -> int:
        return sum(p.rows for p in self._queue)

    def _ready(self) -> bool:
        """Whether a batch should go now without waiting for more requests."""
        rows, policy = self._queued_rows(), self.policy
        if rows >= policy.max_batch_size:
            return True
        if policy.preferred_batch_sizes and rows >= policy.preferred_batch_sizes[0]:
            return True
        return time.perf_counter() >= self._queue[0].arrived + policy.max_queue_delay_s

    async def _wait_for_batch(self) -> None:
        while True:
            self._drop_cancelled()
            if self._queue and self._ready():
                return
            self._wake.clear()
            if not self._queue:
                await self._wake.wait()
                continue
            remaining = self._queue[0].arrived + self.policy.max_queue_delay_s
            try:
                await asyncio.wait_for(self._wake.wait(), max(remaining - time.perf_counter(), 0))
            except TimeoutError:
                return

    def _take(self) -> list[_Pending]:
        """The next batch: the oldest request, then the queued ones that fit, nearest in
        length first (within the padding budget when padding, else the oldest's shape
        only)."""
        policy = self.policy
        oldest, rest = self._queue[0], self._queue[1:]
        if not policy.merge_requests:
            candidates = rest
        elif policy.pad_to_longest:
            candidates = sorted(rest, key=lambda p: (abs(p.length - oldest.length), p.arrived))
        else:
            key = _shape_key(oldest.tensors)
            candidates = [p for p in rest if _shape_key(p.tensors) == key]
        limit = policy.max_batch_size
        if policy.preferred_batch_sizes:
            fill = oldest.rows + sum(p.rows for p in candidates)
            fitting = [s for s in policy.preferred_batch_sizes if s <= min(fill, limit)]
            if fitting:
                limit = fitting[-1]
        batch, rows = [oldest], oldest.rows
        longest, tokens = oldest.length, oldest.rows * oldest.length
        for pending in candidates:
            if rows + pending.rows > limit:
                continue
            if policy.pad_to_longest:
                padded = (rows + pending.rows) * max(longest, pending.length)
                if padded > PADDING_BUDGET * (tokens + pending.rows * pending.length):
                    continue
                longest = max(longest, pending.length)
                tokens += pending.rows * pending.length
            batch.append(pending)
            rows += pending.rows
        taken = {id(p) for p in batch}
        self._queue = [p for p in self._queue if id(p) not in taken]
        return batch

    async def _schedule(self) -> None:
        while True:
            await self._free.acquire()  # an instance is free: form its batch
            try:
                await self._wait_for_batch()
                batch = self._take()
            except BaseException:
                self._free.release()
                raise
            asyncio.get_running_loop().create_task(self._execute(batch))

    async def _execute(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        for pending in batch:
            self._queue_seconds.observe(started - pending.arrived)
        rows = [p.rows for p in batch]
        self._batch_size.observe(sum(rows))
        loop = asyncio.get_running_loop()
        try:
            if self.policy.merge_requests:
                merged = merge([p.tensors for p in batch], self.policy.pad_to_longest)
                outputs = await loop.run_in_executor(self._executor, self._run, merged)
                results = split(outputs, rows)
            else:
                requests = [p.tensors for p in batch]
                results = await loop.run_in_executor(self._executor, self._run, requests)
        except Exception as error:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
        else:
            for pending, result in zip(batch, results, strict=True):
                if pending.future.done():
                    continue
                if isinstance(result, Exception):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
        finally:
            self._free.release()
            self._wake.set()
