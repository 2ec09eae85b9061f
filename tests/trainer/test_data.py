"""Data preparation: readers, every cleaning rule, leakage-free splits, negative sampling."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from recjob_operator.api.v1alpha1.spec_data import DataSpec, MissingValues, TextNormalization
from recjob_operator.api.v1alpha1.spec_training import ModelSpec
from recjob_trainer.data.cleaning import (
    CleaningLog,
    cast_numbers,
    dedup_pairs,
    handle_missing,
    k_core,
    near_duplicate_groups,
    normalize_text,
)
from recjob_trainer.data.prepare import prepare
from recjob_trainer.data.prepared import read_prepared, write_prepared
from recjob_trainer.data.readers import DataError, read_table
from recjob_trainer.data.splits import (
    by_time,
    leave_one_out,
    sample_negatives,
    sequences,
    split_by_group,
)
from tests.conftest import SHARED

HOMEDEPOT = SHARED / "data" / "homedepot-search" / "queries-dev.csv"
AMAZON = SHARED / "data" / "amazon-scientific"
needs_shared = pytest.mark.skipif(not HOMEDEPOT.exists(), reason="../shared/data not present")

SEARCH_COLUMNS = {
    "query": "search_term",
    "itemId": "product_uid",
    "itemText": "product_title",
    "label": "relevance",
}


def search_spec(train: str, **pre) -> DataSpec:
    return DataSpec.model_validate(
        {"task": "search-ranking", "train": train, "columns": SEARCH_COLUMNS, "preprocessing": pre}
    )


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- readers
def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", "search_term,product_title,relevance\nq,t,1\n")
    with pytest.raises(DataError) as error:
        prepare(search_spec(path), ModelSpec(), None)
    assert str(error.value).startswith(f"{path}: column 'product_uid': missing")
    assert error.value.column == "product_uid"


@pytest.mark.parametrize(
    ("text", "expected"), [("", "the file is empty"), ("a,b\n", "header but no rows")]
)
def test_empty_files(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "e.csv", text)
    with pytest.raises(DataError, match=expected) as error:
        read_table(path, "csv")
    assert path in str(error.value)


def test_unreadable_uri(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv: cannot read"):
        read_table(str(tmp_path / "nope.csv"), "csv")


def test_object_store_without_its_filesystem_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec.core

    real = fsspec.core.get_filesystem_class

    def without_s3fs(protocol: str):
        if protocol == "s3":  # as fsspec says when s3fs is not installed
            raise ImportError("Install s3fs to access S3")
        return real(protocol)

    monkeypatch.setattr(fsspec.core, "get_filesystem_class", without_s3fs)
    with pytest.raises(DataError, match=r"s3://bucket/logs\.csv: cannot read .*s3fs"):
        read_table("s3://bucket/logs.csv", "csv")


def test_unparseable_parquet(tmp_path: Path) -> None:
    path = write(tmp_path, "x.parquet", "not parquet at all")
    with pytest.raises(DataError, match="cannot parse as parquet"):
        read_table(path, "parquet")


def test_wrong_type_is_quarantined_not_guessed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "w.csv",
        "search_term,product_uid,product_title,relevance\n"
        "drill,1,cordless drill,3\nsaw,2,hand saw,high\nsaw,3,saw blade,2\n",
    )
    prepared = prepare(
        search_spec(path, split={"validationFraction": 0.01, "testFraction": 0.01}),
        ModelSpec(),
        None,
    )
    quarantine = prepared.log.quarantine_frame()
    assert quarantine.height == 1
    assert quarantine["reason"][0] == "column 'label' is not a number"
    assert '"high"' in quarantine["row"][0] and quarantine["source"][0] == path
    assert sum(f.height for f in prepared.splits.values()) == 2


# --------------------------------------------------------------------------- cleaning
def test_text_normalization() -> None:
    frame = pl.DataFrame({"t": ["  <b>\uff23ordless</b>   DRILL&amp;Saw \n", "ok"]})
    out = frame.select(normalize_text("t", TextNormalization()))["t"].to_list()
    assert out == ["cordless drill saw", "ok"]
    raw = frame.select(
        normalize_text(
            "t",
            TextNormalization(
                lowercase=False, strip_html=False, collapse_whitespace=False, unicode_form="none"
            ),
        )
    )
    assert raw["t"].to_list() == frame["t"].to_list()


@pytest.mark.parametrize("policy", ["drop", "fill", "quarantine"])
def test_missing_value_policies(policy: str) -> None:
    frame = pl.DataFrame({"q": ["a", None, "c", " "], "x": [1.0, 2.0, None, 4.0]})
    log = CleaningLog()
    out = handle_missing(
        frame,
        ["q", "x"],
        MissingValues(policy=policy, fill_text="?", fill_number=-1.0),
        log,
        "f.csv",
    )
    if policy == "fill":
        assert out["q"].to_list() == ["a", "?", "c", "?"]
        assert out["x"].to_list() == [1.0, 2.0, -1.0, 4.0]
        assert log.quarantine_frame().height == 0
    else:
        assert out["q"].to_list() == ["a"]
        assert log.steps[-1].removed == 3
        expected = 3 if policy == "quarantine" else 0
        assert log.quarantine_frame().height == expected
        if policy == "quarantine":
            reasons = Counter(log.quarantine_frame()["reason"].to_list())
            assert reasons == {"missing value in column 'q'": 2, "missing value in column 'x'": 1}


def test_cast_numbers_quarantines_only_bad_values() -> None:
    log = CleaningLog()
    out = cast_numbers(pl.DataFrame({"v": ["1", " 2.5 ", "x", None]}), "v", log, "f")
    assert out["v"].to_list() == [1.0, 2.5, None]
    assert log.quarantine_frame()["reason"].to_list() == ["column 'v' is not a number"]


def test_exact_duplicates_average_conflicting_labels() -> None:
    frame = pl.DataFrame(
        {
            "query": ["a", "a", "a", "b"],
            "item_id": ["1", "1", "2", "1"],
            "item_text": ["t1", "t1", "t2", "t1"],
            "label": [1.0, 3.0, 2.0, 2.0],
        }
    )
    log = CleaningLog()
    out = dedup_pairs(frame, ["query", "item_id"], "label", log)
    assert out.height == 3 and out.columns == frame.columns
    assert out.filter((pl.col("query") == "a") & (pl.col("item_id") == "1"))["label"][0] == 2.0
    assert "1 duplicate group(s) had conflicting labels" in log.steps[0].detail


def test_near_duplicates_are_confirmed_by_exact_jaccard() -> None:
    base = "dewalt 20 volt max cordless drill driver kit with two batteries and charger"
    texts = [base, base + " black", "makita hammer drill with case", base.replace("two", "2")]
    roots = near_duplicate_groups(texts, threshold=0.8)
    assert roots[0] == 0 and roots[1] == 0 and roots[2] == 2
    assert near_duplicate_groups(texts, threshold=1.0) == [0, 1, 2, 3]


def test_k_core_is_iterated_until_stable() -> None:
    # u3 has 1 interaction -> removed; then item c has 1 left -> removed; then u2 has 1 -> removed
    frame = pl.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u2", "u3", "u1", "u4", "u4"],
            "item_id": ["a", "b", "a", "c", "c", "d", "a", "b"],
        }
    )
    log = CleaningLog()
    out = k_core(frame, "user_id", "item_id", min_user=2, min_item=2, log=log)
    assert out.group_by("user_id").len().filter(pl.col("len") < 2).height == 0
    assert out.group_by("item_id").len().filter(pl.col("len") < 2).height == 0
    assert set(out["user_id"]) == {"u1", "u4"}
    assert set(out["item_id"]) == {"a", "b"}


# --------------------------------------------------------------------------- splits
def test_split_by_query_never_leaks_and_is_stable() -> None:
    frame = pl.DataFrame({"query": [f"q{i % 300}" for i in range(3000)], "x": range(3000)})
    splits = split_by_group(frame, "query", 0.1, 0.2, seed=1)
    sides = [set(s["query"]) for s in splits.values()]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert sum(s.height for s in splits.values()) == 3000
    assert 0.1 < splits["test"].height / 3000 < 0.3
    # a query's side does not depend on which other queries are present
    half = split_by_group(frame.filter(pl.col("x") < 1500), "query", 0.1, 0.2, seed=1)
    assert set(half["test"]["query"]) <= set(splits["test"]["query"])
    other = split_by_group(frame, "query", 0.1, 0.2, seed=2)
    assert set(other["test"]["query"]) != set(splits["test"]["query"])


def test_leave_one_out() -> None:
    seqs = sequences(
        pl.DataFrame(
            {"user_id": ["u"] * 5 + ["v"] * 2, "item_id": ["a", "b", "c", "d", "e", "x", "y"]}
        ),
        None,
    )
    splits = leave_one_out(seqs, history_length=2)
    assert splits["test"].rows() == [("u", ["c", "d"], "e")]
    assert splits["validation"].rows() == [("u", ["b", "c"], "d")]
    assert ("u", ["a", "b"], "c") in splits["train"].rows()
    assert ("v", ["x"], "y") in splits["train"].rows()
    assert all(r[2] not in ("d", "e") or r[0] != "u" for r in splits["train"].rows())


def test_by_time_never_sees_the_future() -> None:
    frame = pl.DataFrame(
        {
            "user_id": ["u"] * 10 + ["v"] * 10,
            "item_id": [f"i{i}" for i in range(20)],
            "timestamp": [float(t) for t in list(range(10)) + list(range(5, 15))],
        }
    )
    seqs = sequences(frame, "timestamp")
    splits = by_time(seqs, 50, 0.2, 0.2)
    time_of = dict(zip(frame["item_id"], frame["timestamp"], strict=True))
    latest_train = max(time_of[i] for i in splits["train"]["item_id"])
    for name in ("validation", "test"):
        for _, history, target in splits[name].rows():
            assert all(time_of[h] < time_of[target] for h in history)
            assert time_of[target] > latest_train or name == "validation"
    assert min(time_of[i] for i in splits["test"]["item_id"]) > latest_train


def test_negative_sampling_is_reproducible_and_excludes_history() -> None:
    catalog = [f"i{i}" for i in range(50)]
    popularity = {f"i{i}": float(100 if i < 5 else 1) for i in range(50)}
    args = (["i0", "i1"], [["i2", "i3"], []], catalog, popularity, 5)
    first, again = sample_negatives(*args, seed=3), sample_negatives(*args, seed=3)
    assert first == again and first != sample_negatives(*args, seed=4)
    assert not {"i0", "i2", "i3"} & set(first[0]) and "i1" not in first[1]
    assert all(len(set(n)) == 5 for n in first)
    many = sample_negatives(["i49"] * 400, [[]] * 400, catalog, popularity, 5, seed=0)
    counts = Counter(i for n in many for i in n)
    assert sum(counts[f"i{i}"] for i in range(5)) > 0.4 * 2000  # popular items dominate
    uniform = sample_negatives(["i49"] * 400, [[]] * 400, catalog, None, 5, seed=0)
    counts = Counter(i for n in uniform for i in n)
    assert sum(counts[f"i{i}"] for i in range(5)) < 0.2 * 2000
    with pytest.raises(ValueError, match="cannot sample"):
        sample_negatives(["i0"], [catalog[1:]], catalog, None, 1, seed=0)


# --------------------------------------------------------------------------- real data
@needs_shared
def test_prepare_home_depot_slice_splits_by_query(tmp_path: Path) -> None:
    spec = search_spec(str(HOMEDEPOT), maxRows=3000)
    prepared = prepare(spec, ModelSpec(), None)
    queries = [set(f["query"]) for f in prepared.splits.values()]
    assert not (queries[0] & queries[1]) and not (queries[0] & queries[2])
    assert prepared.splits["train"].height > 2000
    assert prepared.splits["train"]["query"].str.contains("[A-Z]").sum() == 0  # normalised
    write_prepared(prepared, tmp_path / "data")
    again = read_prepared(tmp_path / "data")
    assert again.digest == prepared.digest and again.digest.startswith("sha256:")
    assert again.splits["test"].equals(prepared.splits["test"])
    assert prepare(spec, ModelSpec(), None).digest == prepared.digest
    # a training rank reads the held-out splits and the train summary, not the train split
    held_out = read_prepared(tmp_path / "data", ("validation", "test"))
    assert set(held_out.splits) == {"validation", "test"}
    train = prepared.splits["train"]
    assert held_out.train_summary == {
        "rows": train.height,
        "labelled": True,
        "label_min": train["label"].min(),
        "label_max": train["label"].max(),
        "label_distinct": train["label"].n_unique(),
    }


@needs_shared
def test_prepare_amazon_atomic() -> None:
    spec = DataSpec.model_validate(
        {
            "task": "recommendation",
            "format": "atomic",
            "train": str(AMAZON / "Scientific.train.inter"),
            "validation": str(AMAZON / "Scientific.valid.inter"),
            "test": str(AMAZON / "Scientific.test.inter"),
            "catalog": str(AMAZON / "Scientific.text"),
            "preprocessing": {"deduplicate": {"near": True}, "minUserInteractions": 8},
        }
    )
    prepared = prepare(spec, ModelSpec(historyLength=5), None)
    catalog = set(prepared.catalog["item_id"])
    assert 4300 < len(catalog) <= 4385
    for frame in prepared.splits.values():
        assert frame["history"].list.len().max() <= 5
        assert set(frame["item_id"]) <= catalog
    steps = {s["step"]: s for s in prepared.report()["steps"]}
    assert steps["catalog near duplicates"]["removed"] > 0
    assert any("users with >= 8" in name and s["removed"] > 0 for name, s in steps.items())


# --------------------------------------------------------------------------- impressions
def test_labelled_impressions_history_holds_only_earlier_clicks() -> None:
    from recjob_trainer.data.splits import labelled_examples

    frame = pl.DataFrame(
        {
            "user_id": ["u"] * 5,
            "item_id": ["a", "b", "c", "d", "e"],
            "label": [0.0, 1.0, 0.0, 1.0, 0.0],
            "timestamp": [1.0, 2.0, 3.0, 4.0, 5.0],
        }
    )
    splits = labelled_examples(frame, "timestamp", 5, "leave-one-out", 0.1, 0.1)
    rows = [r for s in ("train", "validation", "test") for r in splits[s].rows()]
    assert ("u", [], "a", 0.0) in rows and ("u", [], "b", 1.0) in rows
    assert ("u", ["b"], "c", 0.0) in rows and ("u", ["b", "d"], "e", 0.0) in rows
    assert splits["test"].rows() == [("u", ["b", "d"], "e", 0.0)]
    assert splits["validation"].rows() == [("u", ["b"], "d", 1.0)]


def test_timestamps_numbers_or_iso_dates(tmp_path: Path) -> None:
    from recjob_trainer.data.cleaning import cast_timestamps

    log = CleaningLog()
    frame = pl.DataFrame({"t": ["1700000000", "2019-11-24 00:00:34.762830+00:00", "soon"]})
    out = cast_timestamps(frame, "t", log, "f.csv")
    assert out["t"].to_list() == [1700000000.0, pytest.approx(1574553634.76283)]
    assert "neither a number nor a date-time" in log.quarantine_frame()["reason"][0]


def test_positive_events_and_multi_column_keys(tmp_path: Path) -> None:
    logs = write(
        tmp_path,
        "events.csv",
        "u1,u2,item,event,ts\n"
        + "".join(f"a,x,i{i % 4},{'click' if i % 3 else 'view'},{i}\n" for i in range(12)),
    )
    catalog = write(
        tmp_path,
        "items.csv",
        "item,brand,title\n" + "".join(f"i{i},acme,thing {i}\n" for i in range(4)),
    )
    spec = DataSpec.model_validate(
        {
            "task": "recommendation",
            "train": logs,
            "catalog": catalog,
            "columns": {
                "userId": "u1,u2",
                "itemId": "item",
                "itemText": "brand, title",
                "timestamp": "ts",
                "eventType": "event",
            },
            "preprocessing": {"positiveEvents": ["click"]},
        }
    )
    prepared = prepare(spec, ModelSpec(), None)
    steps = {s["step"]: s for s in prepared.report()["steps"]}
    assert steps["positive events"]["rows_out"] == 8
    assert prepared.catalog["item_text"][0] == "acme thing 0"
    assert set(prepared.splits["train"]["user_id"]) == {"a x"}


def test_predefined_split_refuses_queries_seen_in_training(tmp_path: Path) -> None:
    header = "search_term,product_uid,product_title,relevance\n"
    train = write(tmp_path, "train.csv", header + "drill,1,cordless drill,3\nsaw,2,saw,2\n")
    valid = write(tmp_path, "valid.csv", header + "Drill ,3,drill bits,2\n")
    spec = DataSpec.model_validate(
        {"task": "search-ranking", "train": train, "validation": valid, "columns": SEARCH_COLUMNS}
    )
    with pytest.raises(DataError, match="also appear in the training data") as error:
        prepare(spec, ModelSpec(), None)
    assert error.value.column == "search_term" and valid in str(error.value)


@needs_shared
def test_open_bandit_impressions() -> None:
    bandit = SHARED / "data" / "open-bandit"
    spec = DataSpec.model_validate(
        {
            "task": "recommendation",
            "train": str(bandit / "random_all.csv"),
            "catalog": str(bandit / "random_all_item_context.csv"),
            "columns": {
                "userId": "user_feature_0,user_feature_1,user_feature_2,user_feature_3",
                "itemId": "item_id",
                "itemText": "item_feature_1,item_feature_2,item_feature_3",
                "label": "click",
                "timestamp": "timestamp",
            },
            "preprocessing": {"split": {"strategy": "by-time"}},
        }
    )
    prepared = prepare(spec, ModelSpec(), None)
    assert sum(f.height for f in prepared.splits.values()) == 10_000
    assert prepared.catalog.height == 80
    clicks = sum(f["label"].sum() for f in prepared.splits.values())
    assert 30 <= clicks <= 80


# --------------------------------------------------------------------------- given test files
def test_search_test_file_without_validation_is_used(tmp_path: Path) -> None:
    """spec.data.test alone is the test set; validation is carved from train by query
    (the test file was once ignored and the test set carved from train)."""
    header = "search_term,product_uid,product_title,relevance\n"
    train = write(
        tmp_path,
        "train.csv",
        header + "".join(f"q{i % 40},{i},item {i},{1 + i % 3}\n" for i in range(400)),
    )
    test = write(tmp_path, "test.csv", header + "hammer,9001,claw hammer,3\nhammer,9002,nail,1\n")
    spec = DataSpec.model_validate(
        {
            "task": "search-ranking",
            "train": train,
            "test": test,
            "columns": SEARCH_COLUMNS,
            "preprocessing": {"split": {"validationFraction": 0.2}},
        }
    )
    prepared = prepare(spec, ModelSpec(), None)
    splits = prepared.splits
    assert splits["test"]["item_id"].to_list() == ["9001", "9002"]
    assert set(splits["test"]["query"]) == {"hammer"}
    assert splits["validation"].height > 0
    assert splits["train"].height + splits["validation"].height == 400
    assert not set(splits["train"]["query"]) & set(splits["validation"]["query"])
    # a test query seen in training or in the carved validation set is refused
    for side in ("train", "validation"):
        leaky = write(tmp_path, "leaky.csv", header + f"{splits[side]['query'][0]},9003,x,2\n")
        where = "training" if side == "train" else "validation"
        with pytest.raises(DataError, match=f"also appear in the {where} data") as error:
            prepare(spec.model_copy(update={"test": leaky}), ModelSpec(), None)
        assert leaky in str(error.value)


def interaction_spec(tmp_path: Path, **data) -> DataSpec:
    catalog = write(
        tmp_path, "items.csv", "item,title\n" + "".join(f"i{i},thing {i}\n" for i in range(20))
    )
    return DataSpec.model_validate(
        {
            "task": "recommendation",
            "catalog": catalog,
            "columns": {"userId": "user", "itemId": "item", "itemText": "title"},
            **data,
        }
    )


def test_recommendation_test_file_without_validation(tmp_path: Path) -> None:
    """Interaction logs: the test file's interactions are the test examples (history: the
    user's training items); validation is each user's last training item; no training
    history holds a held-out item. Before, validation/test files were never read."""
    train = write(
        tmp_path, "train.csv", "user,item\n" + "u,i1\nu,i2\nu,i3\nu,i4\nv,i5\nv,i6\nw,i7\n"
    )
    test = write(tmp_path, "test.csv", "user,item\nu,i9\nu,i8\nv,i10\nnew,i11\n")
    prepared = prepare(interaction_spec(tmp_path, train=train, test=test), ModelSpec(), None)
    splits = {name: frame.rows() for name, frame in prepared.splits.items()}
    assert splits["test"] == [
        ("new", [], "i11"),  # a user without training items: a cold-start example
        ("u", ["i1", "i2", "i3", "i4"], "i9"),
        ("u", ["i1", "i2", "i3", "i4", "i9"], "i8"),
        ("v", ["i5", "i6"], "i10"),
    ]
    assert splits["validation"] == [("u", ["i1", "i2", "i3"], "i4"), ("v", ["i5"], "i6")]
    assert splits["train"] == [("u", ["i1"], "i2"), ("u", ["i1", "i2"], "i3")]
    steps = [s["step"] for s in prepared.report()["steps"]]
    assert f"read {test}" in steps
    assert "split predefined (validation carved from train: leave-one-out)" in steps


def test_recommendation_validation_and_test_files(tmp_path: Path) -> None:
    train = write(tmp_path, "train.csv", "user,item,ts\nu,i2,20\nu,i1,10\nv,i5,1\n")
    valid = write(tmp_path, "valid.csv", "user,item,ts\nu,i3,30\nv,i19,2\n")
    test = write(tmp_path, "test.csv", "user,item,ts\nu,i4,40\nu,i0,5\n")
    spec = interaction_spec(
        tmp_path,
        train=train,
        validation=valid,
        test=test,
        columns={"userId": "user", "itemId": "item", "itemText": "title", "timestamp": "ts"},
    )
    prepared = prepare(spec, ModelSpec(), None)
    splits = {name: frame.rows() for name, frame in prepared.splits.items()}
    assert splits["train"] == [("u", ["i1"], "i2")]
    assert splits["validation"] == [("u", ["i1", "i2"], "i3"), ("v", ["i5"], "i19")]
    # test items in time order, after every training and validation item of the user
    assert splits["test"] == [
        ("u", ["i1", "i2", "i3"], "i0"),
        ("u", ["i1", "i2", "i3", "i0"], "i4"),
    ]


def test_recommendation_test_file_by_time_carves_validation(tmp_path: Path) -> None:
    rows = "".join(f"u{t % 3},i{t % 7},{t}\n" for t in range(30))
    train = write(tmp_path, "train.csv", "user,item,ts\n" + rows)
    test = write(tmp_path, "test.csv", "user,item,ts\nu0,i12,100\n")
    spec = interaction_spec(
        tmp_path,
        train=train,
        test=test,
        columns={"userId": "user", "itemId": "item", "itemText": "title", "timestamp": "ts"},
        preprocessing={"split": {"strategy": "by-time", "validationFraction": 0.2}},
    )
    splits = prepare(spec, ModelSpec(historyLength=50), None).splits
    assert splits["test"].rows() == [("u0", [f"i{t % 7}" for t in range(0, 30, 3)], "i12")]
    assert 4 <= splits["validation"].height <= 7
    assert splits["train"].height + splits["validation"].height == 27  # 30 minus 3 firsts


def test_labelled_impressions_test_file(tmp_path: Path) -> None:
    train = write(
        tmp_path, "train.csv", "user,item,click\nu,i1,1\nu,i2,0\nu,i3,1\nv,i4,1\nv,i5,0\n"
    )
    test = write(tmp_path, "test.csv", "user,item,click\nu,i6,1\nv,i7,0\n")
    spec = interaction_spec(
        tmp_path,
        train=train,
        test=test,
        columns={"userId": "user", "itemId": "item", "itemText": "title", "label": "click"},
    )
    splits = {n: f.rows() for n, f in prepare(spec, ModelSpec(), None).splits.items()}
    assert splits["test"] == [("u", ["i1", "i3"], "i6", 1.0), ("v", ["i4"], "i7", 0.0)]
    assert splits["validation"] == [("u", ["i1"], "i3", 1.0), ("v", ["i4"], "i5", 0.0)]
    assert splits["train"] == [("u", [], "i1", 1.0), ("u", ["i1"], "i2", 0.0), ("v", [], "i4", 1.0)]


def write_atomic(tmp_path: Path) -> dict:
    inter = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    return {
        "task": "recommendation",
        "format": "atomic",
        "train": write(tmp_path, "d.train.inter", inter + "0\t1\t2\n0\t1 2\t3\n1\t4\t5\n2\t\t6\n"),
        "test": write(tmp_path, "d.test.inter", inter + "0\t1 2 3\t7\n1\t4 5\t8\n"),
        "catalog": write(
            tmp_path,
            "d.text",
            "item_id:token\ttext:token_seq\n" + "".join(f"{i}\titem {i}\n" for i in range(10)),
        ),
    }


def test_atomic_test_file_without_validation_carves_each_users_last_example(
    tmp_path: Path,
) -> None:
    prepared = prepare(DataSpec.model_validate(write_atomic(tmp_path)), ModelSpec(), None)
    splits = {n: f.rows() for n, f in prepared.splits.items()}
    assert splits["validation"] == [("0", ["1", "2"], "3")]
    assert splits["train"] == [("0", ["1"], "2"), ("1", ["4"], "5"), ("2", [], "6")]
    assert splits["test"] == [("0", ["1", "2", "3"], "7"), ("1", ["4", "5"], "8")]


# --------------------------------------------------------------------------- atomic columns
def test_atomic_columns_come_from_the_recjob(tmp_path: Path) -> None:
    """RecBole files with other column names (a .item catalog joining title and brand):
    named in spec.data.columns; the item index is named by spec.data.itemIndex (before,
    the catalog had to be headed text:token_seq and the index lie beside it)."""
    inter = "session:token\tseq:token_seq\ttarget:token\n"
    spec = DataSpec.model_validate(
        {
            "task": "recommendation",
            "format": "atomic",
            "train": write(tmp_path, "d.train.inter", inter + "s1\tA\tB\ns1\tA B\tC\n"),
            "test": write(tmp_path, "d.test.inter", inter + "s1\tA B C\tD\n"),
            "catalog": write(
                tmp_path,
                "d.item",
                "code:token\ttitle:token_seq\tbrand:token\n"
                "x1\tDrill\tAcme\nx2\tSaw\tAcme\nx3\tNail\tBolt\nx4\tTape\tBolt\nx5\tGlue\tNone\n",
            ),
            "itemIndex": write(tmp_path, "ids.tsv", "x1\tA\nx2\tB\nx3\tC\nx4\tD\n"),
            "columns": {
                "userId": "session:token",
                "history": "seq:token_seq",
                "itemId": "target:token",
                "itemText": "title:token_seq, brand:token",
            },
        }
    )
    # the catalog's own id column differs from the .inter one: itemId names both, so a
    # catalog with another header is refused, naming what was looked for and what is there
    with pytest.raises(DataError) as error:
        prepare(spec, ModelSpec(), None)
    message = str(error.value)
    assert message.startswith(f"{spec.catalog}: column 'target:token': missing")
    assert "spec.data.columns.itemId" in message and "code:token, title:token_seq" in message
    catalog = write(
        tmp_path,
        "d2.item",
        "target:token\ttitle:token_seq\tbrand:token\n"
        "x1\tDrill\tAcme\nx2\tSaw\tAcme\nx3\tNail\tBolt\nx4\tTape\tBolt\nx5\tGlue\tNone\n",
    )
    prepared = prepare(spec.model_copy(update={"catalog": catalog}), ModelSpec(), None)
    assert dict(prepared.catalog.rows()) == {
        "A": "drill acme",
        "B": "saw acme",
        "C": "nail bolt",
        "D": "tape bolt",
    }
    assert prepared.splits["test"].rows() == [("s1", ["A", "B", "C"], "D")]
    steps = {s["step"]: s for s in prepared.report()["steps"]}
    mapped = steps[f"catalog: item codes mapped by {spec.item_index}"]
    assert (mapped["rows_in"], mapped["rows_out"]) == (5, 4)
    assert (
        "spec.data.itemIndex; 1 catalog item(s) without an id dropped, e.g. 'x5'"
        in (mapped["detail"])
    )


def test_atomic_defaults_and_what_was_looked_for(tmp_path: Path) -> None:
    data = write_atomic(tmp_path)
    prepared = prepare(DataSpec.model_validate(data), ModelSpec(), None)
    steps = {s["step"]: s for s in prepared.report()["steps"]}
    assert (
        f"no {tmp_path / 'd.item2index'} beside the catalog"
        in (steps["catalog: item index"]["detail"])
    )
    # a default column that is not there: the field to set, the default, the file's columns
    (tmp_path / "d.text").write_text("item_id:token\ttitle:token_seq\n1\tx\n")
    with pytest.raises(DataError) as error:
        prepare(DataSpec.model_validate(data), ModelSpec(), None)
    assert str(error.value) == (
        f"{data['catalog']}: column 'text:token_seq': missing (needed as itemText: "
        "spec.data.columns.itemText, the atomic format's default); the file has "
        "item_id:token, title:token_seq"
    )


def test_atomic_item_index_errors_name_the_file(tmp_path: Path) -> None:
    data = write_atomic(tmp_path)
    missing = str(tmp_path / "nope.item2index")
    with pytest.raises(DataError, match=r"cannot read the item index \(spec\.data\.itemIndex\)"):
        prepare(DataSpec.model_validate({**data, "itemIndex": missing}), ModelSpec(), None)
    other = write(tmp_path, "other.item2index", "B0001\t0\nB0002\t1\n")
    with pytest.raises(DataError) as error:
        prepare(DataSpec.model_validate({**data, "itemIndex": other}), ModelSpec(), None)
    assert str(error.value).startswith(f"{other}: none of the 10 item id(s) of the catalog")
    assert "codes such as 'B0001'" in str(error.value)
    three = write(tmp_path, "three.item2index", "1\t1\tx\n")
    with pytest.raises(DataError, match="found 3 tab-separated field"):
        prepare(DataSpec.model_validate({**data, "itemIndex": three}), ModelSpec(), None)


# --------------------------------------------------------------------------- candidates
def test_atomic_candidates_are_matched_to_test_rows_by_user(tmp_path: Path) -> None:
    data = write_atomic(tmp_path)
    data["candidates"] = write(
        tmp_path,
        "d.cands",
        "user_id:token\titem_id_list:token_seq\n0\t7 8 9 7\n1\t9  2\n5\t1 2\n",
    )
    prepared = prepare(DataSpec.model_validate(data), ModelSpec(), None)
    test = prepared.splits["test"]
    # one list per user, duplicates dropped, ids as in the .inter files
    assert test.select("user_id", "item_id", "candidates").rows() == [
        ("0", "7", ["7", "8", "9"]),
        ("1", "8", ["9", "2"]),
    ]
    steps = {s["step"]: s for s in prepared.report()["steps"]}
    detail = steps[f"test: candidate lists from {data['candidates']}"]["detail"]
    assert detail == (
        "2 test row(s) with a list (matched on user), 0 without; 1 list(s) without the "
        "true item (misses); 1 list(s) for no test row; 2-3 items a list"
    )
    assert "candidates" not in prepared.splits["validation"].columns


def test_candidates_per_test_row_and_their_errors(tmp_path: Path) -> None:
    train = write(tmp_path, "train.csv", "user,item\nu,i1\nu,i2\nu,i3\nv,i3\nv,i4\n")
    test = write(tmp_path, "test.csv", "user,item\nu,i5\nu,i6\nv,i7\n")
    lists = write(tmp_path, "c.csv", "user,item,cands\nu,i5,i5 i9\nu,i6,i1 i2\nv,i7,i7 i8\n")
    columns = {"userId": "user", "itemId": "item", "itemText": "title", "candidates": "cands"}
    spec = interaction_spec(tmp_path, train=train, test=test, candidates=lists, columns=columns)
    prepared = prepare(spec, ModelSpec(), None)
    # the file has the item column: one list per (user, true item)
    assert prepared.splits["test"].select("item_id", "candidates").rows() == [
        ("i5", ["i5", "i9"]),
        ("i6", ["i1", "i2"]),
        ("i7", ["i7", "i8"]),
    ]

    def refused(text: str, **columns_changes) -> str:
        path = write(tmp_path, "bad.csv", text)
        changed = {**columns, **columns_changes}
        with pytest.raises(DataError) as error:
            prepare(
                interaction_spec(
                    tmp_path, train=train, test=test, candidates=path, columns=changed
                ),
                ModelSpec(),
                None,
            )
        assert str(error.value).startswith(f"{path}: ")
        return str(error.value)

    assert "1 candidate item id(s) are not in the prepared catalog (e.g. 'i99')" in refused(
        "user,cands\nu,i5 i99\n"
    )
    assert "user 'u' has more than one candidate list (with the item column, spec" in refused(
        "user,cands\nu,i5\nu,i6\n"
    )
    assert "no test row has a candidate list (matched on user:" in refused(
        "user,cands\nnobody,i5\n"
    )
    message = refused("user,lists\nu,i5\n", candidates=None)
    assert message.startswith(f"{tmp_path / 'bad.csv'}: column 'candidates': missing (needed ")
    assert "spec.data.columns.candidates, default); the file has user, lists" in message
