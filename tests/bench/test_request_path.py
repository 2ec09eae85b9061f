"""bench/request_path.py: the server's histograms are read per model and differenced."""

from __future__ import annotations

import pytest

from tests.bench.scripts import BENCH, load_script

EXPOSITION = """\
# HELP request_predict_seconds predict
# TYPE request_predict_seconds histogram
request_predict_seconds_bucket{le="+Inf",model_name="search-int8"} 4.0
request_predict_seconds_count{model_name="search-int8"} 4.0
request_predict_seconds_sum{model_name="search-int8"} 0.02
request_predict_seconds_count{model_name="other"} 9.0
request_predict_seconds_sum{model_name="other"} 9.0
# HELP recjob_batch_queue_seconds queue
# TYPE recjob_batch_queue_seconds histogram
recjob_batch_queue_seconds_count{model="search-int8",revision="",version="1"} 4.0
recjob_batch_queue_seconds_sum{model="search-int8",revision="",version="1"} 0.0004
# HELP unrelated_seconds other
# TYPE unrelated_seconds histogram
unrelated_seconds_count{model="search-int8"} 1.0
unrelated_seconds_sum{model="search-int8"} 5.0
"""


@pytest.fixture
def request_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports common and machine
    return load_script(BENCH / "request_path.py")


def test_histogram_sums_keep_one_model_and_the_known_series(request_path):
    sums = request_path.histogram_sums(EXPOSITION, "search-int8")
    assert sums["predict"] == (0.02, 4.0)
    assert sums["queue"] == (0.0004, 4.0)
    assert sums["preprocess"] == (0.0, 0.0)
    assert set(sums) == set(request_path.HISTOGRAMS.values())


def test_mean_ms_between_snapshots_counts_only_the_new_requests(request_path):
    before = {"predict": (0.02, 4.0), "queue": (0.0, 0.0)}
    after = {"predict": (0.05, 10.0), "queue": (0.0, 0.0)}
    means = request_path.mean_ms_between(before, after)
    assert means["predict"] == pytest.approx(5.0)  # 30 ms over 6 requests
    assert means["queue"] == 0.0  # no request: no mean, not a division by zero
