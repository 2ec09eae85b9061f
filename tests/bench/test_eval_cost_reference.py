"""bench/eval_cost.py's reference loading: a copy of the evaluation package from another
commit runs its own modules beside the current ones (the comparison would otherwise time
the current code twice)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import polars as pl

from recjob_trainer import evaluation
from tests.bench.scripts import BENCH, load_script

REFERENCE = "recjob_trainer._reference_evaluation"


def _unload_reference() -> None:
    for name in [n for n in sys.modules if n.startswith(REFERENCE)]:
        del sys.modules[name]


def test_a_package_folder_loads_as_its_own_modules(tmp_path: Path) -> None:
    copy = tmp_path / "evaluation"
    shutil.copytree(Path(evaluation.__file__).parent, copy)
    # the reference differs in one of its submodules: the facade must reach that copy
    recommendation = copy / "recommendation.py"
    recommendation.write_text(
        recommendation.read_text().replace("RANK_CHUNK = 1024", "RANK_CHUNK = 7")
    )
    eval_cost = load_script(BENCH / "eval_cost.py")
    try:
        reference = eval_cost.load_reference(str(copy))
        assert reference.RANK_CHUNK == 7 and evaluation.RANK_CHUNK == 1024
        assert reference.ranking_part is not evaluation.ranking_part
        assert Path(sys.modules[f"{REFERENCE}.recommendation"].__file__) == recommendation
        rng = np.random.default_rng(0)
        ids = [f"i{n}" for n in range(40)]
        scores = rng.normal(size=(20, 40))
        frame = pl.DataFrame({"item_id": ids[:20], "history": [[]] * 20})
        negatives = [ids[20:30]] * 20
        args = (scores, ids, frame, negatives, [1, 5, 10], True)
        assert reference.ranking_part(*args) == evaluation.ranking_part(*args)
    finally:
        _unload_reference()


def test_a_single_module_from_before_the_package_still_loads(tmp_path: Path) -> None:
    old = tmp_path / "evaluation.py"
    old.write_text("from recjob_trainer import metrics as m\n\nPER_UNIT = m.__name__\n")
    eval_cost = load_script(BENCH / "eval_cost.py")
    try:
        assert eval_cost.load_reference(str(old)).PER_UNIT == "recjob_trainer.metrics"
    finally:
        _unload_reference()
