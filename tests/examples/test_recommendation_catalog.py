"""The recommendation example on another catalog in the same format (issue 15): a second
catalog built from a different sub-category of the bundled Amazon data
(examples/data/category_slice.py), and examples/recjob-recommendation.yaml trained on it
with only its data paths changed."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from recjob_operator.api.v1alpha1.trainer import trainer_config
from recjob_operator.api.validation import parse_recjob
from recjob_operator.local.options import LocalOptions
from recjob_trainer.models import load_model
from tests.conftest import REPO, SHARED
from tests.trainer.test_training import BIN, free_port, kill_tree, losses

AMAZON = SHARED / "data" / "amazon-scientific"
EXAMPLE = REPO / "examples" / "recjob-recommendation.yaml"
BUILDER = REPO / "examples" / "data" / "category_slice.py"
CATEGORY = "Industrial Electrical"
PREFIX = "Electrical"
SPLITS = ("train", "valid", "test")

pytestmark = pytest.mark.skipif(not AMAZON.exists(), reason="../shared/data not present")


def _builder():
    spec = importlib.util.spec_from_file_location("category_slice", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def electrical(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The "Industrial Electrical" slice, built once by the CLI as a user would."""
    out = tmp_path_factory.mktemp("slice")
    result = subprocess.run(
        [
            sys.executable,
            str(BUILDER),
            "--shared",
            str(SHARED),
            "--category",
            CATEGORY,
            "--out",
            str(out),
            "--prefix",
            PREFIX,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "1010 users" in result.stdout, result.stdout
    return out


def _inter(path: Path) -> list[tuple[int, list[int], int]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id_list:token_seq\titem_id:token"
    rows = []
    for line in lines[1:]:
        user, history, target = line.split("\t")
        rows.append((int(user), [int(i) for i in history.split()], int(target)))
    return rows


def _pairs(path: Path) -> dict[str, str]:
    return dict(line.split("\t") for line in path.read_text().splitlines())


def test_slice_is_a_leave_one_out_catalog_of_the_category(electrical: Path) -> None:
    """Counts, headers, only the category's items, indices dense, and the splits of one
    sequence per user: test history = validation history + validation target, training
    rows every shorter prefix."""
    files = {part: _inter(electrical / f"{PREFIX}.{part}.inter") for part in SPLITS}
    assert [len(files[p]) for p in SPLITS] == [1698, 1010, 1010]
    text = (electrical / f"{PREFIX}.text").read_text().splitlines()
    assert text[0] == (AMAZON / "Scientific.text").read_text().split("\n", 1)[0]
    items = _pairs(electrical / f"{PREFIX}.item2index")
    users = _pairs(electrical / f"{PREFIX}.user2index")
    assert sorted(map(int, items.values())) == list(range(571))
    assert sorted(map(int, users.values())) == list(range(1010))
    # the catalog holds exactly the indexed items, all of the category, texts unchanged
    source_text = dict(
        line.split("\t", 1) for line in (AMAZON / "Scientific.text").read_text().splitlines()[1:]
    )
    catalog = dict(line.split("\t", 1) for line in text[1:])
    assert set(catalog) == set(items)
    assert all(source_text[code] == body for code, body in catalog.items())
    in_category = re.compile(rf"\. Industrial & Scientific {CATEGORY}[ .]")
    assert all(in_category.search(body) for body in catalog.values())
    # no id outside the catalog in any split
    for rows in files.values():
        assert all(0 <= i < 571 for _, history, target in rows for i in [*history, target])
    # leave-one-out of one sequence per user
    valid = {user: (history, target) for user, history, target in files["valid"]}
    train: dict[int, list[tuple[list[int], int]]] = {}
    for user, history, target in files["train"]:
        train.setdefault(user, []).append((history, target))
    for user, history, _ in files["test"]:
        valid_history, valid_target = valid[user]
        assert len(history) >= 2
        assert history == ([*valid_history, valid_target])[-50:]
        prefixes = train.get(user, [])
        assert [[*h, t] for h, t in prefixes] == [
            valid_history[:k] for k in range(len(valid_history), 1, -1)
        ]  # longest first, as the source lists them
    # the users are the source's users (codes kept), in source order
    source_users = [
        line.split("\t")[0] for line in (AMAZON / "Scientific.user2index").read_text().splitlines()
    ]
    order = sorted(users, key=lambda code: int(users[code]))
    positions = [source_users.index(code) for code in order]
    assert positions == sorted(positions)


def test_slice_is_deterministic_and_takes_several_categories(tmp_path: Path) -> None:
    builder = _builder()
    first = builder.build_slice(SHARED, [CATEGORY], tmp_path / "a", PREFIX)
    again = builder.build_slice(SHARED, [CATEGORY], tmp_path / "b", PREFIX)
    assert first == again
    for suffix in ("train.inter", "valid.inter", "test.inter", "text", "item2index"):
        assert (tmp_path / "a" / f"{PREFIX}.{suffix}").read_bytes() == (
            tmp_path / "b" / f"{PREFIX}.{suffix}"
        ).read_bytes()
    both = builder.build_slice(
        SHARED, [CATEGORY, "Test, Measure & Inspect"], tmp_path / "c", "Both", min_length=5
    )
    assert both["category_items"] > first["category_items"]
    assert all(
        len(history) >= 3 for _, history, _ in _inter(tmp_path / "c" / "Both.test.inter")
    )  # min_length 5: at least 4 items before the test target
    # a word prefix, not a substring: "Industrial" does not take "Industrial Electrical"
    # items for "Industrial Hardware"
    hardware = builder.build_slice(SHARED, ["Industrial Hardware"], tmp_path / "d", "H")
    text = (tmp_path / "d" / "H.text").read_text()
    assert "Industrial & Scientific Industrial Electrical" not in text
    assert hardware["items"] > 0


# --------------------------------------------------------------------------- the example

#: CI time only: the example trains up to 30 epochs (180 steps on this slice with its 2
#: ranks x 128 rows, evaluated at step 130 and at the end). CI runs on 2 cores close to its
#: time limit, so the test caps training at 10 epochs (60 steps; training.epochs, because
#: a maxSteps below the example's checkpoint interval of 130 is refused). The uncapped
#: run's numbers are in examples/README.md. Nothing else of the example changes.
TEST_EPOCHS = 10


def example_on_slice(slice_dir: Path, run: Path, epochs: int | None) -> Path:
    """examples/recjob-recommendation.yaml with only spec.data's four paths changed (and,
    when ``epochs`` is given, training.epochs), turned into the trainer config the way
    local mode does (trainer_config of the parsed RecJob, local mode's default evaluation
    options). Returns the config's path."""
    document = yaml.safe_load(EXAMPLE.read_text())
    data = document["spec"]["data"]
    original = dict(data)
    data["train"] = str(slice_dir / f"{PREFIX}.train.inter")
    data["validation"] = str(slice_dir / f"{PREFIX}.valid.inter")
    data["test"] = str(slice_dir / f"{PREFIX}.test.inter")
    data["catalog"] = str(slice_dir / f"{PREFIX}.text")
    changed = {key for key in data if data[key] != original[key]}
    assert changed == {"train", "validation", "test", "catalog"}
    if epochs is not None:  # CI time only (see TEST_EPOCHS)
        document["spec"]["training"]["epochs"] = epochs
    job = parse_recjob(document)
    job.metadata.generation = 1
    config = trainer_config(job, str(run), str(EXAMPLE.parent))
    options = LocalOptions()  # as local mode's backend (_launch_training) sets them
    config.evaluation.max_groups = options.eval_groups
    config.evaluation.baselines = options.baselines
    path = run.parent / f"{run.name}-trainer.yaml"
    path.write_text(
        yaml.safe_dump(config.model_dump(mode="json", by_alias=True, exclude_none=True))
    )
    return path


def train_as_local_mode(config: Path, timeout: float) -> list[str]:
    """One torchrun launcher per node of spec.training (nodes x processesPerNode ranks),
    with the command and environment local mode's backend uses; returns their output."""
    training = yaml.safe_load(config.read_text())["training"]
    nodes, per_node = training.get("nodes", 1), training.get("processesPerNode", 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    port = free_port()
    logs = [config.with_name(f"{config.stem}-node{rank}.log") for rank in range(nodes)]
    launchers = []
    try:
        for rank, log in enumerate(logs):
            with log.open("w") as handle:  # a file, not a pipe: no launcher blocks on output
                launchers.append(
                    subprocess.Popen(
                        [
                            str(BIN / "torchrun"),
                            "--nnodes",
                            str(nodes),
                            "--node_rank",
                            str(rank),
                            "--nproc_per_node",
                            str(per_node),
                            "--master_addr",
                            "127.0.0.1",
                            "--master_port",
                            str(port),
                            "-m",
                            "recjob_trainer",
                            "--config",
                            str(config),
                        ],
                        env=env,
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + timeout
        for launcher, log in zip(launchers, logs, strict=True):
            launcher.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert launcher.returncode == 0, log.read_text()[-4000:]
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                kill_tree(launcher.pid)
    return [log.read_text() for log in logs]


@pytest.mark.slow
@pytest.mark.extended  # make demo runs the example; tests/local runs recommendation RecJobs
def test_recommendation_example_runs_on_another_category(electrical: Path, tmp_path: Path) -> None:
    """examples/recjob-recommendation.yaml with its data paths pointed at the "Industrial
    Electrical" slice and nothing else of its data, model or training changed, except that
    training is capped at TEST_EPOCHS epochs for CI time (the example's 30 epochs run in
    examples/README.md's numbers), turned into the trainer config and launched as local
    mode does (spec.training.nodes torchrun launchers x processesPerNode ranks,
    OMP_NUM_THREADS=1, local mode's evaluation of at most 500 test users with baselines):
    it trains on 2 ranks, the test report ranks the slice's whole catalog (571 items), and
    the model beats item popularity on full-catalog NDCG@10 and HR@10. It is not asserted
    to beat the zero-shot text model: on this slice it does not (examples/README.md)."""
    run = tmp_path / "run"
    config = example_on_slice(electrical, run, TEST_EPOCHS)
    train_as_local_mode(config, timeout=600)

    metrics = json.loads((run / "metrics.json").read_text())
    card = json.loads((run / "model-card.json").read_text())
    report = json.loads((run / "data" / "report.json").read_text())
    assert card["world_size"] == 2 and metrics["steps"] == 6 * TEST_EPOCHS
    # the whole slice catalog is ranked for every test user
    assert report["catalog_items"] == 571 and report["rows"]["test"] == 1010
    model, _ = load_model(run / "model")
    assert model.info.kind == "sequential" and len(model.info.extra["item_ids"]) == 571
    quality, popularity = metrics["model"], metrics["baselines"]["popularity"]
    assert quality["full/users"] == popularity["full/users"] == 500
    # point estimates (at 60 steps on 500 users: NDCG@10 0.059 vs 0.043, HR@10 0.112 vs
    # 0.068); the bootstrap interval's low end is only just above 0 at this length, so it
    # is not asserted (uncapped, on all 1010 users: [0.017, 0.041], examples/README.md)
    for metric in ("full/ndcg@10", "full/hr@10"):
        assert quality[metric] > popularity[metric], (metric, metrics)
    assert metrics["ndcg@10_vs_baselines"]["popularity"]["mean_difference"] > 0
    curve = losses(run)
    assert len(curve) >= 5 and curve[-1] < curve[0], curve
    assert metrics["cold_start"]["users"] > 0
    assert [e["metric"] for e in metrics["validation"]] == ["full/ndcg@10"]
