"""Dynamic batching (``recjob_serving.batching``): the scheduler on its own, with a
recording model. The real server batching concurrent requests of different lengths is
tested in test_server.py (test_dynamic_batching_...)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import replace

import numpy as np

from recjob_serving.batching import BatchingPolicy, DynamicBatcher, merge, split
from recjob_serving.repository import parse_config

CONFIG = """
name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },
        { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] } ]
output [ { name: "score" data_type: TYPE_FP32 dims: [ 1 ] } ]
dynamic_batching { preferred_batch_size: [ 4, 8, 32 ] max_queue_delay_microseconds: 1500 }
instance_group [ { count: 2 kind: KIND_CPU } ]
"""


def test_policy_is_read_from_the_config() -> None:
    policy = BatchingPolicy.from_config(parse_config(CONFIG))
    # 32 is over max_batch_size: Triton would refuse the config; it is ignored here
    assert policy == BatchingPolicy(16, (4, 8), 0.0015, 2, pad_to_longest=True)
    without = parse_config(re.sub(r"dynamic_batching .*\n", "", CONFIG))
    assert BatchingPolicy.from_config(without) is None
    no_mask = parse_config(CONFIG.replace("attention_mask", "token_type_ids"))
    assert BatchingPolicy.from_config(no_mask).pad_to_longest is False  # same shape only
    unbatched = parse_config(CONFIG.replace("max_batch_size: 16", "max_batch_size: 1"))
    assert BatchingPolicy.from_config(unbatched) is None


def test_merge_pads_each_batch_to_its_longest_row_and_split_undoes_it() -> None:
    short = {"input_ids": np.array([[5, 6]]), "attention_mask": np.array([[1, 1]])}
    long = {"input_ids": np.array([[7, 8, 9], [1, 2, 3]]), "attention_mask": np.ones((2, 3), int)}
    merged = merge([short, long], pad_to_longest=True)
    assert merged["input_ids"].tolist() == [[5, 6, 0], [7, 8, 9], [1, 2, 3]]
    assert merged["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 1]]
    parts = split({"score": np.array([[0.1], [0.2], [0.3]])}, [1, 2])
    assert [p["score"].ravel().tolist() for p in parts] == [[0.1], [0.2, 0.3]]


class Recorder:
    """A model that sums each row's ids (so every request can check its own answer) and
    records the batches it ran; ``gate`` holds a run until released."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.batches: list[list[int]] = []  # the row sums of each batch
        self.lengths: list[int] = []
        self.seconds = seconds
        self.fail = False

    def __call__(self, tensors: dict) -> dict:
        ids = tensors["input_ids"]
        self.batches.append(ids.sum(axis=1).tolist())
        self.lengths.append(ids.shape[1])
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("model failed")
        return {"score": ids.sum(axis=1, keepdims=True).astype(np.float32)}


def request(value: int, length: int = 3) -> dict:
    ids = np.zeros((1, length), dtype=np.int64)
    ids[0, 0] = value
    return {"input_ids": ids, "attention_mask": np.ones((1, length), dtype=np.int64)}


def batcher(model: Recorder, **policy) -> DynamicBatcher:
    settings = {"max_batch_size": 8, "pad_to_longest": True, **policy}
    return DynamicBatcher(
        BatchingPolicy(**settings), model, {"model": "m", "version": "1", "revision": ""}
    )


async def _gather(
    queue: DynamicBatcher, values: list[int], spacing: float = 0.0, lengths=None, after_first=0.0
):
    """Submit ``values`` as requests, the i-th after ``spacing`` x i seconds (the others
    ``after_first`` seconds after the first, when given, so the first one is running)."""

    async def one(i: int, value: int):
        await asyncio.sleep(spacing * i + (after_first if i else 0.0))
        return await queue.submit(request(value, lengths[i] if lengths else 3))

    return await asyncio.gather(*(one(i, v) for i, v in enumerate(values)))


def test_requests_queued_behind_a_busy_instance_run_as_one_batch() -> None:
    model = Recorder(seconds=0.05)
    queue = batcher(model, max_queue_delay_s=0.0)
    results = asyncio.run(_gather(queue, [1, 2, 3, 4, 5], after_first=0.01))
    queue.close()
    # each request gets its own row back
    assert [r["score"].ravel().tolist() for r in results] == [[1], [2], [3], [4], [5]]
    # the first ran alone at once (no delay, an instance free); the rest waited for it
    assert model.batches == [[1], [2, 3, 4, 5]]


def test_max_queue_delay_waits_for_more_requests_and_max_batch_size_caps_a_batch() -> None:
    model = Recorder()
    queue = batcher(model, max_queue_delay_s=0.5, max_batch_size=3)
    asyncio.run(_gather(queue, [1, 2, 3, 4], spacing=0.01))
    queue.close()
    # the first three arrived within the delay and filled the batch; the fourth ran on
    # its own once its own delay was over
    assert model.batches == [[1, 2, 3], [4]]


def test_a_preferred_batch_size_is_sent_without_waiting_for_the_delay() -> None:
    model = Recorder()
    queue = batcher(model, max_queue_delay_s=30.0, preferred_batch_sizes=(2,), max_batch_size=4)
    started = time.perf_counter()
    asyncio.run(_gather(queue, [1, 2], spacing=0.01))
    queue.close()
    assert model.batches == [[1, 2]]
    assert time.perf_counter() - started < 10  # far less than the 30 s delay


def test_rows_nearest_in_length_to_the_oldest_join_its_batch() -> None:
    model = Recorder(seconds=0.05)
    queue = batcher(model, max_queue_delay_s=0.0, max_batch_size=2)
    lengths = [4, 40, 5, 38, 6]
    asyncio.run(_gather(queue, [1, 2, 3, 4, 5], lengths=lengths, after_first=0.01))
    queue.close()
    # 1 ran alone; then the oldest (2, length 40) took 4 (length 38); then 3 and 5
    assert model.batches == [[1], [2, 4], [3, 5]]
    assert model.lengths == [4, 40, 6]  # each batch padded to its own longest row


def test_a_batch_stays_within_the_padding_budget() -> None:
    model = Recorder(seconds=0.05)
    queue = batcher(model, max_queue_delay_s=0.0, max_batch_size=8)
    lengths = [4, 10, 40, 12, 11, 36]
    asyncio.run(_gather(queue, [1, 2, 3, 4, 5, 6], lengths=lengths, after_first=0.01))
    queue.close()
    # room for all five queued rows, but padding 10-12 to 40 would more than double the
    # tokens run: the short ones go together, the long ones next
    assert model.batches == [[1], [2, 5, 4], [3, 6]]
    assert model.lengths == [4, 12, 40]


def test_shapes_are_not_mixed_without_an_attention_mask() -> None:
    model = Recorder(seconds=0.05)
    queue = batcher(model, max_queue_delay_s=0.0, pad_to_longest=False)
    asyncio.run(_gather(queue, [1, 2, 3, 4], lengths=[3, 3, 5, 3], after_first=0.01))
    queue.close()
    assert model.batches == [[1], [2, 4], [3]]


def test_a_failed_batch_fails_its_requests_and_the_queue_goes_on() -> None:
    model = Recorder(seconds=0.02)
    queue = batcher(model, max_queue_delay_s=0.0)

    async def scenario():
        model.fail = True
        first = await asyncio.gather(
            *(queue.submit(request(v)) for v in (1, 2, 3)), return_exceptions=True
        )
        model.fail = False
        second = await queue.submit(request(9))
        return first, second

    first, second = asyncio.run(scenario())
    queue.close()
    assert all(isinstance(r, RuntimeError) for r in first)
    assert second["score"].ravel().tolist() == [9]


def test_a_cancelled_request_leaves_the_batch_and_the_others_are_answered() -> None:
    model = Recorder(seconds=0.05)
    queue = batcher(model, max_queue_delay_s=0.0)

    async def scenario():
        tasks = [asyncio.create_task(queue.submit(request(1)))]
        await asyncio.sleep(0.01)  # 1 is running
        tasks += [asyncio.create_task(queue.submit(request(v))) for v in (2, 3, 4)]
        await asyncio.sleep(0.01)  # 2-4 queued
        tasks[2].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(scenario())
    queue.close()
    assert isinstance(results[2], asyncio.CancelledError)
    assert [r["score"].ravel().tolist() for i, r in enumerate(results) if i != 2] == [[1], [2], [4]]
    assert model.batches == [[1], [2, 4]]


def test_a_python_model_gets_the_list_of_requests_and_answers_each() -> None:
    config = parse_config(CONFIG.replace('platform: "onnxruntime_onnx"', 'backend: "python"'))
    policy = BatchingPolicy.from_config(config)
    assert policy.merge_requests is False and policy.pad_to_longest is False
    calls: list[list[int]] = []

    def execute(requests: list[dict]) -> list:
        calls.append([int(r["input_ids"][0, 0]) for r in requests])
        time.sleep(0.05)
        return [
            ValueError("bad request") if r["input_ids"][0, 0] == 3 else {"score": r["input_ids"]}
            for r in requests
        ]

    queue = DynamicBatcher(
        replace(policy, max_queue_delay_s=0.0),
        execute,
        {"model": "m", "version": "1", "revision": ""},
    )

    async def scenario():
        first = asyncio.create_task(queue.submit(request(1, 3)))
        await asyncio.sleep(0.01)
        rest = [
            asyncio.create_task(queue.submit(request(v, n))) for v, n in ((2, 5), (3, 3), (4, 9))
        ]
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(scenario())
    queue.close()
    # not merged: requests of any shape in one call, each with its own answer or error
    assert calls == [[1], [2, 3, 4]]
    assert [r["score"].shape[1] for i, r in enumerate(results) if i != 2] == [3, 5, 9]
    assert isinstance(results[2], ValueError)


def test_instances_run_batches_at_once() -> None:
    model = Recorder(seconds=0.1)
    running, peak = [0], [0]
    lock = threading.Lock()

    def counting(tensors):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            return model(tensors)
        finally:
            with lock:
                running[0] -= 1

    queue = DynamicBatcher(
        BatchingPolicy(max_batch_size=1, instances=2),
        counting,
        {"model": "m", "version": "1", "revision": ""},
    )
    asyncio.run(_gather(queue, [1, 2, 3, 4]))
    queue.close()
    assert peak[0] == 2 and sorted(v for b in model.batches for v in b) == [1, 2, 3, 4]
