"""The RecBole SASRec peer (bench/peers): exact pins, torch as the project's, no RecJob
import, and its data/score plumbing, checked without RecBole (a few milliseconds)."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from recjob_trainer import metrics as m
from tests.bench.scripts import load_script

REPO = Path(__file__).resolve().parents[2]
PEERS = REPO / "bench" / "peers"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)$")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"{path.name}: {line!r} is not an exact name==version pin"
        name = re.sub(r"[-_.]+", "-", match[1]).lower()
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = match[2]
    return pins


@pytest.fixture(scope="module")
def peer():
    """bench/peers/recbole_sasrec.py as a module (its top level needs only numpy)."""
    return load_script(PEERS / "recbole_sasrec.py")


def test_requirements_pin_exact_versions_and_the_projects_torch() -> None:
    pins = _pins(PEERS / "requirements-recbole.txt")
    assert pins["recbole"] == "1.2.1"
    assert pins["torch"] == _pins(REPO / "constraints.txt")["torch"]
    assert '"torch==' + pins["torch"] + '"' in (REPO / "pyproject.toml").read_text()
    # recbole 1.2.1's NDCG/MRR use np.float (gone in numpy 1.24); ray 2.6.3 needs
    # pkg_resources (gone from recent setuptools)
    assert tuple(int(p) for p in pins["numpy"].split(".")[:2]) < (1, 24)
    assert int(pins["setuptools"].split(".")[0]) < 81


def test_recbole_stays_out_of_the_project_and_the_peer_imports_no_recjob() -> None:
    for lock in (REPO / "pyproject.toml", REPO / "constraints.txt"):
        assert "recbole" not in lock.read_text().lower()
    tree = ast.parse((PEERS / "recbole_sasrec.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert names and not [n for n in names if n.split(".")[0].startswith(("recjob", "bench"))]
    assert ".venv-recbole/" in (REPO / ".gitignore").read_text().splitlines()


def _write_inter(path: Path, rows) -> None:
    lines = ["user_id:token\titem_id_list:token_seq\titem_id:token"]
    lines += [f"{u}\t{' '.join(map(str, h))}\t{t}" for u, h, t in rows]
    path.write_text("\n".join(lines) + "\n")


def test_dataset_folder_links_or_cuts_to_the_most_recent_items(peer, tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _write_inter(data / "P.train.inter", [(0, [0, 1], 2), (1, [3], 4)])
    _write_inter(data / "P.valid.inter", [(0, [0, 1, 2], 3)])
    _write_inter(data / "P.test.inter", [(0, [0, 1, 2, 3], 4), (1, [3, 4], 0)])
    (data / "P.item2index").write_text("".join(f"A{i}\t{i}\n" for i in (2, 0, 4, 1, 3, 5)))
    assert peer.catalog_size(data, "P") == 6
    info = peer.prepare_dataset(data, "P", tmp_path / "rb", max_len=3)
    folder = tmp_path / "rb" / "P"
    assert (folder / "P.train.inter").is_symlink() and (folder / "P.valid.inter").is_symlink()
    assert not (folder / "P.test.inter").is_symlink()
    assert peer.read_inter(folder / "P.test.inter") == [
        ("0", ["1", "2", "3"], "4"),
        ("1", ["3", "4"], "0"),
    ]
    assert info["test"] == {**info["test"], "rows": 2, "histories_cut": 1}
    assert info["train"]["histories_cut"] == 0
    (data / "P.item2index").write_text("A\t0\nB\t2\n")
    with pytest.raises(ValueError, match=r"0\.\.N-1"):
        peer.catalog_size(data, "P")


def test_scores_land_in_catalog_columns_and_rank_like_the_project(peer) -> None:
    # RecBole's internal ids: 0 = [PAD], then tokens in first-seen order; catalog item 2
    # was never seen, so its column is -inf
    cols = peer.column_index(["[PAD]", "3", "0", "1"], n_items=4)
    assert cols.tolist() == [-1, 3, 0, 1]
    internal = np.array([[9.0, 0.5, 0.25, 0.75], [9.0, 0.125, 0.125, 0.375]], dtype=np.float32)
    scores = peer.to_catalog(internal, cols, 4)
    assert scores.dtype == np.float32
    assert scores.tolist() == [[0.25, 0.75, -np.inf, 0.5], [0.125, 0.375, -np.inf, 0.125]]
    targets = np.array([3, 0])
    ranks = peer.target_ranks(scores, targets)
    assert (
        ranks.tolist()
        == [m.rank_of_target(s, t) for s, t in zip(scores, targets, strict=True)]
        == [1, 2]
    )
    ours = peer.rank_metrics(ranks)
    theirs = m.target_rank_report(ranks)
    assert all(ours[k] == pytest.approx(v) for k, v in theirs.items() if k != "users")
    with pytest.raises(ValueError, match="outside the catalog"):
        peer.column_index(["[PAD]", "4"], n_items=4)
    with pytest.raises(ValueError, match="same catalog index"):
        peer.column_index(["[PAD]", "1", "01"], n_items=4)


def test_rec_quality_matches_peer_rows_by_user_and_columns_by_item(tmp_path: Path) -> None:
    """bench/rec_quality.py reads the peer's scores.npy (rows: test file order; columns:
    item2index order) into our test rows (any order, by user) and catalog order."""
    spec = importlib.util.spec_from_file_location("rec_quality", REPO / "bench" / "rec_quality.py")
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "bench"))
    import polars as pl

    (tmp_path / "X.item2index").write_text("B\t0\nA\t1\nC\t2\n")
    (tmp_path / "X.test.inter").write_text(
        "user_id:token\titem_id_list:token_seq\titem_id:token\n7\t0\t1\n9\t2\t0\n"
    )
    out = tmp_path / "peer"
    out.mkdir()
    # file row 0 = user 7, row 1 = user 9; columns B, A, C
    np.save(out / "scores.npy", np.array([[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]], np.float32))
    test = pl.DataFrame({"user_id": ["9", "7"], "history": [["C"], ["B"]], "item_id": ["B", "A"]})
    scores = module.peer_scores(out, tmp_path, "X", test, ["A", "B", "C"])
    assert scores.tolist() == [[11.0, 10.0, 12.0], [1.0, 0.0, 2.0]]
